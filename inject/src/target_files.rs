//! Opening files that a profiled process controls, as root, without being led elsewhere.
//!
//! perfpy runs as root and reads files that its targets write or choose: perf maps
//! (`/tmp/perf-PID.map`), the files behind their mappings under `/proc/PID/root`, debug files.
//! A hostile target can make any of them a symbolic link (to `/etc/shadow`, into `/proc`), a
//! FIFO (an `open` that blocks), a device (`/dev/zero`: a read without end), a huge sparse file,
//! or a bind mount of another file in a mount namespace of its own. So every such file is:
//!
//! - resolved inside the target's root (`openat2` with `RESOLVE_IN_ROOT`: `..` and absolute
//!   symbolic links stay in it) and never through a `/proc` magic link
//!   (`RESOLVE_NO_MAGICLINKS`); with [`Rules::no_symlink`] the last component must not be a
//!   symbolic link at all (CPython writes its perf map as a plain file);
//! - opened as `O_PATH` first, so that nothing is opened for real (no FIFO waits for a writer,
//!   no device driver runs) before the descriptor is checked: a regular file, not on a
//!   pseudo-filesystem (`/proc`, `/sys`, …), owned by one of the accepted users, one link only
//!   where asked, not over the size cap; only then reopened for reading (`O_NONBLOCK`);
//! - read with a size cap, and the whole open-and-read bounded in time and by the caller's stop
//!   flag (a file on a FUSE mount of the target's can block any system call).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Why a file a target controls was not read. Each message names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}: no such file")]
    NotFound(PathBuf),
    #[error("{0}: a symbolic link; refused (CPython writes this file as a plain file, so a link was put there by someone else)")]
    Symlink(PathBuf),
    #[error("{0}: resolves outside the process's root directory or through /proc; refused")]
    Escapes(PathBuf),
    #[error("{path}: {kind}, not a regular file; refused")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{0}: on a kernel pseudo-filesystem (/proc, /sys, ...); refused")]
    PseudoFs(PathBuf),
    #[error("{path}: owned by uid {uid}, not by the process's user; refused")]
    Owner { path: PathBuf, uid: u32 },
    #[error("{path}: has {links} hard links (a perf map has one); refused")]
    Links { path: PathBuf, links: u64 },
    #[error("{path}: {size} bytes, more than the {cap} bytes accepted; refused")]
    TooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error(
        "{path}: not read within {secs:.1} s (a file on a slow or hostile file system?); skipped"
    )]
    Timeout { path: PathBuf, secs: f64 },
    #[error("{0}: reading stopped by a signal")]
    Interrupted(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a file must be to be accepted.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The last component must not be a symbolic link (links before it stay inside the root).
    pub no_symlink: bool,
    /// Accepted owners; empty: any owner. A perf map must be the process's own (root's only for
    /// a process of root's: a process can bind-mount a file of root's over its perf map in a
    /// mount namespace of its own).
    pub owners: Vec<u32>,
    /// The file must have exactly one hard link (a hard link to a file of another user is how a
    /// file elsewhere would be passed off as this one).
    pub single_link: bool,
    /// Largest size accepted, in bytes.
    pub max_bytes: u64,
    /// How long opening and reading may take; `None`: done on the caller's thread, unbounded
    /// (for files that are mapped afterwards anyway: a read through the mapping could not be
    /// bounded either, and a thread per file would cost more than the open).
    pub timeout: Option<Duration>,
}

impl Rules {
    /// A perf map written by a process whose user ids (real, effective, saved, file system)
    /// are `uids`: a plain file of that user, one link, at most 64 MiB (800 000 functions).
    pub fn perf_map(uids: &[u32]) -> Self {
        Rules {
            no_symlink: true,
            owners: uids.to_vec(),
            single_link: true,
            max_bytes: 64 << 20,
            timeout: Some(Duration::from_secs(5)),
        }
    }

    /// A file mapped by a process, or its debug file: owned by root or the process's user,
    /// links inside its root followed.
    pub fn mapped_file(uids: &[u32]) -> Self {
        let mut owners = uids.to_vec();
        owners.push(0);
        Rules {
            no_symlink: false,
            owners,
            single_link: false,
            max_bytes: 4 << 30,
            timeout: None,
        }
    }
}

/// Pseudo-filesystems whose "regular files" are views of the kernel or of other processes.
const PSEUDO_FS: [i64; 10] = [
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0xcafe_4a11, // bpf
    0x6265_6570, // configfs
    0x6367_7270, // cgroup2
    0x27e0eb,    // cgroup
    0xde5e_81e4, // efivarfs
];

/// Opens `path` (absolute or relative, as the target names it) inside the directory `root`
/// (a descriptor of `/proc/PID/root`, or of `/` for a process that shares ours), checked against
/// `rules`. Bounded by `rules.timeout` and `stop`.
pub fn open_in_root(
    root: BorrowedFd<'_>,
    path: &Path,
    rules: &Rules,
    stop: &AtomicBool,
) -> Result<File, Refused> {
    let dir = root.try_clone_to_owned().map_err(|source| Refused::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let p = path.to_path_buf();
    let r = rules.clone();
    bounded(path, rules.timeout, stop, move || {
        open_now(dir.as_raw_fd(), &p, &r)
    })
}

/// Opens a kernel-provided link to a file (`/proc/PID/map_files/START-END`: the exact file a
/// process mapped) with the same checks, without opening anything that is not a regular file.
pub fn open_link(path: &Path, rules: &Rules, stop: &AtomicBool) -> Result<File, Refused> {
    let p = path.to_path_buf();
    let r = rules.clone();
    bounded(path, rules.timeout, stop, move || {
        let c = cstring(&p)?;
        // SAFETY: `c` is a NUL-terminated path; the descriptor returned is ours to own.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io_refusal(&p, std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by open and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        check_and_reopen(fd, &p, &r)
    })
}

/// Reads a whole file opened by [`open_in_root`] or [`open_link`], up to `rules.max_bytes`,
/// within `rules.timeout` and stopping when `stop` is set.
pub fn read_all(
    file: File,
    path: &Path,
    rules: &Rules,
    stop: &AtomicBool,
) -> Result<Vec<u8>, Refused> {
    let p = path.to_path_buf();
    let cap = rules.max_bytes;
    bounded(path, rules.timeout, stop, move || {
        let mut out = Vec::new();
        file.take(cap.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|source| Refused::Io {
                path: p.clone(),
                source,
            })?;
        if out.len() as u64 > cap {
            // Grown since it was checked.
            return Err(Refused::TooLarge {
                path: p,
                size: out.len() as u64,
                cap,
            });
        }
        Ok(out)
    })
}

/// [`open_in_root`] then [`read_all`].
pub fn read_in_root(
    root: BorrowedFd<'_>,
    path: &Path,
    rules: &Rules,
    stop: &AtomicBool,
) -> Result<Vec<u8>, Refused> {
    let f = open_in_root(root, path, rules, stop)?;
    read_all(f, path, rules, stop)
}

/// The file behind a mapping `start..end` of `path` in process `pid`:
/// `/proc/PID/map_files/START-END` first (the exact file mapped, even if it was replaced or
/// lives in another mount namespace), else `path` inside the process's root (`root`, a
/// descriptor of its `/proc/PID/root` kept from when it was alive, or opened now). Returns the
/// path it was opened by, for messages.
pub fn open_mapped(
    pid: u32,
    root: Option<BorrowedFd<'_>>,
    (start, end): (u64, u64),
    path: &str,
    uids: &[u32],
    stop: &AtomicBool,
) -> Result<(PathBuf, File), Refused> {
    let rules = Rules::mapped_file(uids);
    let link = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    let first = match open_link(&link, &rules, stop) {
        Ok(f) => return Ok((link, f)),
        Err(e) => e,
    };
    let in_root = |root: BorrowedFd<'_>| {
        open_in_root(root, Path::new(path), &rules, stop)
            .map(|f| (PathBuf::from(format!("/proc/{pid}/root{path}")), f))
    };
    let r = match root {
        Some(r) => in_root(r),
        None => match File::open(format!("/proc/{pid}/root")) {
            Ok(r) => in_root(std::os::fd::AsFd::as_fd(&r)),
            Err(_) => Err(first),
        },
    };
    r.map_err(|e| {
        tracing::debug!(pid, path, "mapped file not opened: {e}");
        e
    })
}

fn open_now(dir: RawFd, path: &Path, rules: &Rules) -> Result<File, Refused> {
    let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    if rules.no_symlink {
        flags |= OFlag::O_NOFOLLOW;
    }
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    // Relative to the root: RESOLVE_IN_ROOT treats a leading '/' as the root anyway.
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let fd = match nix::fcntl::openat2(dir, rel, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::EXDEV) | Err(nix::errno::Errno::ELOOP) => {
            return Err(Refused::Escapes(path.to_path_buf()))
        }
        Err(e) => return Err(io_refusal(path, std::io::Error::from(e))),
    };
    // SAFETY: `fd` was just returned by openat2 and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    check_and_reopen(fd, path, rules)
}

/// Checks an `O_PATH` descriptor against the rules, then opens the very same inode for reading.
fn check_and_reopen(fd: OwnedFd, path: &Path, rules: &Rules) -> Result<File, Refused> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| io_refusal(path, std::io::Error::from(e)))?;
    let p = || path.to_path_buf();
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Err(Refused::Symlink(p()));
    }
    if kind != libc::S_IFREG {
        let kind = match kind {
            libc::S_IFIFO => "a FIFO",
            libc::S_IFCHR => "a character device",
            libc::S_IFBLK => "a block device",
            libc::S_IFSOCK => "a socket",
            libc::S_IFDIR => "a directory",
            _ => "a special file",
        };
        return Err(Refused::NotRegular { path: p(), kind });
    }
    // SAFETY: fstatfs writes into the zeroed struct we pass; `fd` is a valid descriptor.
    let fs_type = unsafe {
        let mut sfs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut sfs) != 0 {
            return Err(io_refusal(path, std::io::Error::last_os_error()));
        }
        sfs.f_type as i64
    };
    if PSEUDO_FS.contains(&fs_type) {
        return Err(Refused::PseudoFs(p()));
    }
    if !rules.owners.is_empty() && !rules.owners.contains(&st.st_uid) {
        return Err(Refused::Owner {
            path: p(),
            uid: st.st_uid,
        });
    }
    if rules.single_link && st.st_nlink != 1 {
        return Err(Refused::Links {
            path: p(),
            links: st.st_nlink,
        });
    }
    if st.st_size as u64 > rules.max_bytes {
        return Err(Refused::TooLarge {
            path: p(),
            size: st.st_size as u64,
            cap: rules.max_bytes,
        });
    }
    // Reopening our own O_PATH descriptor through /proc/self/fd gives the inode just checked,
    // whatever happened to the path meanwhile.
    let again = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: `again` is a NUL-terminated path; the descriptor returned is ours to own.
    let r = unsafe {
        libc::open(
            again.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io_refusal(path, std::io::Error::last_os_error()));
    }
    // SAFETY: `r` was just returned by open and is owned by no one else.
    Ok(unsafe { File::from_raw_fd(r) })
}

fn io_refusal(path: &Path, source: std::io::Error) -> Refused {
    match source.raw_os_error() {
        Some(libc::ENOENT) => Refused::NotFound(path.to_path_buf()),
        Some(libc::ELOOP) => Refused::Symlink(path.to_path_buf()),
        _ => Refused::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn cstring(path: &Path) -> Result<CString, Refused> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Refused::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
    })
}

/// Runs `work` on a thread of its own and waits for it at most `timeout`, or until `stop` is
/// set. A system call blocked for good (a FUSE file system that never answers) leaves that
/// thread behind, blocked; the caller goes on.
fn bounded<T: Send + 'static>(
    path: &Path,
    timeout: Option<Duration>,
    stop: &AtomicBool,
    work: impl FnOnce() -> Result<T, Refused> + Send + 'static,
) -> Result<T, Refused> {
    let Some(timeout) = timeout else {
        return work();
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("perfpy-read".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|source| Refused::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Refused::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("reader thread ended without an answer"),
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stop.load(Ordering::Relaxed) {
            return Err(Refused::Interrupted(path.to_path_buf()));
        }
        if start.elapsed() >= timeout {
            return Err(Refused::Timeout {
                path: path.to_path_buf(),
                secs: timeout.as_secs_f64(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{symlink, PermissionsExt};

    static NO_STOP: AtomicBool = AtomicBool::new(false);

    fn me() -> Vec<u32> {
        perfpy_process::proc::status(std::process::id())
            .unwrap()
            .uids
    }

    fn root_of(dir: &Path) -> File {
        File::open(dir).unwrap()
    }

    #[test]
    fn plain_file_is_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("tmp")).unwrap();
        std::fs::write(d.path().join("tmp/perf-1.map"), b"1000 10 py::f:a.py\n").unwrap();
        let r = root_of(d.path());
        let got = read_in_root(
            r.as_fd(),
            Path::new("/tmp/perf-1.map"),
            &Rules::perf_map(&me()),
            &NO_STOP,
        )
        .unwrap();
        assert_eq!(got, b"1000 10 py::f:a.py\n");
    }

    #[test]
    fn links_leaving_the_root_and_special_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tmp");
        std::fs::create_dir(&t).unwrap();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), b"secret").unwrap();
        symlink(secret.path(), t.join("abs.map")).unwrap();
        symlink("../../../../../../../etc/passwd", t.join("dotdot.map")).unwrap();
        symlink("/proc/self/environ", t.join("proc.map")).unwrap();
        nix::unistd::mkfifo(
            &t.join("fifo.map"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::fs::create_dir(t.join("dir.map")).unwrap();
        let r = root_of(d.path());
        let rules = Rules::perf_map(&me());
        for (name, want) in [
            ("abs.map", "symbolic link"),
            ("dotdot.map", "symbolic link"),
            ("proc.map", "symbolic link"),
            ("fifo.map", "FIFO"),
            ("dir.map", "directory"),
            ("missing.map", "no such file"),
        ] {
            let e = read_in_root(r.as_fd(), &Path::new("/tmp").join(name), &rules, &NO_STOP)
                .unwrap_err();
            assert!(e.to_string().contains(want), "{name}: {e}");
        }
        // Followed links stay inside the root: an absolute link names a file of the root.
        let follow = Rules::mapped_file(&me());
        let e = read_in_root(r.as_fd(), Path::new("/tmp/abs.map"), &follow, &NO_STOP).unwrap_err();
        assert!(matches!(e, Refused::NotFound(_)), "{e}");
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/passwd"), b"inside").unwrap();
        let got = read_in_root(r.as_fd(), Path::new("/tmp/dotdot.map"), &follow, &NO_STOP).unwrap();
        assert_eq!(got, b"inside");
        // A link to /proc/self/... inside the root is a magic link: never followed.
        let e = read_in_root(r.as_fd(), Path::new("/tmp/proc.map"), &follow, &NO_STOP).unwrap_err();
        assert!(
            matches!(e, Refused::NotFound(_) | Refused::Escapes(_)),
            "{e}"
        );
    }

    #[test]
    fn pseudo_files_owner_links_and_size_are_checked() {
        let slash = File::open("/").unwrap();
        let any = Rules {
            owners: vec![],
            ..Rules::mapped_file(&[])
        };
        let e =
            read_in_root(slash.as_fd(), Path::new("/proc/version"), &any, &NO_STOP).unwrap_err();
        assert!(matches!(e, Refused::PseudoFs(_)), "{e}");

        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f.map");
        std::fs::write(&f, b"x").unwrap();
        let r = root_of(d.path());
        let other = Rules::perf_map(&[4242]);
        let e = read_in_root(r.as_fd(), Path::new("f.map"), &other, &NO_STOP).unwrap_err();
        assert!(
            matches!(e, Refused::Owner { uid, .. } if uid == me()[0]),
            "{e}"
        );

        std::fs::hard_link(&f, d.path().join("g.map")).unwrap();
        let e = read_in_root(
            r.as_fd(),
            Path::new("g.map"),
            &Rules::perf_map(&me()),
            &NO_STOP,
        )
        .unwrap_err();
        assert!(matches!(e, Refused::Links { links: 2, .. }), "{e}");

        let big = d.path().join("big.map");
        let file = File::create(&big).unwrap();
        file.set_len(2 << 30).unwrap();
        let t = Instant::now();
        let e = read_in_root(
            r.as_fd(),
            Path::new("big.map"),
            &Rules::perf_map(&me()),
            &NO_STOP,
        )
        .unwrap_err();
        assert!(matches!(e, Refused::TooLarge { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
        let _ = std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600));
    }

    #[test]
    fn map_files_style_links_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("lib.so");
        std::fs::write(&f, b"\x7fELF").unwrap();
        let link = d.path().join("link");
        symlink(&f, &link).unwrap();
        let mut file = open_link(&link, &Rules::mapped_file(&me()), &NO_STOP).unwrap();
        let mut s = Vec::new();
        file.read_to_end(&mut s).unwrap();
        assert_eq!(s, b"\x7fELF");
        let e =
            open_link(Path::new("/dev/zero"), &Rules::mapped_file(&me()), &NO_STOP).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn a_stop_ends_a_blocked_read() {
        // A FIFO opened by a path that is not checked (the worst case: a blocked system call):
        // the bound returns, the blocked thread is left behind.
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        let r: Result<(), Refused> = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::Relaxed);
            });
            bounded(Path::new("x"), Some(Duration::from_secs(30)), &stop, || {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(())
            })
        });
        assert!(matches!(r, Err(Refused::Interrupted(_))));
        assert!(t.elapsed() < Duration::from_secs(2));
        let r: Result<(), Refused> = bounded(
            Path::new("y"),
            Some(Duration::from_millis(300)),
            &NO_STOP,
            || {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(())
            },
        );
        assert!(matches!(r, Err(Refused::Timeout { .. })));
    }
}
