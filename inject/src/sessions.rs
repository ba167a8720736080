//! perfpy sessions that rely on one target's perf trampoline, across perfpy processes.
//!
//! Two `perfpy record --inject-python` on one target must not pull the trampoline from under
//! each other, and none may turn off a trampoline the target started with. Each session that
//! relies on a target's trampoline holds a *shared* `flock` on
//! `/run/perfpy/trampoline-PID-START.lock` (START: the target's start time, so a reused pid is
//! another file) for as long as it relies on it; the kernel drops the lock on any exit of the
//! session, SIGKILL included. A session that leaves asks for the lock *exclusively* without
//! waiting: it gets it only if no other session holds it, and only that last session turns the
//! trampoline off — and only if the file says perfpy turned it on (the activating session writes
//! that into the file; a trampoline found on with no such mark was the target's own).
//! While the last session turns it off it holds the lock exclusively, so a session that starts
//! then waits and finds the trampoline off (and turns it on itself).
//!
//! Locks need a directory only root can write (`/run/perfpy`, 0755): a session without it
//! (perfpy as an ordinary user, on its own processes) works alone, as before.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DIR: &str = "/run/perfpy";
const MARK: &[u8] = b"turned on by perfpy\n";

/// This session's use of one target's trampoline (a shared lock held until dropped).
#[derive(Debug)]
pub struct Use {
    file: File,
    pid: i32,
}

/// What leaving found.
#[derive(Debug, PartialEq, Eq)]
pub enum Leave {
    /// We were the last; perfpy turned the trampoline on (turn it off, then call
    /// [`Use::done_off`]).
    LastOurs,
    /// We were the last; the trampoline was the target's own: leave it on.
    LastNotOurs,
    /// Other sessions (these pids, when known) still rely on it: leave it on.
    Others(Vec<u32>),
}

fn lock_path(pid: i32, start_time: u64) -> PathBuf {
    PathBuf::from(format!("{DIR}/trampoline-{pid}-{start_time}.lock"))
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Use {
    /// Registers this session as a user of `pid`'s trampoline, waiting (at most `timeout`) while
    /// another session turns it off. `None` where sessions cannot be registered (no
    /// `/run/perfpy`: not root); the reason is in the debug log.
    pub fn join(pid: i32, start_time: u64, timeout: Duration) -> Option<Use> {
        let r = (|| -> std::io::Result<Use> {
            ensure_dir()?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(lock_path(pid, start_time))?;
            let t = Instant::now();
            loop {
                match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                        if t.elapsed() >= timeout {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "another perfpy session is turning the trampoline off",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Use { file, pid })
        })();
        r.map_err(|e| tracing::debug!(pid, "trampoline users not registered: {e}"))
            .ok()
    }

    /// Records that perfpy turned the trampoline on (so the last session out turns it off).
    pub fn mark_ours(&mut self) {
        let r = self
            .file
            .set_len(0)
            .and_then(|_| self.file.rewind())
            .and_then(|_| self.file.write_all(MARK));
        if let Err(e) = r {
            tracing::debug!(
                pid = self.pid,
                "cannot mark the trampoline as perfpy's: {e}"
            );
        }
    }

    fn marked(&mut self) -> bool {
        let mut s = Vec::new();
        let _ = self.file.rewind();
        let _ = (&self.file).take(64).read_to_end(&mut s);
        s == MARK
    }

    /// Stops relying on the trampoline. Unless [`Leave::Others`], this session now holds the
    /// lock exclusively until [`Use::done_off`] or drop, so no session starts meanwhile.
    pub fn leave(&mut self) -> Leave {
        // Not atomic: the shared lock is dropped, then the exclusive one tried; of sessions
        // leaving at once, the last one to try gets it, which is what we need.
        match flock(&self.file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {
                if self.marked() {
                    Leave::LastOurs
                } else {
                    Leave::LastNotOurs
                }
            }
            Err(_) => {
                let me = std::process::id();
                let others = holders(&self.file)
                    .into_iter()
                    .filter(|p| *p != me)
                    .collect();
                Leave::Others(others)
            }
        }
    }

    /// The trampoline was turned off: the mark goes (a later session that finds it on knows it
    /// is not perfpy's).
    pub fn done_off(&mut self) {
        let _ = self.file.set_len(0);
    }
}

fn ensure_dir() -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // Only a directory of root's that only root can write: a lock file placed by someone else
    // would let them block or fake a session.
    let m = std::fs::symlink_metadata(DIR)?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 || !nix::unistd::geteuid().is_root() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{DIR} is not a directory only root can write, or perfpy is not root"),
        ));
    }
    Ok(())
}

/// Pids of the perfpy sessions holding a lock on the lock file `f` (from `/proc/locks`).
fn holders(f: &File) -> Vec<u32> {
    let Ok(m) = f.metadata() else {
        return Vec::new();
    };
    holders_of(m.dev(), m.ino())
}

fn holders_of(dev: u64, ino: u64) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    // "1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF"; blocked waiters are "1: -> FLOCK ...".
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let mut pids: Vec<u32> = text
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(1) == Some(&"FLOCK") && w.get(5) == Some(&want.as_str()))
                .then(|| w.get(4)?.parse().ok())
                .flatten()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The perfpy sessions that rely on `pid`'s trampoline now (pids of perfpy processes), and
/// whether perfpy turned it on (the mark), for `info` and `inject --deactivate`.
pub fn users(pid: i32, start_time: u64) -> (Vec<u32>, bool) {
    let p = lock_path(pid, start_time);
    let Ok(m) = std::fs::symlink_metadata(&p) else {
        return (Vec::new(), false);
    };
    let marked = std::fs::read(&p).is_ok_and(|s| s == MARK);
    (holders_of(m.dev(), m.ino()), marked)
}

/// Clears the mark of `pid`'s trampoline (`perfpy inject --deactivate` turned it off by hand).
pub fn clear_mark(pid: i32, start_time: u64) {
    let p = lock_path(pid, start_time);
    if let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
    {
        let _ = f.set_len(0);
    }
}

/// Removes lock files of processes that no longer exist (a tmpfs file each; called now and then).
pub fn prune_stale() {
    let Ok(dir) = std::fs::read_dir(DIR) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("trampoline-")
            .and_then(|r| r.strip_suffix(".lock"))
        else {
            continue;
        };
        let Some((pid, start)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
            continue;
        };
        if crate::start_time(pid).is_ok_and(|t| t == start) {
            continue;
        }
        // A session may hold it for a process that just exited: only unlocked files go.
        if let Ok(f) = File::open(e.path()) {
            if flock(&f, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
