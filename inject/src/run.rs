//! Where and how the injected Python code runs, so that it cannot deadlock the target.
//!
//! Hijacking a thread at an arbitrary instruction is unsafe: it may hold the allocator's lock
//! or the GIL's internal mutex, and the Python code we run would wait for it forever. So:
//!
//! 1. **A thread blocked in a waiting system call** (`read`, `recvfrom`, `select`, `poll`,
//!    `epoll_wait`, `nanosleep`, `clock_nanosleep`, `wait4`, `accept`, …; from
//!    `/proc/PID/task/TID/syscall`). CPython releases the GIL around every such call and the
//!    thread holds no allocator lock there. We interrupt it and call, in it,
//!    `PyGILState_Ensure()`, `PyRun_SimpleString(code)`, `PyGILState_Release()`; its system
//!    call is then restarted as if nothing happened.
//! 2. **Otherwise** (every thread busy), we interrupt one thread only long enough to call two
//!    functions that take no lock it could hold: libc's `mmap` (a page for a small machine-code
//!    stub and the code text) and `_PyEval_AddPendingCall(main interpreter, stub, block, 0)`
//!    (`Py_AddPendingCall` where the internal symbol is not available). We first check that the
//!    thread is not inside the pending-call machinery itself. The interpreter runs the stub at
//!    its next safe point (between bytecodes, GIL held), the stub calls
//!    `PyRun_SimpleString(code)` and sets a flag that we poll; then the page is unmapped.
//!
//! The code is one expression (no name bound in `__main__`, nothing printed on success) that
//! records the trampoline state before and after its action in a file under the target's
//! `/tmp`, which we read through `/proc/PID/root` and delete.

use std::time::{Duration, Instant};

use crate::ptrace::{Return, Tracee, GADGET, GADGET_SLOT};
use crate::{InjectError, PythonProcess, TrampolineState};
use perfpy_process::ReadMemory;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Query,
    On,
    Off,
}

/// System calls in which a thread waits with the GIL released and no lock of ours held.
const WAITING_SYSCALLS: &[i64] = &[
    0,   // read
    7,   // poll
    23,  // select
    35,  // nanosleep
    43,  // accept
    45,  // recvfrom
    47,  // recvmsg
    61,  // wait4
    230, // clock_nanosleep
    232, // epoll_wait
    247, // waitid
    288, // accept4
         // Not ppoll, pselect6, epoll_pwait: they wait with a temporary signal mask (see
         // ptrace::TEMPORARY_MASK_SYSCALLS).
];

fn code(action: Action, result_path: &str) -> String {
    let act = match action {
        Action::Query => "None",
        Action::On => {
            "None if s.is_stack_trampoline_active() else s.activate_stack_trampoline('perf')"
        }
        Action::Off => "s.deactivate_stack_trampoline()",
    };
    format!(
        "(lambda s, o: o({result_path:?}, 'w').write('%d %d' % (s.is_stack_trampoline_active(), [{act}, s.is_stack_trampoline_active()][1])))(__import__('sys'), __import__('builtins').open)"
    )
}

fn threads(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = perfpy_process::proc::tasks(pid as u32)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t as i32)
        .collect();
    // The main thread first: it is the one most likely to be waiting in a server.
    v.sort_by_key(|t| *t != pid);
    v
}

/// The system call a thread is blocked in, if any.
fn blocked_in(pid: i32, tid: i32) -> Option<i64> {
    let nr = perfpy_process::proc::task_syscall(pid as u32, tid as u32)?.nr;
    // A thread reported in a syscall may still be running (the file is a snapshot): the state
    // must say it sleeps.
    let stat = perfpy_process::proc::task_stat(pid as u32, tid as u32).ok()?;
    (stat.state == 'S').then_some(nr)
}

pub fn inject(
    p: &PythonProcess,
    action: Action,
    timeout: Duration,
) -> Result<TrampolineState, InjectError> {
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ (p.pid as u128) << 20 ^ rand_u64() as u128
    );
    let rel = format!("/tmp/.perfpy-inject-{nonce}");
    let host_result = format!("/proc/{}/root{rel}", p.pid);
    let _ = std::fs::remove_file(&host_result);
    let text = code(action, &rel);
    let deadline = Instant::now() + timeout;

    // 1. A waiting thread: run it right there. A thread that is between two waits (a server
    // answering a request) is looked for during 100 ms before we fall back to a pending call.
    let mut done = false;
    let look_until = Instant::now() + Duration::from_millis(100);
    'look: loop {
        for tid in threads(p.pid) {
            match blocked_in(p.pid, tid) {
                Some(nr) if WAITING_SYSCALLS.contains(&nr) => {}
                _ => continue,
            }
            tracing::debug!(
                pid = p.pid,
                tid,
                "injecting in a thread waiting in a system call"
            );
            let mut t = Tracee::attach(p.pid, tid, Duration::from_secs(2))?;
            // Still in that system call? (It may have returned between the look and the stop.)
            let nr = t.regs().orig_rax as i64;
            if !WAITING_SYSCALLS.contains(&nr) || !t.mask_is_exact() {
                t.release()?;
                continue;
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            // One call of our own code, which takes the GIL, runs the text and gives the GIL
            // back: whatever happens to us meanwhile, the thread finishes it and resumes its
            // system call (see ptrace.rs).
            let page = map_page(&mut t, p)?;
            let b = page + BLOCK;
            let mut mem = page_image(THUNK, &text);
            for (off, v) in [
                (0, sym(p, "PyGILState_Ensure")?),
                (8, sym(p, "PyRun_SimpleString")?),
                (16, page + TEXT),
                (32, sym(p, "PyGILState_Release")?),
            ] {
                mem[(BLOCK + off) as usize..(BLOCK + off + 8) as usize]
                    .copy_from_slice(&v.to_ne_bytes());
            }
            t.write(page, &mem)?;
            t.call(
                page,
                &[b],
                Return::Page {
                    at: page + RET,
                    slot: page + RET + GADGET_SLOT,
                },
                left,
            )?;
            let mut blk = [0u8; 48];
            perfpy_process::LiveMemory(p.pid as u32)
                .read_exact(b, &mut blk)
                .map_err(|_| InjectError::ProcessGone { pid: p.pid })?;
            unmap_page(&mut t, p, page);
            t.release()?;
            if u32::from_ne_bytes(blk[40..44].try_into().unwrap_or_default()) != 1 {
                return Err(InjectError::Failed {
                    pid: p.pid,
                    detail: "the injected code did not finish".into(),
                });
            }
            if i32::from_ne_bytes(blk[28..32].try_into().unwrap_or_default()) != 0 {
                return Err(InjectError::Failed {
                    pid: p.pid,
                    detail: "PyRun_SimpleString raised (see the target's stderr)".into(),
                });
            }
            done = true;
            break 'look;
        }
        if Instant::now() >= look_until {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    // 2. Every thread busy: a pending call, run by the interpreter at a safe point.
    if !done {
        pending(p, &text, deadline)?;
    }
    read_result(p.pid, &host_result)
}

fn sym(p: &PythonProcess, name: &str) -> Result<u64, InjectError> {
    p.symbol(name)
        .ok_or_else(|| InjectError::NoLibpythonSymbols {
            pid: p.pid,
            interpreter: p.interpreter_name.clone(),
            missing: name.into(),
        })
}

fn read_result(pid: i32, path: &str) -> Result<TrampolineState, InjectError> {
    // The target's own /tmp: the file is read as any file the target controls (a link or a
    // FIFO put in its place is refused, not followed or waited on).
    let rel = path
        .strip_prefix(&format!("/proc/{pid}/root"))
        .unwrap_or(path);
    let failed = |e: String| InjectError::Failed {
        pid,
        detail: format!("no result from the injected code ({path}: {e})"),
    };
    let root =
        std::fs::File::open(format!("/proc/{pid}/root")).map_err(|e| failed(e.to_string()))?;
    let uids = perfpy_process::proc::status(pid as u32)
        .map(|s| s.uids)
        .unwrap_or_default();
    let rules = crate::target_files::Rules {
        max_bytes: 64,
        ..crate::target_files::Rules::perf_map(&uids)
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let bytes = crate::target_files::read_in_root(
        std::os::fd::AsFd::as_fd(&root),
        std::path::Path::new(rel),
        &rules,
        &stop,
    )
    .map_err(|e| failed(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let _ = std::fs::remove_file(path);
    let mut it = text.split_whitespace().map(|v| v == "1");
    match (it.next(), it.next()) {
        (Some(before), Some(after)) => Ok(TrampolineState { before, after }),
        _ => Err(InjectError::Failed {
            pid,
            detail: format!("unexpected result {text:?}"),
        }),
    }
}

/// The stub run as a pending call: `rdi` = block; block = [code ptr, &PyRun_SimpleString,
/// result i32, done i32, cancelled i32]. A cancelled stub runs nothing (we gave up waiting).
const STUB: &[u8] = &[
    0x53, // push rbx
    0x48, 0x89, 0xfb, // mov rbx, rdi
    0x83, 0x7b, 0x18, 0x00, // cmp dword [rbx+24], 0   (cancelled by perfpy?)
    0x75, 0x0c, // jne skip
    0x48, 0x8b, 0x3b, // mov rdi, [rbx]
    0x48, 0x8b, 0x43, 0x08, // mov rax, [rbx+8]
    0xff, 0xd0, // call rax
    0x89, 0x43, 0x10, // mov [rbx+16], eax
    // skip:
    0xc7, 0x43, 0x14, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+20], 1
    0x31, 0xc0, // xor eax, eax
    0x5b, // pop rbx
    0xc3, // ret
];
/// Our code for a waiting thread: `rdi` = block = [&PyGILState_Ensure, &PyRun_SimpleString,
/// code ptr, gstate i32 @24, result i32 @28, &PyGILState_Release @32, done i32 @40].
const THUNK: &[u8] = &[
    0x53, // push rbx                (entry RSP ≡ 8 mod 16: calls below are aligned)
    0x48, 0x89, 0xfb, // mov rbx, rdi
    0xff, 0x13, // call [rbx]            PyGILState_Ensure()
    0x89, 0x43, 0x18, // mov [rbx+24], eax
    0x48, 0x8b, 0x7b, 0x10, // mov rdi, [rbx+16]
    0xff, 0x53, 0x08, // call [rbx+8]          PyRun_SimpleString(code)
    0x89, 0x43, 0x1c, // mov [rbx+28], eax
    0x8b, 0x7b, 0x18, // mov edi, [rbx+24]
    0xff, 0x53, 0x20, // call [rbx+32]         PyGILState_Release(gstate)
    0xc7, 0x43, 0x28, 0x01, 0x00, 0x00, 0x00, // mov dword [rbx+40], 1
    0x31, 0xc0, // xor eax, eax
    0x5b, // pop rbx
    0xc3, // ret                    (into the return code at RET)
];
const PAGE: u64 = 4096;
/// Page layout: code (THUNK or STUB) at 0, our return code at RET, the block, the text.
const RET: u64 = 64;
const BLOCK: u64 = 128;
const TEXT: u64 = 192;
/// MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE.
const MAP_FLAGS: u64 = 0x02 | 0x20 | 0x10_0000;

/// The page's bytes: `code` at 0, the return code at RET, a zeroed block, `text` (with its
/// NUL) at TEXT.
fn page_image(code: &[u8], text: &str) -> Vec<u8> {
    let mut mem = vec![0u8; TEXT as usize + text.len() + 1];
    mem[..code.len()].copy_from_slice(code);
    mem[RET as usize..RET as usize + GADGET.len()].copy_from_slice(GADGET);
    mem[TEXT as usize..TEXT as usize + text.len()].copy_from_slice(text.as_bytes());
    mem
}

/// A free page-aligned address in `pid`'s address space, below its lowest library (where the
/// kernel puts new mappings), at a random distance so that no other mapping races us there.
fn free_address(pid: i32) -> Result<u64, InjectError> {
    let maps = crate::read_maps(pid)?;
    let mut spans: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    spans.sort_unstable();
    let lowest_lib = maps
        .iter()
        .filter(|m| m.path.starts_with('/') && m.start >= 0x7000_0000_0000)
        .map(|m| m.start)
        .min()
        .unwrap_or(0x7f00_0000_0000);
    for attempt in 0..64u64 {
        let below = (16 + (rand_u64() % 4096) + attempt * 4096) * PAGE;
        let Some(at) = lowest_lib.checked_sub(below) else {
            continue;
        };
        if !spans.iter().any(|&(s, e)| s < at + PAGE && at < e) {
            return Ok(at);
        }
    }
    Err(InjectError::Failed {
        pid,
        detail: "no free address for a page in the target".into(),
    })
}

/// Maps a read-write-execute page in the target through libc's `mmap` (at a free address of
/// our choosing, so that the call needs no return value) and checks that it is there.
fn map_page(t: &mut Tracee, p: &PythonProcess) -> Result<u64, InjectError> {
    let (mmap, restore) = (libc_fn(p, "mmap")?, libc_fn(p, "__restore_rt")?);
    let at = free_address(p.pid)?;
    t.call(
        mmap,
        &[at, PAGE, 7, MAP_FLAGS, u64::MAX, 0],
        Return::Libc(restore),
        Duration::from_secs(2),
    )?;
    let ours = crate::read_maps(p.pid)?
        .iter()
        .any(|m| m.start == at && m.end == at + PAGE && m.path.is_empty());
    if !ours {
        return Err(InjectError::Failed {
            pid: p.pid,
            detail: "mmap in the target failed".into(),
        });
    }
    Ok(at)
}

/// Unmaps our page with the thread `t` holds, which must not be running in it.
fn unmap_page(t: &mut Tracee, p: &PythonProcess, page: u64) {
    if let (Ok(munmap), Ok(restore)) = (libc_fn(p, "munmap"), libc_fn(p, "__restore_rt")) {
        if let Err(e) = t.call(
            munmap,
            &[page, PAGE],
            Return::Libc(restore),
            Duration::from_secs(2),
        ) {
            tracing::debug!(pid = p.pid, "munmap of our page: {e}");
        }
    }
}

fn libc_fn(p: &PythonProcess, name: &str) -> Result<u64, InjectError> {
    p.libc
        .get(name)
        .copied()
        .ok_or_else(|| InjectError::NoLibpythonSymbols {
            pid: p.pid,
            interpreter: "libc".into(),
            missing: name.into(),
        })
}

/// Runs `text` in the target through the interpreter's pending-call queue: a stub in a page
/// of our own is queued, the interpreter runs it at its next check, the page is unmapped.
fn pending(p: &PythonProcess, text: &str, deadline: Instant) -> Result<(), InjectError> {
    if text.len() as u64 + TEXT + 1 > PAGE {
        return Err(InjectError::Failed {
            pid: p.pid,
            detail: "code too long".into(),
        });
    }
    let page = queue_pending(p, text, deadline)?;
    let result = wait_for_stub(p, page, deadline)?;
    unmap_when_safe(p, page)?;
    if result != 0 {
        return Err(InjectError::Failed {
            pid: p.pid,
            detail: "PyRun_SimpleString raised (see the target's stderr)".into(),
        });
    }
    Ok(())
}

/// Queues the stub that runs `text`, from a thread stopped where none of the queue's locks
/// can be held; returns the stub's page.
fn queue_pending(p: &PythonProcess, text: &str, deadline: Instant) -> Result<u64, InjectError> {
    let forbidden: Vec<std::ops::Range<u64>> = perfpy_process::elf::PENDING_FUNCTIONS
        .iter()
        .filter_map(|f| p.symbol_range(f))
        .collect();
    let add_internal = p
        .symbol("_PyEval_AddPendingCall")
        .zip(p.symbol("PyInterpreterState_Main"));
    let mut tries = 0;
    loop {
        tries += 1;
        if Instant::now() >= deadline || tries > 1000 {
            return Err(InjectError::Timeout { pid: p.pid });
        }
        // Any thread will do for the two calls (no lock of theirs can be held there, checked
        // below); the main thread first.
        let tids = threads(p.pid);
        let tid = tids[(tries - 1) % tids.len().max(1)..]
            .first()
            .copied()
            .ok_or(InjectError::ProcessGone { pid: p.pid })?;
        let mut t = Tracee::attach(p.pid, tid, Duration::from_secs(2))?;
        let rip = t.regs().rip;
        if forbidden.iter().any(|r| r.contains(&rip)) || !t.mask_is_exact() {
            t.release()?;
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let addr = map_page(&mut t, p)?;
        let mut mem = page_image(STUB, text);
        let b = BLOCK as usize;
        mem[b..b + 8].copy_from_slice(&(addr + TEXT).to_ne_bytes());
        mem[b + 8..b + 16].copy_from_slice(&sym(p, "PyRun_SimpleString")?.to_ne_bytes());
        t.write(addr, &mem)?;
        let ret = Return::Page {
            at: addr + RET,
            slot: addr + RET + GADGET_SLOT,
        };
        let r = match add_internal {
            // Not main-thread-only: whichever thread runs Python next picks it up, so a main
            // thread blocked in native code does not hold it back.
            Some((add, main)) => {
                let interp = t.call(main, &[], ret, Duration::from_secs(2))?.unwrap_or(0);
                t.call(
                    add,
                    &[interp, addr, addr + BLOCK, 0],
                    ret,
                    Duration::from_secs(2),
                )?
            }
            None => t.call(
                sym(p, "Py_AddPendingCall")?,
                &[addr, addr + BLOCK],
                ret,
                Duration::from_secs(2),
            )?,
        };
        t.release()?;
        if r.unwrap_or(1) as u32 != 0 {
            return Err(InjectError::Failed {
                pid: p.pid,
                detail: "the interpreter's pending-call queue is full; try again".into(),
            });
        }
        return Ok(addr);
    }
}

/// Waits until the interpreter has run the stub (its result), or cancels it at the deadline.
fn wait_for_stub(p: &PythonProcess, page: u64, deadline: Instant) -> Result<i32, InjectError> {
    let mut flag = [0u8; 8];
    loop {
        perfpy_process::LiveMemory(p.pid as u32)
            .read_exact(page + BLOCK + 16, &mut flag)
            .map_err(|_| InjectError::ProcessGone { pid: p.pid })?;
        if flag[4] == 1 {
            break;
        }
        if Instant::now() >= deadline {
            // Cancel: if the interpreter runs the stub later, it does nothing. The page stays
            // mapped (4 KiB) since the stub may still be called.
            let _ = crate::sys::write_mem(p.pid, page + BLOCK + 24, &1u32.to_ne_bytes());
            perfpy_process::LiveMemory(p.pid as u32)
                .read_exact(page + BLOCK + 16, &mut flag)
                .map_err(|_| InjectError::ProcessGone { pid: p.pid })?;
            if flag[4] == 1 {
                break;
            }
            return Err(InjectError::Timeout { pid: p.pid });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(i32::from_ne_bytes(flag[0..4].try_into().unwrap_or([0; 4])))
}

/// Unmaps the stub's page, from a thread that is not running the end of the stub.
fn unmap_when_safe(p: &PythonProcess, page: u64) -> Result<(), InjectError> {
    for _ in 0..100 {
        let Some(tid) = threads(p.pid).first().copied() else {
            break;
        };
        let mut t = Tracee::attach(p.pid, tid, Duration::from_secs(2))?;
        let rip = t.regs().rip;
        if (page..page + PAGE).contains(&rip) || !t.mask_is_exact() {
            t.release()?;
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        unmap_page(&mut t, p, page);
        t.release()?;
        break;
    }
    Ok(())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into our buffer.
    unsafe {
        libc::getrandom(b.as_mut_ptr().cast(), 8, 0);
    }
    u64::from_ne_bytes(b)
}

/// The registers of thread `tid` as seen in a fresh stop: (rip, rsp, rbp, rbx, r12–r15,
/// orig_rax, rax). For tests of the save/restore round trip.
pub fn snapshot(pid: i32, tid: i32) -> Result<[u64; 10], InjectError> {
    let mut t = Tracee::attach(pid, tid, Duration::from_secs(2))?;
    let r = *t.regs();
    t.release()?;
    Ok([
        r.rip, r.rsp, r.rbp, r.rbx, r.r12, r.r13, r.r14, r.r15, r.orig_rax, r.rax,
    ])
}

/// Calls one argument-less function of the interpreter in thread `tid` (tests only: the caller
/// must know it is safe there) and restores the thread.
pub fn call_once(p: &PythonProcess, tid: i32, name: &str) -> Result<(), InjectError> {
    let f = sym(p, name)?;
    let mut t = Tracee::attach(p.pid, tid, Duration::from_secs(2))?;
    let r = t.call(
        f,
        &[],
        Return::Libc(libc_fn(p, "__restore_rt")?),
        Duration::from_secs(2),
    );
    t.release()?;
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_binds_no_names_and_is_one_expression() {
        for a in [Action::Query, Action::On, Action::Off] {
            let c = code(a, "/tmp/x");
            assert!(!c.contains('\n'));
            assert!(!c.contains(" = ") && !c.starts_with("import"));
            assert!(c.starts_with("(lambda s, o:"));
        }
    }
}
