//! Targets: checking pids before anything touches them, spawning a command so that sampling
//! starts exactly at its exec.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use perfpy_process::proc;

const PF_KTHREAD: u64 = 0x0020_0000;

/// Checks that `pid` names a user process we may profile; returns its thread-group id (a thread
/// id given by the user is taken as its process).
pub fn check_pid(pid: i32) -> Result<u32> {
    if pid <= 0 {
        bail!("invalid pid {pid}: give the id of a running process");
    }
    let stat = match proc::stat(pid as u32) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no process with pid {pid}: check the pid (it may have exited)")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read /proc/{pid}/stat")),
    };
    if stat.flags.unwrap_or(0) & PF_KTHREAD != 0 {
        bail!("pid {pid} is a kernel thread: perfpy profiles user processes (use `perf record -a` for the kernel)");
    }
    if stat.is_exited() {
        bail!("pid {pid} has exited (it is a zombie waiting for its parent)");
    }
    let status = proc::status(pid as u32).unwrap_or_default();
    let tgid = status.tgid.unwrap_or(pid as u32);
    // Reading another user's memory maps needs ptrace-read access: check it now, before any
    // event is opened, so the message names the real cause.
    if let Err(e) = std::fs::read_to_string(format!("/proc/{tgid}/maps")) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            if nix::unistd::geteuid().is_root() {
                bail!(
                    "permission denied reading /proc/{tgid}/maps although perfpy runs as root: it lacks CAP_SYS_PTRACE (a container: add --cap-add SYS_PTRACE, or run it in the host's PID namespace), or a security module (SELinux, AppArmor) forbids it"
                );
            }
            bail!(
                "permission denied reading /proc/{tgid}/maps: pid {tgid} belongs to another user; run perfpy as root (sudo), or as that user"
            );
        }
    }
    // Someone else (a debugger, strace, another profiler) traces it: nothing we do then is
    // safe to mix with theirs, and injecting would fail.
    if let Some(tracer) = status.tracer_pid.filter(|t| *t != 0) {
        let who = proc::comm(tracer, tracer).unwrap_or_default();
        tracing::warn!(pid, tracer, "traced by {}", who.trim());
        say!(
            "perfpy: warning: pid {pid} is being traced by pid {tracer} ({}): sampling works, but --inject-python will fail until it detaches",
            who.trim()
        );
    }
    if stat.state == 'T' {
        say!("perfpy: warning: pid {pid} is stopped (SIGSTOP or job control): it gives no samples until it continues (kill -CONT {pid})");
    }
    Ok(tgid)
}

/// The threads of a process now.
pub fn threads(pid: u32) -> Vec<u32> {
    proc::tasks(pid).unwrap_or_default()
}

/// Whether a process is gone (or a zombie).
pub fn is_gone(pid: u32) -> bool {
    proc::is_gone(pid)
}

/// A child forked and waiting for [`Spawned::release`] before it execs the command.
pub struct Spawned {
    pub pid: i32,
    go: Option<OwnedFd>,
    /// Closed by a successful exec (close-on-exec); the child writes its errno there if exec
    /// fails.
    exec_err: Option<OwnedFd>,
    prog: std::path::PathBuf,
}

/// Forks a child that waits on a pipe, then execs `argv` (looked up in PATH) with our
/// environment plus `extra_env` (variables already set are left as they are).
pub fn spawn(argv: &[String], extra_env: &[(&str, &str)]) -> Result<Spawned> {
    let prog = resolve_program(&argv[0])?;
    let prog_c = CString::new(prog.as_os_str().as_encoded_bytes())?;
    let args_c: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("command arguments must not contain NUL bytes")?;
    let mut args_p: Vec<*const libc::c_char> = args_c.iter().map(|a| a.as_ptr()).collect();
    args_p.push(std::ptr::null());
    let mut env_c: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    for (k, v) in extra_env {
        if std::env::var_os(k).is_none() {
            env_c.push(CString::new(format!("{k}={v}"))?);
        }
    }
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    let (err_rd, err_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: after fork the child only calls async-signal-safe functions (close, read, execve,
    // write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; the child never returns from this block.
        unsafe {
            // perfpy ignores SIGPIPE (a closed stderr must not kill it); the command gets the
            // default back, as a shell would give it (an ignored signal stays so across exec).
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::close(wr.as_raw_fd());
            let mut b = [0u8; 1];
            let n = libc::read(rd.as_raw_fd(), b.as_mut_ptr().cast(), 1);
            if n == 1 {
                libc::execve(prog_c.as_ptr(), args_p.as_ptr(), env_p.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(err_wr.as_raw_fd(), (&errno as *const i32).cast(), 4);
                libc::_exit(127);
            }
            libc::_exit(126);
        }
    }
    drop(rd);
    drop(err_wr);
    Ok(Spawned {
        pid,
        go: Some(wr),
        exec_err: Some(err_rd),
        prog,
    })
}

impl Spawned {
    /// Lets the child exec, and says why if it could not.
    pub fn release(&mut self) -> Result<()> {
        if let Some(fd) = self.go.take() {
            let _ = nix::unistd::write(&fd, b"x");
        }
        if let Some(fd) = self.exec_err.take() {
            let mut b = [0u8; 4];
            // Returns 0 bytes once the exec succeeded (the pipe closed with it).
            if let Ok(4) = nix::unistd::read(fd.as_raw_fd(), &mut b) {
                let e = std::io::Error::from_raw_os_error(i32::from_ne_bytes(b));
                bail!("cannot execute {}: {e}", self.prog.display());
            }
        }
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Closing the pipe without the go byte makes a child still waiting exit (126).
        self.go.take();
    }
}

fn resolve_program(name: &str) -> Result<std::path::PathBuf> {
    if name.contains('/') {
        let p = std::path::PathBuf::from(name);
        if !p.exists() {
            bail!("command not found: {name}");
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if let Ok(m) = std::fs::metadata(&p) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    bail!("command not found in PATH: {name}")
}

/// Ends a child of ours: SIGTERM, then SIGKILL after `grace`; reaps it and returns its status
/// as a shell would (128 + signal when killed).
pub fn terminate(pid: i32, grace: std::time::Duration) -> Option<i32> {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let p = nix::unistd::Pid::from_raw(pid);
    let status = |w: WaitStatus| match w {
        WaitStatus::Exited(_, c) => Some(c),
        WaitStatus::Signaled(_, s, _) => Some(128 + s as i32),
        _ => None,
    };
    let _ = kill(p, Signal::SIGTERM);
    let t = std::time::Instant::now();
    while t.elapsed() < grace {
        match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Ok(w) => return status(w),
            Err(_) => return None,
        }
    }
    let _ = kill(p, Signal::SIGKILL);
    waitpid(p, None).ok().and_then(status)
}

/// `roots` and every process under them now (children, theirs, …), from each process's
/// parent in `/proc/PID/stat`.
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for pid in proc::pids().unwrap_or_default() {
        if let Some(pp) = proc::stat(pid).ok().and_then(|s| s.ppid) {
            children.entry(pp).or_default().push(pid);
        }
    }
    let mut out = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            for &p in c {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        i += 1;
    }
    out
}
