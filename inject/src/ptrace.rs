//! Calling a function inside another process's thread with ptrace, as a guard value, such
//! that the thread is never left in a state it cannot get out of by itself — whatever happens
//! to perfpy (SIGKILL included) at any instruction.
//!
//! [`Tracee::attach`] seizes one thread and interrupts it (other threads keep running), saving
//! its general registers (`NT_PRSTATUS`), its FP/vector state (`NT_X86_XSTATE`) and its signal
//! mask. Before the first call, a **signal frame** is written below the 128-byte red zone, as
//! the kernel writes one for a signal handler: the interrupted registers (an interrupted
//! system call set up to run again, as after a handler with `SA_RESTART`), the FP state and
//! the signal mask. Every call then returns into code ending in `rt_sigreturn` (libc's
//! `__restore_rt`, or our own page's variant that first stores RAX), which puts all of that
//! back. So a call needs nothing from us to finish: if perfpy dies while the target runs it,
//! the function returns and the thread resumes exactly where it was interrupted.
//!
//! While we are alive, we follow the call with `PTRACE_SYSCALL` and take the thread back at
//! that `rt_sigreturn`: either for another call (the system call is then skipped) or to let it
//! go (detaching lets the `rt_sigreturn` restore everything). Until a call is made, releasing
//! restores the saved registers as they were. Signals that arrive while we hold the thread are
//! queued and sent again when it is released. Nothing else of the target is written: the
//! frame lies in free stack below the red zone.

use std::time::{Duration, Instant};

use nix::sys::ptrace;
use nix::unistd::Pid;
use perfpy_process::ReadMemory;

use crate::InjectError;

const NT_X86_XSTATE: libc::c_int = 0x202;
const RED_ZONE: u64 = 128;

/// Where an injected call returns: code that ends in `rt_sigreturn`.
#[derive(Clone, Copy, Debug)]
pub enum Return {
    /// libc's `__restore_rt` (`mov rax, 15; syscall`): the return value is lost.
    Libc(u64),
    /// Our own page's code ([`GADGET`] at `at`): stores RAX at `slot`, then `rt_sigreturn`.
    Page { at: u64, slot: u64 },
}

impl Return {
    fn code_range(self) -> std::ops::Range<u64> {
        match self {
            Return::Libc(a) => a..a + 9,
            Return::Page { at, .. } => at..at + GADGET.len() as u64,
        }
    }
}

/// Our return code, placed with [`GADGET_SLOT`] 8-byte slot right after it:
/// `mov [rip+2], rax; mov eax, 15; syscall`, then the slot (2 bytes of padding first).
pub const GADGET: &[u8] = &[
    0x48, 0x89, 0x05, 0x09, 0x00, 0x00, 0x00, // mov [rip+9], rax   (→ GADGET_SLOT)
    0xb8, 0x0f, 0x00, 0x00, 0x00, // mov eax, 15 (rt_sigreturn)
    0x0f, 0x05, // syscall
    0x90, 0x90, // padding: the slot is 8-aligned at +16
];
/// Offset of the return-value slot from the start of [`GADGET`].
pub const GADGET_SLOT: u64 = 16;

/// Where the thread is, as far as our calls go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Stopped where we interrupted it; its registers are the saved ones.
    Interrupted,
    /// Running a call of ours: it will return through the signal frame by itself.
    InCall,
    /// Stopped at the `rt_sigreturn` of a finished call: letting it go restores everything.
    AtSigreturn,
    /// A call faulted: the saved registers must be put back.
    Faulted,
}

pub struct Tracee {
    pid: i32,
    tid: Pid,
    saved: libc::user_regs_struct,
    xstate: Vec<u8>,
    /// The thread's blocked signals when interrupted.
    sigmask: u64,
    /// Address of the signal frame, once written.
    frame: Option<u64>,
    state: State,
    /// Raw signal numbers: real-time signals included (they queue and must each be delivered).
    queued: Vec<i32>,
    released: bool,
}

/// System calls during which the thread's blocked mask is a temporary one (the real one is
/// kept by the kernel where we cannot read it): a signal frame made there would keep the
/// temporary mask for good. Threads in them are not used.
pub const TEMPORARY_MASK_SYSCALLS: &[i64] = &[
    128, // rt_sigtimedwait
    130, // rt_sigsuspend
    270, // pselect6
    271, // ppoll
    281, // epoll_pwait
    333, // io_pgetevents
    441, // epoll_pwait2
];

const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// uc_flags: UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS.
const UC_FLAGS: u64 = 1 | 2 | 4;
/// `struct ucontext` (kernel): flags, link, stack_t (24), sigcontext (256), sigset (8).
const UCONTEXT_SIZE: u64 = 8 + 8 + 24 + 256 + 8;
/// `struct rt_sigframe`: pretcode, ucontext, siginfo (128).
const SIGFRAME_SIZE: u64 = 8 + UCONTEXT_SIZE + 128;

/// What a wait saw, with raw signal numbers (nix's `Signal` has no real-time signals).
enum Stop {
    /// A ptrace event stop (`PTRACE_EVENT_STOP` for our interrupt).
    Event(i32),
    /// A signal-delivery stop.
    Signal(i32),
    Exited,
    Other,
}

fn syscall_cont(tid: Pid, sig: i32) -> nix::Result<()> {
    // SAFETY: PTRACE_SYSCALL on a tracee of ours in a stop; `sig` is a signal number or 0.
    let r = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid.as_raw(), 0usize, sig as usize) };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

/// The blocked-signal mask of a thread (`SigBlk` in its status).
fn blocked_signals(pid: i32, tid: i32) -> Option<u64> {
    perfpy_process::proc::task_status(pid as u32, tid as u32)
        .ok()?
        .sig_blk
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
    perfpy_process::proc::is_gone(pid as u32)
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
            sigmask: 0,
            frame: None,
            state: State::Interrupted,
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
        me.sigmask = blocked_signals(pid, tid).ok_or(InjectError::ProcessGone { pid })?;
        Ok(me)
    }

    pub fn regs(&self) -> &libc::user_regs_struct {
        &self.saved
    }

    fn wait(&mut self, deadline: Instant) -> Result<Stop, InjectError> {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status into our integer.
            let r = unsafe {
                libc::waitpid(self.tid.as_raw(), &mut status, libc::__WALL | libc::WNOHANG)
            };
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

    /// Whether the thread's signal mask can be restored exactly (see
    /// [`TEMPORARY_MASK_SYSCALLS`]).
    pub fn mask_is_exact(&self) -> bool {
        !TEMPORARY_MASK_SYSCALLS.contains(&(self.saved.orig_rax as i64))
    }

    /// Writes the signal frame below the red zone (once): the registers to resume with, the
    /// FP state, the signal mask.
    fn frame(&mut self) -> Result<u64, InjectError> {
        if let Some(f) = self.frame {
            return Ok(f);
        }
        if !self.mask_is_exact() {
            return Err(InjectError::Ptrace {
                pid: self.pid,
                detail: "the thread waits with a temporary signal mask".into(),
            });
        }
        let s = &self.saved;
        // The interrupted system call is made again on return, as after a signal handler
        // installed with SA_RESTART (the saved RAX holds the kernel's -ERESTART* code).
        let mut r = *s;
        if (s.orig_rax as i64) >= 0 {
            match s.rax as i64 {
                -514..=-512 => {
                    r.rax = s.orig_rax;
                    r.rip -= 2;
                }
                // ERESTART_RESTARTBLOCK: the kernel's restart_syscall resumes it.
                -516 => {
                    r.rax = 219;
                    r.rip -= 2;
                }
                _ => {}
            }
        }
        // FP state: the XSAVE image PTRACE_GETREGSET gave, whose software-reserved bytes
        // (464..512) hold XCR0 there; a signal frame wants them to describe the image
        // (`struct _fpx_sw_bytes`), and the closing magic after it.
        let mut fp = self.xstate.clone();
        if fp.len() < 576 {
            return Err(InjectError::Ptrace {
                pid: self.pid,
                detail: format!(
                    "unexpected XSAVE image of {} bytes from PTRACE_GETREGSET",
                    fp.len()
                ),
            });
        }
        let xcr0 = u64::from_ne_bytes(fp[464..472].try_into().unwrap_or_default());
        let size = fp.len() as u32;
        let mut sw = Vec::with_capacity(48);
        sw.extend_from_slice(&FP_XSTATE_MAGIC1.to_ne_bytes());
        sw.extend_from_slice(&(size + 4).to_ne_bytes()); // extended_size
        sw.extend_from_slice(&xcr0.to_ne_bytes()); // xfeatures
        sw.extend_from_slice(&size.to_ne_bytes()); // xstate_size
        sw.resize(48, 0);
        fp[464..512].copy_from_slice(&sw);
        fp.extend_from_slice(&FP_XSTATE_MAGIC2.to_ne_bytes());
        let fp_at = (s.rsp - RED_ZONE - fp.len() as u64) & !63;
        // RSP at function entry must be ≡ 8 (mod 16), pointing at the return address (the
        // frame's first word).
        let f = ((fp_at - SIGFRAME_SIZE) & !15) - 8;

        let mut uc = Vec::with_capacity(UCONTEXT_SIZE as usize);
        let mut put = |v: u64| uc.extend_from_slice(&v.to_ne_bytes());
        put(UC_FLAGS);
        put(0); // uc_link
        put(0); // uc_stack.ss_sp
                // ss_flags: an invalid mode, so that rt_sigreturn leaves the alternate signal stack
                // as it is (the kernel ignores everything but a fault in restoring it).
        put(3);
        put(0); // ss_size
        for v in [
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
            r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
        ] {
            put(v);
        }
        // cs, gs, fs, ss (16 bits each).
        put((r.cs & 0xffff) | ((r.ss & 0xffff) << 48));
        put(0); // err
        put(0); // trapno
        put(self.sigmask); // oldmask
        put(0); // cr2
        put(fp_at); // fpstate
        for _ in 0..8 {
            put(0);
        }
        put(self.sigmask); // uc_sigmask
        debug_assert_eq!(uc.len() as u64, UCONTEXT_SIZE);
        self.write(fp_at, &fp)?;
        self.write(f + 8, &uc)?;
        self.write(f + 8 + UCONTEXT_SIZE, &[0u8; 128])?;
        self.frame = Some(f);
        Ok(f)
    }

    /// Writes `bytes` at `addr` in the target.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), InjectError> {
        crate::sys::write_mem(self.pid, addr, bytes).map_err(|e| InjectError::Ptrace {
            pid: self.pid,
            detail: format!("writing target memory: {e}"),
        })
    }

    /// Calls `func(args...)` in the thread, returning through `ret`; the result is RAX when
    /// `ret` keeps it. On a timeout the call goes on by itself and `release` lets it finish.
    pub fn call(
        &mut self,
        func: u64,
        args: &[u64],
        ret: Return,
        timeout: Duration,
    ) -> Result<Option<u64>, InjectError> {
        assert!(args.len() <= 6, "at most six register arguments");
        if !matches!(self.state, State::Interrupted | State::AtSigreturn) {
            return Err(InjectError::Ptrace {
                pid: self.pid,
                detail: "a call is still running".into(),
            });
        }
        let f = self.frame()?;
        let ret_addr = match ret {
            Return::Libc(a) => a,
            Return::Page { at, .. } => at,
        };
        self.write(f, &ret_addr.to_ne_bytes())?;
        let mut regs = self.saved;
        regs.rsp = f;
        regs.rip = func;
        regs.rax = 0;
        // The direction flag is clear at a call (System V ABI).
        regs.eflags &= !0x400;
        // Not (or no longer) in a system call: no restart logic, and at the stop of a previous
        // call's rt_sigreturn that system call is skipped.
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
        // From here on the thread finishes the call by itself, perfpy alive or not.
        self.state = State::InCall;
        syscall_cont(self.tid, 0).map_err(|e| gone_or(e, self.pid, "PTRACE_SYSCALL"))?;
        let back = ret.code_range();
        let deadline = Instant::now() + timeout;
        loop {
            match self.wait(deadline)? {
                Stop::Other => {
                    // A system call stop: ours is the rt_sigreturn in the return code.
                    let r = ptrace::getregs(self.tid)
                        .map_err(|e| gone_or(e, self.pid, "PTRACE_GETREGS"))?;
                    if r.orig_rax == 15 && back.contains(&r.rip.wrapping_sub(2)) {
                        self.state = State::AtSigreturn;
                        return match ret {
                            Return::Libc(_) => Ok(None),
                            Return::Page { slot, .. } => {
                                let mut b = [0u8; 8];
                                perfpy_process::LiveMemory(self.pid as u32)
                                    .read_exact(slot, &mut b)
                                    .map_err(|e| InjectError::Ptrace {
                                        pid: self.pid,
                                        detail: format!("reading the call's result: {e}"),
                                    })?;
                                Ok(Some(u64::from_ne_bytes(b)))
                            }
                        };
                    }
                    syscall_cont(self.tid, 0)
                        .map_err(|e| gone_or(e, self.pid, "PTRACE_SYSCALL"))?;
                }
                Stop::Signal(
                    sig @ (libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE),
                ) => {
                    // A fault inside the function: it cannot go on; the saved state goes back.
                    let r = ptrace::getregs(self.tid)
                        .map_err(|e| gone_or(e, self.pid, "PTRACE_GETREGS"))?;
                    self.state = State::Faulted;
                    return Err(InjectError::Ptrace {
                        pid: self.pid,
                        detail: format!("the injected call got signal {sig} at {:#x}", r.rip),
                    });
                }
                Stop::Signal(sig) => {
                    // Sent again when we release the thread.
                    self.queued.push(sig);
                    syscall_cont(self.tid, 0)
                        .map_err(|e| gone_or(e, self.pid, "PTRACE_SYSCALL"))?;
                }
                Stop::Exited => {
                    self.released = true;
                    return Err(InjectError::ProcessGone { pid: self.pid });
                }
                Stop::Event(_) => {
                    syscall_cont(self.tid, 0)
                        .map_err(|e| gone_or(e, self.pid, "PTRACE_SYSCALL"))?;
                }
            }
        }
    }

    /// Lets the thread go: as interrupted if no call was made, through the signal frame
    /// otherwise; queued signals are sent again.
    pub fn release(&mut self) -> Result<(), InjectError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let mut first_err = None;
        match self.state {
            State::Interrupted | State::Faulted => {
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
            }
            // Stopped at the rt_sigreturn: detaching lets it restore everything.
            State::AtSigreturn => {}
            State::InCall => {
                // Running our call (we gave up waiting): stop it wherever it is and detach
                // without touching it; it returns through the signal frame when done.
                let _ = ptrace::interrupt(self.tid);
                let deadline = Instant::now() + Duration::from_secs(2);
                if let Ok(Stop::Signal(sig)) = self.wait(deadline) {
                    self.queued.push(sig);
                }
            }
        }
        // Signals are sent again after the detach (a signal given to PTRACE_DETACH from a
        // system call stop would be lost); real-time ones queue, so none is lost.
        // SAFETY: PTRACE_DETACH of our tracee, in a stop, with no signal.
        let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid.as_raw(), 0usize, 0usize) };
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
