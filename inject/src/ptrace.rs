//! Calling a function inside another process's thread with ptrace, as a guard value.
//!
//! [`Tracee::attach`] seizes one thread and interrupts it (other threads keep running), saving
//! its general registers (`NT_PRSTATUS`) and its FP/vector state (`NT_X86_XSTATE`).
//! [`Tracee::call`] runs one function with the System V ABI: the call frame is built below the
//! 128-byte red zone, 16-byte aligned, with return address 0 — the function's `ret` then faults
//! at address 0, which we recognise (SIGSEGV with RIP 0) and never let the target see.
//! `orig_rax` is set to -1 during our calls so that the kernel does not "restart" them; the
//! saved registers keep the interrupted system call's `orig_rax` and `-ERESTART*` value, so
//! when they are restored the kernel restarts that system call as if nothing had happened: a
//! `read` on a pipe keeps waiting, a `sleep` sleeps its remaining time.
//! Signals that arrive while we hold the thread are queued and delivered when it is released.
//! [`Drop`] restores the registers and every byte written, and detaches, on every path.

use std::time::{Duration, Instant};

use nix::sys::ptrace;
use nix::unistd::Pid;

use crate::InjectError;

const NT_X86_XSTATE: libc::c_int = 0x202;
const RED_ZONE: u64 = 128;

pub struct Tracee {
    pid: i32,
    tid: Pid,
    saved: libc::user_regs_struct,
    xstate: Vec<u8>,
    /// (address, original bytes) of everything we wrote, to put back.
    written: Vec<(u64, Vec<u8>)>,
    /// Raw signal numbers: real-time signals included (they queue and must each be delivered).
    queued: Vec<i32>,
    released: bool,
}

/// What a wait saw, with raw signal numbers (nix's `Signal` has no real-time signals).
enum Stop {
    /// A ptrace event stop (`PTRACE_EVENT_STOP` for our interrupt).
    Event(i32),
    /// A signal-delivery stop.
    Signal(i32),
    Exited,
    Other,
}

fn cont(tid: Pid, sig: i32) -> nix::Result<()> {
    // SAFETY: PTRACE_CONT on a tracee of ours in a stop; `sig` is a signal number or 0.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, tid.as_raw(), 0usize, sig as usize) };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

/// Whether the process has exited or is exiting (zombie, dead): ptrace then fails with EPERM or
/// ESRCH, which must not read as a permission problem.
fn exiting(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => matches!(s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()), Some("Z") | Some("X")),
        Err(_) => true,
    }
}

fn gone_or(e: nix::errno::Errno, pid: i32, what: &str) -> InjectError {
    if exiting(pid) {
        return InjectError::ProcessGone { pid };
    }
    match e {
        nix::errno::Errno::ESRCH => InjectError::ProcessGone { pid },
        nix::errno::Errno::EPERM | nix::errno::Errno::EACCES => InjectError::PermissionDenied {
            pid,
            detail: format!("{what}: {e}"),
        },
        _ => InjectError::Ptrace {
            pid,
            detail: format!("{what}: {e}"),
        },
    }
}

impl Tracee {
    /// Seizes and interrupts thread `tid` of process `pid`.
    pub fn attach(pid: i32, tid: i32, timeout: Duration) -> Result<Tracee, InjectError> {
        let t = Pid::from_raw(tid);
        ptrace::seize(t, ptrace::Options::PTRACE_O_TRACESYSGOOD)
            .map_err(|e| gone_or(e, pid, "PTRACE_SEIZE"))?;
        let mut me = Tracee {
            pid,
            tid: t,
            // SAFETY: user_regs_struct is plain integers; all-zero is a valid value, replaced
            // below before use.
            saved: unsafe { std::mem::zeroed() },
            xstate: Vec::new(),
            written: Vec::new(),
            queued: Vec::new(),
            released: false,
        };
        if let Err(e) = ptrace::interrupt(t) {
            me.released = true;
            // SAFETY: detaching the tracee we just seized.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, 0usize) };
            return Err(gone_or(e, pid, "PTRACE_INTERRUPT"));
        }
        // Wait for the interrupt stop; signals that arrive first are queued for later.
        let deadline = Instant::now() + timeout;
        loop {
            match me.wait(deadline)? {
                Stop::Event(ev) if ev == libc::PTRACE_EVENT_STOP => break,
                Stop::Signal(sig) => {
                    me.queued.push(sig);
                    cont(t, 0).map_err(|e| gone_or(e, pid, "PTRACE_CONT"))?;
                }
                Stop::Event(_) | Stop::Other => {
                    cont(t, 0).map_err(|e| gone_or(e, pid, "PTRACE_CONT"))?;
                }
                Stop::Exited => {
                    me.released = true;
                    return Err(InjectError::ProcessGone { pid });
                }
            }
        }
        me.saved = ptrace::getregs(t).map_err(|e| gone_or(e, pid, "PTRACE_GETREGS"))?;
        me.xstate = get_xstate(tid).map_err(|e| InjectError::Ptrace {
            pid,
            detail: format!("PTRACE_GETREGSET NT_X86_XSTATE: {e}"),
        })?;
        Ok(me)
    }

    pub fn regs(&self) -> &libc::user_regs_struct {
        &self.saved
    }

    fn wait(&mut self, deadline: Instant) -> Result<Stop, InjectError> {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status into our integer.
            let r = unsafe { libc::waitpid(self.tid.as_raw(), &mut status, libc::__WALL | libc::WNOHANG) };
            if r == 0 {
                if Instant::now() >= deadline {
                    return Err(InjectError::Timeout { pid: self.pid });
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            if r < 0 {
                match nix::errno::Errno::last() {
                    nix::errno::Errno::EINTR => continue,
                    nix::errno::Errno::ECHILD | nix::errno::Errno::ESRCH => {
                        self.released = true;
                        return Err(InjectError::ProcessGone { pid: self.pid });
                    }
                    e => return Err(gone_or(e, self.pid, "waitpid")),
                }
            }
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.released = true;
                return Ok(Stop::Exited);
            }
            if !libc::WIFSTOPPED(status) {
                return Ok(Stop::Other);
            }
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            return Ok(if event != 0 {
                Stop::Event(event)
            } else if sig == (libc::SIGTRAP | 0x80) {
                Stop::Other
            } else {
                Stop::Signal(sig)
            });
        }
    }

    /// Writes `bytes` at `addr` in the target, remembering what was there.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), InjectError> {
        let mut old = vec![0u8; bytes.len()];
        crate::sys::read_mem(self.pid, addr, &mut old).map_err(|e| InjectError::Ptrace {
            pid: self.pid,
            detail: format!("reading target memory: {e}"),
        })?;
        crate::sys::write_mem(self.pid, addr, bytes).map_err(|e| InjectError::Ptrace {
            pid: self.pid,
            detail: format!("writing target memory: {e}"),
        })?;
        self.written.push((addr, old));
        Ok(())
    }

    /// The lowest address of the area below the red zone that [`Tracee::call`] may use for data
    /// (strings) given their size; returns where to put `len` bytes.
    pub fn scratch(&self, len: usize) -> u64 {
        (self.saved.rsp - RED_ZONE - len as u64) & !0xf
    }

    /// Calls `func(args...)` in the thread and returns RAX. `below` is the lowest address in
    /// use by data we placed on the stack (the frame goes under it).
    pub fn call(
        &mut self,
        func: u64,
        args: &[u64],
        below: u64,
        timeout: Duration,
    ) -> Result<u64, InjectError> {
        assert!(args.len() <= 6, "at most six register arguments");
        let mut regs = self.saved;
        let sp = (below.min(self.saved.rsp - RED_ZONE) - 64) & !0xf;
        // The return address 0, as pushed by a `call`: RSP ≡ 8 (mod 16) at function entry.
        let ret_slot = sp - 8;
        self.write(ret_slot, &0u64.to_ne_bytes())?;
        regs.rsp = ret_slot;
        regs.rip = func;
        regs.rax = 0;
        // Not in a system call: the kernel must not apply restart logic to our call.
        regs.orig_rax = u64::MAX;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.rcx,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, a) in slots.into_iter().zip(args) {
            *slot = *a;
        }
        ptrace::setregs(self.tid, regs).map_err(|e| gone_or(e, self.pid, "PTRACE_SETREGS"))?;
        cont(self.tid, 0).map_err(|e| gone_or(e, self.pid, "PTRACE_CONT"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.wait(deadline)? {
                Stop::Signal(libc::SIGSEGV) => {
                    let r = ptrace::getregs(self.tid)
                        .map_err(|e| gone_or(e, self.pid, "PTRACE_GETREGS"))?;
                    if r.rip == 0 {
                        return Ok(r.rax);
                    }
                    // A real fault inside the function: let nothing run on; report.
                    return Err(InjectError::Ptrace {
                        pid: self.pid,
                        detail: format!("the injected call faulted at {:#x}", r.rip),
                    });
                }
                Stop::Signal(sig) => {
                    // Delivered when we release the thread, not now.
                    self.queued.push(sig);
                    cont(self.tid, 0).map_err(|e| gone_or(e, self.pid, "PTRACE_CONT"))?;
                }
                Stop::Exited => {
                    self.released = true;
                    return Err(InjectError::ProcessGone { pid: self.pid });
                }
                Stop::Event(_) | Stop::Other => {
                    cont(self.tid, 0).map_err(|e| gone_or(e, self.pid, "PTRACE_CONT"))?;
                }
            }
        }
    }

    /// Puts back memory and registers and lets the thread go, delivering queued signals.
    pub fn release(&mut self) -> Result<(), InjectError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut first_err = None;
        for (addr, old) in self.written.drain(..).rev() {
            if let Err(e) = crate::sys::write_mem(self.pid, addr, &old) {
                first_err.get_or_insert(InjectError::Ptrace {
                    pid: self.pid,
                    detail: format!("restoring target memory: {e}"),
                });
            }
        }
        if let Err(e) = ptrace::setregs(self.tid, self.saved) {
            first_err.get_or_insert(gone_or(e, self.pid, "PTRACE_SETREGS (restore)"));
        }
        if !self.xstate.is_empty() {
            if let Err(e) = set_xstate(self.tid.as_raw(), &mut self.xstate) {
                first_err.get_or_insert(InjectError::Ptrace {
                    pid: self.pid,
                    detail: format!("PTRACE_SETREGSET NT_X86_XSTATE: {e}"),
                });
            }
        }
        // The first queued signal is delivered by the detach itself; others are sent again
        // (real-time signals queue, so none is lost; standard ones merge as they always may).
        let first = if self.queued.is_empty() { 0 } else { self.queued.remove(0) };
        // SAFETY: PTRACE_DETACH of our tracee, delivering `first` (a signal number or 0).
        let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid.as_raw(), 0usize, first as usize) };
        if r < 0 {
            let e = nix::errno::Errno::last();
            if e != nix::errno::Errno::ESRCH {
                first_err.get_or_insert(gone_or(e, self.pid, "PTRACE_DETACH"));
            }
        }
        for sig in self.queued.drain(..) {
            // SAFETY: tgkill to a thread of the target with a signal that was meant for it.
            unsafe {
                libc::syscall(libc::SYS_tgkill, self.pid, self.tid.as_raw(), sig);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("releasing thread {} of {}: {e}", self.tid, self.pid);
        }
    }
}

fn get_xstate(tid: i32) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 16384];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into our buffer and updates
    // iov_len to the size written.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

fn set_xstate(tid: i32, buf: &mut [u8]) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_SETREGSET reads iov_len bytes from our buffer, which is exactly what
    // GETREGSET gave us.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
