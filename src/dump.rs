//! `perfpy dump`: every thread's stack at one moment, without stopping the process.
//!
//! Read from user space with `process_vm_readv` (no ptrace, no signal: the target runs on):
//! the interpreter's thread states from `_PyRuntime` (or `interp_head`) with the offsets the
//! eBPF walker uses, each thread's frame chain the way the walker follows it, code objects
//! named by the walker's code reader (`perfpy_bpf::code`). Per thread, from `/proc`: name,
//! state, the system call it waits in (`syscall`), and its kernel stack (`stack`, root only).
//! The reads of one thread are not atomic with respect to the thread: a thread running Python
//! moves on while its chain is read (a frame may come from the next instant); a blocked one
//! does not move.

use std::collections::HashMap;

use anyhow::{Context, Result};
use perfpy_bpf::code::CodeReader;
use perfpy_bpf::{Offsets, PyFrameRef};
use perfpy_process::{proc, LiveMemory, ReadMemory, Version};
use serde_json::{json, Value};

use crate::files::Files;
use crate::process::Process;

/// Most thread states and frames read per process (a corrupt chain cannot loop forever).
const MAX_THREADS: usize = 4096;
const MAX_FRAMES: usize = 4096;

pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: u32,
    /// With `--locals`: its local variables, arguments first.
    pub locals: Vec<crate::dump_locals::Local>,
}

pub struct Thread {
    pub tid: u32,
    pub name: String,
    pub state: String,
    /// `read (fd 3)`, or None when running or not in a system call.
    pub syscall: Option<String>,
    pub kernel: Vec<String>,
    /// Native frames, innermost first, for a thread blocked in a system call (its user
    /// registers are in `/proc/PID/task/TID/syscall`); empty for a running thread.
    pub native: Vec<String>,
    /// Outermost first (a traceback's order); empty for a thread with no Python thread state.
    pub python: Vec<Frame>,
    pub has_thread_state: bool,
    /// Holds the GIL, where the interpreter says so (3.13+: its `_Py_DebugOffsets` give the
    /// GIL's `locked` and `last_holder`); None where it cannot be told.
    pub holds_gil: Option<bool>,
}

pub struct Dump {
    pub pid: u32,
    pub comm: String,
    pub python_version: Option<Version>,
    /// Why Python frames are missing, if they are.
    pub note: Option<String>,
    pub threads: Vec<Thread>,
}

struct Py {
    /// The key of the offset tables.
    version: Version,
    runtime: u64,
    off: Offsets,
}

/// A field of the target's `_Py_DebugOffsets` (3.13+), by name.
fn debug_field(pid: u32, py: &Py, name: &str) -> Option<u64> {
    let layout = perfpy_bpf::debug_offsets::layout(py.version)?;
    let i = layout.iter().position(|n| *n == name)?;
    u64_at(pid, py.runtime + 8 + 8 * i as u64)
}

/// The CPython of process `pid`, as `record` finds it: version from the interpreter's ELF,
/// `_PyRuntime`/`interp_head` from its symbols, offsets from the tables or the target's own
/// `_Py_DebugOffsets` (3.13+).
fn find_python(p: &Process) -> Result<Py, String> {
    let version = p.python_version.ok_or("not a Python process")?;
    let runtime = p
        .py_runtime_address()
        .ok_or("no _PyRuntime or interp_head in the interpreter")?;
    let off = match Offsets::for_version(version) {
        Some(o) => o,
        None if perfpy_bpf::debug_offsets::from_target(version) => {
            perfpy_bpf::debug_offsets::read(&LiveMemory(p.pid), runtime, version)
                .map_err(|e| e.to_string())?
                .offsets
        }
        None => {
            return Err(format!(
                "CPython {}.{}: no frame walker for this version",
                version.major, version.minor
            ))
        }
    };
    Ok(Py {
        version,
        runtime,
        off,
    })
}

fn u64_at(pid: u32, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    LiveMemory(pid)
        .read_all(addr, &mut b)
        .then(|| u64::from_ne_bytes(b))
}

fn at(base: u64, off: i32) -> Option<u64> {
    (off >= 0 && base != 0).then(|| base.wrapping_add(off as u64))
}

/// glibc x86-64: `struct pthread`'s `tid` (the pthread_t is its address). Used to match
/// thread states of CPython < 3.11, which record only the pthread_t, to kernel thread ids;
/// checked against the process's task list before it is believed.
const GLIBC_PTHREAD_TID: u64 = 0x2d0;

/// (thread id, thread state) of every thread state of the main interpreter.
fn thread_states(pid: u32, py: &Py) -> Vec<(Option<u32>, u64)> {
    let o = &py.off;
    let mut out = Vec::new();
    let Some(interp) = at(py.runtime, o.runtime_interp_head).and_then(|a| u64_at(pid, a)) else {
        return out;
    };
    let mut ts = at(interp, o.interp_tstate_head)
        .and_then(|a| u64_at(pid, a))
        .unwrap_or(0);
    while ts != 0 && out.len() < MAX_THREADS {
        let tid = if o.tstate_native_tid >= 0 {
            at(ts, o.tstate_native_tid)
                .and_then(|a| u64_at(pid, a))
                .map(|v| v as u32)
        } else {
            at(ts, o.tstate_thread_id)
                .and_then(|a| u64_at(pid, a))
                .and_then(|pt| u64_at(pid, pt.wrapping_add(GLIBC_PTHREAD_TID)))
                .map(|v| v as u32)
        };
        out.push((tid, ts));
        ts = at(ts, o.tstate_next)
            .and_then(|a| u64_at(pid, a))
            .unwrap_or(0);
    }
    out
}

/// The frame chain of a thread state, innermost first, as the eBPF walker follows it: each
/// frame's address and what the code reader needs of it.
fn frames_of(pid: u32, py: &Py, ts: u64) -> Vec<(u64, PyFrameRef)> {
    let o = &py.off;
    let mut frame = if o.tstate_cframe >= 0 {
        at(ts, o.tstate_cframe)
            .and_then(|a| u64_at(pid, a))
            .and_then(|cf| at(cf, o.tstate_current_frame))
            .and_then(|a| u64_at(pid, a))
            .unwrap_or(0)
    } else {
        at(ts, o.tstate_current_frame)
            .and_then(|a| u64_at(pid, a))
            .unwrap_or(0)
    };
    let mut out: Vec<(u64, PyFrameRef)> = Vec::new();
    let mut steps = 0;
    while frame != 0 && out.len() < MAX_FRAMES && steps < 2 * MAX_FRAMES {
        steps += 1;
        let prev = at(frame, o.frame_previous)
            .and_then(|a| u64_at(pid, a))
            .unwrap_or(0);
        let owner = if o.frame_owner >= 0 {
            let mut b = [0u8; 1];
            if LiveMemory(pid).read_all(frame + o.frame_owner as u64, &mut b) {
                b[0]
            } else {
                0
            }
        } else {
            0
        };
        if o.owned_by_cstack >= 0 && owner >= o.owned_by_cstack as u8 {
            // The shim of a C-level evaluation call (3.12+; 3.15's thread base frame too):
            // the frame above it is the call's entry frame, marked as the walker marks it.
            if let Some((_, f)) = out.last_mut().filter(|(_, f)| !f.entry) {
                f.entry = true;
                f.first_local = frame;
            }
            frame = prev;
            continue;
        }
        let mut code = at(frame, o.frame_code)
            .and_then(|a| u64_at(pid, a))
            .unwrap_or(0);
        if py.version.at_least(3, 14) {
            // A _PyStackRef: the low two bits are tags; both set is a tagged int.
            if code & 3 == 3 {
                frame = prev;
                continue;
            }
            code &= !3;
        }
        let instr = if o.lasti_int != 0 {
            let mut b = [0u8; 4];
            LiveMemory(pid).read_all(frame + o.frame_instr as u64, &mut b);
            i32::from_ne_bytes(b) as i64 as u64
        } else {
            at(frame, o.frame_instr)
                .and_then(|a| u64_at(pid, a))
                .unwrap_or(0)
        };
        let first_local = at(frame, o.frame_localsplus)
            .and_then(|a| u64_at(pid, a))
            .unwrap_or(0);
        out.push((
            frame,
            PyFrameRef {
                code,
                instr,
                // <= 3.10: every Python call is a C-level evaluation call of its own.
                entry: o.lasti_int != 0,
                owner,
                first_local,
                ident: 0,
                self_class: 0,
            },
        ));
        frame = prev;
    }
    out
}

/// A process's Python threads as they are now, read from user space as `dump` reads them
/// (once per process): the stacks of threads blocked since before a recording began, which no
/// switch of the recording showed.
pub(crate) struct PythonNow {
    pid: u32,
    py: Py,
    /// Thread state by tid as perfpy sees it.
    states: HashMap<u32, u64>,
}

impl PythonNow {
    pub(crate) fn read(p: &Process) -> Option<PythonNow> {
        let py = find_python(p).ok()?;
        let tids = proc::tasks(p.pid).ok()?;
        // Thread states carry the tid in the target's own PID namespace.
        let ns = ns_tids(p.pid, &tids);
        let states = thread_states(p.pid, &py)
            .into_iter()
            .filter_map(|(t, ts)| Some((t.map(|t| ns.get(&t).copied().unwrap_or(t))?, ts)))
            .collect();
        Some(PythonNow {
            pid: p.pid,
            py,
            states,
        })
    }

    /// Thread `tid`'s Python frames, innermost first, with the walker's entry marks.
    pub(crate) fn stack(&self, tid: u32) -> Option<perfpy_bpf::PyStack> {
        let ts = *self.states.get(&tid)?;
        let frames: Vec<PyFrameRef> = frames_of(self.pid, &self.py, ts)
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        Some(perfpy_bpf::PyStack {
            pid: self.pid,
            tid,
            time_ns: 0,
            truncated: (frames.len() >= MAX_FRAMES).then_some(perfpy_bpf::WalkerCut::FrameLimit),
            frames,
            no_thread_state: false,
            read_error: false,
            offcpu: true,
        })
    }
}

/// The thread state holding the GIL (3.13+), from the target's `_Py_DebugOffsets`:
/// `Some(0)` when the GIL is free, None where it cannot be told.
fn gil_holder(pid: u32, py: &Py) -> Option<u64> {
    let field = |name: &str| debug_field(pid, py, name);
    // Offsets into the interpreter state (its embedded `_gil`, the main interpreter's GIL),
    // from another process: inside the state's size before use.
    let size = field("interpreter_state.size")?;
    let inside = |v: u64| (v + 8 <= size).then_some(v);
    let interp = at(py.runtime, py.off.runtime_interp_head).and_then(|a| u64_at(pid, a))?;
    let mut locked = [0u8; 4];
    let l = inside(field("interpreter_state.gil_runtime_state_locked")?)?;
    if !LiveMemory(pid).read_all(interp + l, &mut locked) {
        return None;
    }
    if i32::from_ne_bytes(locked) == 0 {
        return Some(0);
    }
    u64_at(
        pid,
        interp + inside(field("interpreter_state.gil_runtime_state_holder")?)?,
    )
}

/// x86-64 system call names of the calls threads usually wait in.
fn syscall_name(nr: i64) -> String {
    let n = match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        17 => "pread64",
        19 => "readv",
        23 => "select",
        34 => "pause",
        35 => "nanosleep",
        42 => "connect",
        43 => "accept",
        45 => "recvfrom",
        47 => "recvmsg",
        61 => "wait4",
        202 => "futex",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        247 => "waitid",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        441 => "epoll_pwait2",
        _ => return format!("syscall {nr}"),
    };
    n.to_string()
}

/// What a thread waits in, from its `/proc/PID/task/TID/syscall`: the system call, with the
/// descriptor it waits on where there is one; `None` blocked outside a system call.
fn describe_syscall(s: &proc::Syscall) -> Option<String> {
    if s.nr < 0 {
        return None;
    }
    let name = syscall_name(s.nr);
    Some(match (s.nr, s.arg1) {
        (0 | 1 | 17 | 19 | 45 | 47 | 43 | 288, Some(fd)) => format!("{name} (fd {fd})"),
        _ => name,
    })
}

fn state_name(c: char) -> &'static str {
    match c {
        'R' => "running",
        'S' => "sleeping",
        'D' => "uninterruptible",
        'T' => "stopped",
        't' => "traced",
        'Z' => "zombie",
        _ => "unknown",
    }
}

fn read_thread(pid: u32, tid: u32) -> Thread {
    let base = format!("/proc/{pid}/task/{tid}");
    let state = proc::task_stat(pid, tid).map_or('?', |s| s.state);
    let syscall = proc::task_syscall(pid, tid)
        .and_then(|s| describe_syscall(&s))
        .filter(|_| state != 'R');
    let kernel = std::fs::read_to_string(format!("{base}/stack"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, f)| f.to_string()))
        .map(|f| f.split('+').next().unwrap_or(&f).to_string())
        .collect();
    Thread {
        tid,
        name: proc::comm(pid, tid).unwrap_or_default(),
        state: state_name(state).to_string(),
        syscall,
        kernel,
        native: Vec::new(),
        python: Vec::new(),
        has_thread_state: false,
        holds_gil: None,
    }
}

/// Most user stack copied to unwind a blocked thread (less where the mapping ends sooner).
const NATIVE_STACK: usize = 256 << 10;

/// Native return addresses of a blocked thread, innermost first: its stack from `sp` copied
/// with `process_vm_readv` and unwound with the profile's unwinder (CFI). The thread is not
/// stopped: if it wakes while its stack is copied, the outer frames may be wrong, which a
/// blocked thread rarely does. Its frame pointer is not known (`/proc/PID/task/TID/syscall`
/// gives `sp` and `pc` only): where the walk stops at a function whose CFI needs it (built with
/// frame pointers: Debian's CPython 3.15, distributions built so throughout), it is recovered
/// from the stack (see [`frame_pointer_candidates`]).
fn native_addresses(p: &mut Process, tid: u32) -> Vec<u64> {
    // Its user stack and instruction pointers, while it is blocked in a system call (absent
    // while it runs).
    let Some((sp, pc)) = proc::task_syscall(p.pid, tid).and_then(|s| s.sp_pc) else {
        return Vec::new();
    };
    let mut len = NATIVE_STACK;
    let stack = loop {
        let mut buf = vec![0u8; len];
        match LiveMemory(p.pid).read(sp, &mut buf) {
            Ok(n) if n > 0 => {
                buf.truncate(n);
                break buf;
            }
            _ if len > 4096 => len /= 2,
            _ => return Vec::new(),
        }
    };
    let mem = LiveMemory(p.pid);
    let unwind = |p: &mut Process, bp: u64| {
        let (mut out, mut sps) = (Vec::new(), Vec::new());
        let o =
            crate::unwind::unwind_sp(p, &mem, [bp, sp, pc], &stack, 256, &mut out, Some(&mut sps));
        (out, sps, o.complete || o.truncated)
    };
    let (out, sps, _) = unwind(p, 0);
    // A frame pointer of 0 reads as "outermost frame" to a rule that needs it: the same walk
    // with an impossible one (1) tells whether the end was real.
    if unwind(p, 1).2 {
        return out;
    }
    let Some(&stop_sp) = sps.last() else {
        return out;
    };
    // The frame pointer is callee-saved: the inner frames left it as the stopping frame set it
    // (or saved it, which their CFI then restores). A candidate is kept only if the walk with it
    // reaches the outermost frame.
    let is_code = |a: u64| p.mapping(a).is_some_and(|m| m.file.is_some());
    let candidates: Vec<u64> = frame_pointer_candidates(&stack, sp, stop_sp, is_code)
        .take(8)
        .collect();
    for bp in candidates {
        let (again, _, whole) = unwind(p, bp);
        if whole && again.len() > out.len() {
            return again;
        }
    }
    out
}

/// Where a frame-pointer function's `rbp` may point, from `from` (the stopping frame's `sp`)
/// up the copied stack (which starts at `base`): a word pair whose first word is the caller's
/// saved `rbp` (higher on the stack, or 0 for the outermost) and whose second is a return
/// address (`is_code`: into a mapped file's code). Nearest first, within 64 KiB.
fn frame_pointer_candidates<'a>(
    stack: &'a [u8],
    base: u64,
    from: u64,
    is_code: impl Fn(u64) -> bool + 'a,
) -> impl Iterator<Item = u64> + 'a {
    let word = move |addr: u64| -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(base)?).ok()?;
        Some(u64::from_ne_bytes(
            stack.get(off..off.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let end = base + stack.len() as u64;
    (from.next_multiple_of(8)..end.min(from.saturating_add(64 << 10)))
        .step_by(8)
        .filter(move |&a| {
            let (Some(saved), Some(ra)) = (word(a), word(a + 8)) else {
                return false;
            };
            (saved == 0 || (saved > a && saved < end)) && is_code(ra)
        })
}

/// Names native addresses of `p` (innermost first) from the files' symbol tables, as
/// `function (file name)`: one batch per file.
fn name_native(p: &Process, addrs: &[u64], sym: &perfpy_symbolize::Symbolizer) -> Vec<String> {
    let mut out: Vec<String> = addrs.iter().map(|a| format!("{a:#x}")).collect();
    // file id -> (file, [(index in out, file offset)])
    type PerFile<'a> =
        HashMap<crate::ids::FileId, (&'a crate::files::MappedFile, Vec<(usize, u64)>)>;
    let mut per_file: PerFile = HashMap::new();
    for (i, &a) in addrs.iter().enumerate() {
        // A return address points after its call: look up the call itself.
        let look = if i == 0 { a } else { a.saturating_sub(1) };
        if let Some(m) = p.mapping(look) {
            match &m.file {
                Some(f) => per_file
                    .entry(f.id)
                    .or_insert_with(|| (f, Vec::new()))
                    .1
                    .push((i, look - m.start + m.pgoff)),
                None => out[i] = format!("{a:#x} (anonymous code)"),
            }
        }
    }
    for (f, v) in per_file.into_values() {
        let base = f.path.rsplit('/').next().unwrap_or(&f.path).to_string();
        let offs: Vec<u64> = v.iter().map(|x| x.1).collect();
        let names = sym
            .symbolize_elf(&f.fd_path(), &offs, false)
            .unwrap_or_default();
        for (k, (i, _)) in v.iter().enumerate() {
            out[*i] = match names.get(k).and_then(|fr| fr.last()) {
                Some(fr) => format!("{} ({base})", fr.function),
                None => format!("{:#x} ({base})", addrs[*i]),
            };
        }
    }
    out
}

/// Addresses of every thread, then named together (a file's symbols are read once).
fn native_of_all(p: &mut Process, threads: &mut [Thread]) {
    let sym = perfpy_symbolize::Symbolizer::new();
    let all: Vec<Vec<u64>> = threads.iter().map(|t| native_addresses(p, t.tid)).collect();
    for (t, addrs) in threads.iter_mut().zip(all) {
        t.native = name_native(p, &addrs, &sym);
        if t.native.iter().any(|f| f.starts_with("take_gil ")) {
            t.syscall = t
                .syscall
                .take()
                .map(|c| format!("{c}: waiting for the GIL"));
        }
    }
}

/// Dumps process `pid` (checked as for `record`).
pub fn dump(pid: i32, with_locals: bool) -> Result<Dump> {
    let pid = crate::targets::check_pid(pid)?;
    let mut files = Files::default();
    let mut p = Process::new(pid, crate::ids::ProcessKey(0));
    p.refresh_maps(&mut files);
    let tids =
        proc::tasks(pid).with_context(|| format!("pid {pid} exited while it was being read"))?;
    let mut threads: Vec<Thread> = tids.iter().map(|t| read_thread(pid, *t)).collect();
    native_of_all(&mut p, &mut threads);
    let mut note = None;
    match find_python(&p) {
        Err(e) => note = Some(format!("{e}: native and kernel information only")),
        Ok(py) => {
            let mut reader = CodeReader::default();
            let by_tid: HashMap<u32, usize> = threads
                .iter()
                .enumerate()
                .map(|(i, t)| (t.tid, i))
                .collect();
            let nspid_tids = ns_tids(pid, &tids);
            let holder = gil_holder(pid, &py);
            let locals_layout = with_locals
                .then(|| {
                    crate::dump_locals::Layout::new(py.version.minor_pair(), &py.off, &|n| {
                        debug_field(pid, &py, n)
                    })
                })
                .flatten();
            if with_locals && locals_layout.is_none() {
                note = Some(format!(
                    "--locals: the locals of CPython {}.{} cannot be read",
                    py.version.major, py.version.minor
                ));
            }
            for (tid, ts) in thread_states(pid, &py) {
                let Some(i) = tid
                    .and_then(|t| nspid_tids.get(&t).copied().or(Some(t)))
                    .and_then(|t| by_tid.get(&t))
                else {
                    continue;
                };
                let refs = frames_of(pid, &py, ts);
                let t = &mut threads[*i];
                t.has_thread_state = true;
                t.holds_gil = holder.map(|h| h == ts);
                t.python = refs
                    .iter()
                    .rev()
                    .map(|(addr, f)| {
                        let locals = locals_layout
                            .as_ref()
                            .map(|l| crate::dump_locals::locals(pid, &py.off, l, *addr, f.code))
                            .unwrap_or_default();
                        match reader.resolve(&LiveMemory(pid), pid, &py.off, py.version, f) {
                            Some(info) => Frame {
                                function: info.qualname,
                                file: info.filename,
                                line: info.line,
                                locals,
                            },
                            None => Frame {
                                function: format!("[unreadable code object {:#x}]", f.code),
                                file: String::new(),
                                line: 0,
                                locals,
                            },
                        }
                    })
                    .collect();
            }
        }
    }
    Ok(Dump {
        pid,
        comm: p.comm.clone(),
        python_version: p.python_version,
        note,
        threads,
    })
}

/// Thread ids as the target sees them (its innermost PID namespace: what `native_thread_id`
/// holds) to ours.
fn ns_tids(pid: u32, tids: &[u32]) -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    for &t in tids {
        if let Some(ns) = proc::task_status(pid, t).ok().and_then(|s| s.nspid) {
            m.insert(ns, t);
        }
    }
    m
}

pub fn text(d: &Dump) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Process {} ({}){}",
        d.pid,
        d.comm,
        d.python_version
            .as_ref()
            .map(|v| format!(", CPython {v}"))
            .unwrap_or_default()
    );
    if let Some(n) = &d.note {
        let _ = writeln!(s, "  note: {n}");
    }
    for t in &d.threads {
        let wait = t
            .syscall
            .as_ref()
            .map(|c| format!(", in {c}"))
            .unwrap_or_default();
        let gil = if t.holds_gil == Some(true) {
            ", holds the GIL"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "\nThread {} \"{}\" ({}{wait}{gil})",
            t.tid, t.name, t.state
        );
        if t.python.is_empty() {
            let _ = writeln!(
                s,
                "    {}",
                if t.has_thread_state {
                    "(no Python frames)"
                } else {
                    "(no Python thread state)"
                }
            );
        }
        for f in &t.python {
            let _ = writeln!(s, "    {} ({}:{})", f.function, f.file, f.line);
            for l in &f.locals {
                let _ = writeln!(s, "        {} = {}  ({})", l.name, l.repr, l.type_name);
            }
        }
        if !t.native.is_empty() {
            let _ = writeln!(s, "  native, innermost last:");
            for n in t.native.iter().rev() {
                let _ = writeln!(s, "    {n}");
            }
        }
        if !t.kernel.is_empty() {
            let _ = writeln!(s, "  kernel, innermost last:");
            for k in t.kernel.iter().rev() {
                let _ = writeln!(s, "    {k}");
            }
        }
    }
    s
}

pub fn json(d: &Dump) -> Value {
    json!({
        "pid": d.pid,
        "comm": d.comm,
        "python_version": d.python_version.map(|v| v.to_string()),
        "note": d.note,
        "threads": d.threads.iter().map(|t| json!({
            "tid": t.tid,
            "name": t.name,
            "state": t.state,
            "syscall": t.syscall,
            "python_thread_state": t.has_thread_state,
            "holds_gil": t.holds_gil,
            "frames": t.python.iter().map(|f| {
                let mut v = json!({ "function": f.function, "file": f.file, "line": f.line });
                if !f.locals.is_empty() {
                    v["locals"] = f.locals.iter().map(|l| json!({
                        "name": l.name, "type": l.type_name, "repr": l.repr,
                    })).collect();
                }
                v
            }).collect::<Vec<_>>(),
            "native": t.native.iter().rev().collect::<Vec<_>>(),
            "kernel": t.kernel.iter().rev().collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Processes that map a CPython interpreter (a `python*` executable or a `libpython*`), by
/// their `/proc/PID/maps`: the cheap test `-a` makes before reading a process.
fn python_processes() -> Vec<i32> {
    let me = std::process::id();
    proc::pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| *p != me)
        .filter(|p| {
            proc::maps(*p).is_ok_and(|maps| {
                maps.iter().any(|m| {
                    let base = m.path.rsplit('/').next().unwrap_or("");
                    m.path.contains('/')
                        && (base.starts_with("libpython")
                            || (base.starts_with("python")
                                && base[6..].chars().all(|c| c.is_ascii_digit() || c == '.')))
                })
            })
        })
        .map(|p| p as i32)
        .collect()
}

/// `perfpy dump -p PID [-p PID …] | -a [--json] [--locals]`. With `-p` the first process that
/// cannot be dumped stops the run (as `record -p`); with `-a` it is reported and skipped.
pub fn run(pids: &[i32], all: bool, as_json: bool, with_locals: bool) -> Result<i32> {
    if pids.is_empty() && !all {
        anyhow::bail!("nothing to dump: give -p PID or -a");
    }
    let mut dumps = Vec::new();
    if all {
        for pid in python_processes() {
            match dump(pid, with_locals) {
                Ok(d) => dumps.push(d),
                Err(e) => say!("perfpy: pid {pid} skipped: {e:#}"),
            }
        }
    }
    for &pid in pids {
        dumps.push(dump(pid, with_locals)?);
    }
    if as_json {
        let v: Vec<Value> = dumps.iter().map(json).collect();
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for d in &dumps {
            out!("{}", text(d));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syscall_of(text: &str) -> Option<String> {
        describe_syscall(&proc::Syscall::parse(text)?)
    }

    #[test]
    fn frame_pointer_candidates_are_saved_pointer_and_return_address_pairs() {
        let base = 0x7ffd_0000u64;
        let code = 0x40_0000..0x50_0000u64;
        // Words from `base`: a local that looks like code, then at +16 a frame (saved rbp
        // +48, return address), a pair whose "saved rbp" points down (not a frame), at +48
        // the outermost frame (saved rbp 0).
        let words: [u64; 9] = [
            0x40_1000,
            7,
            base + 48,
            0x40_2000,
            base,
            0x40_3000,
            0,
            0x40_4000,
            0,
        ];
        let stack: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let is_code = |a: u64| code.contains(&a);
        let got: Vec<u64> = frame_pointer_candidates(&stack, base, base, is_code).collect();
        assert_eq!(got, vec![base + 16, base + 48]);
        // Searched from the stopping frame's sp up only.
        let got: Vec<u64> =
            frame_pointer_candidates(&stack, base, base + 24, |a| code.contains(&a)).collect();
        assert_eq!(got, vec![base + 48]);
    }

    #[test]
    fn syscalls_described() {
        assert_eq!(
            syscall_of("0 0x3 0x7ffd 0x10 0x0 0x0 0x0 0x7ffd0 0x7f12").as_deref(),
            Some("read (fd 3)")
        );
        assert_eq!(
            syscall_of("230 0x1 0x0 0x7ffd 0x0 0x0 0x0 0x7ffd0 0x7f12").as_deref(),
            Some("clock_nanosleep")
        );
        assert_eq!(syscall_of("-1 0x7ffd0 0x7f12"), None);
        assert_eq!(syscall_of("running"), None);
    }
}
