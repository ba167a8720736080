//! The record session: open events, drain rings, unwind and aggregate each sample, stop on the
//! duration, a signal or the targets' exit, then symbolize and write.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::files::Files;
use crate::output::Format;
use crate::process::Process;
use crate::profile::{Cut, FrameKey, Profile};
use crate::records::{self, Record};
use crate::sys::{self, EventConfig, Ring};
use crate::targets;
use crate::unwind::{self, LiveMemory};

pub struct Options {
    pub pids: Vec<i32>,
    pub all: bool,
    pub command: Vec<String>,
    pub duration: Option<Duration>,
    pub rate: u64,
    pub output: Option<PathBuf>,
    pub format: Format,
    /// None: chosen by whether the eBPF walker runs.
    pub stack_size: Option<u32>,
    pub max_frames: usize,
    /// The eBPF walker's limit of Python frames per sample.
    pub max_python_frames: u32,
    pub keep_interpreter: bool,
    /// PYTHONPERFSUPPORT=1 for a launched command: None sets it only without the eBPF walker.
    pub python_perf_env: Option<bool>,
    pub inject_python: bool,
    pub ebpf: bool,
    /// `--otlp-endpoint`: also send the profile to an OpenTelemetry Collector.
    pub otlp: Option<crate::output::otlp_export::Config>,
    /// `--function` / `--nolineno`: what Python frames carry as line.
    pub lines: crate::report::Lines,
    /// -p: follow the targets' child processes too.
    pub subprocesses: bool,
}

const INJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a walker record waits for its sample (read from any CPU's ring) before it is
/// dropped: rings are drained at least every 20 ms.
const KEEP_RECORDS_NS: u64 = 200_000_000;

/// Turns off every trampoline we turned on, however the recording ends: explicitly after the
/// perf maps were read ([`Deactivator::finish`]), or from `Drop` on an error or a panic.
struct Deactivator {
    done: bool,
    /// The `-a` scanner that activates new processes: stopped and joined first, so that no
    /// activation can start after the deactivation.
    halt: Arc<AtomicBool>,
    scanner: Option<std::thread::JoinHandle<()>>,
}

impl Deactivator {
    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.halt.store(true, Ordering::Relaxed);
        if let Some(t) = self.scanner.take() {
            let _ = t.join();
        }
        for (pid, r) in perfpy_inject::registry().deactivate_all(INJECT_TIMEOUT) {
            match r {
                Ok(perfpy_inject::Released::TurnedOff) => {
                    say!("perfpy: pid {pid}: perf trampoline turned off again")
                }
                Ok(perfpy_inject::Released::LeftAsFound) => {
                    tracing::debug!(pid, "trampoline was on when found: left on")
                }
                Ok(perfpy_inject::Released::StillUsed(others)) => say!(
                    "perfpy: pid {pid}: perf trampoline left on: {} other perfpy session{} ({}) still use{} it; the last one turns it off",
                    others.len().max(1),
                    if others.len() > 1 { "s" } else { "" },
                    if others.is_empty() {
                        "pid unknown".to_string()
                    } else {
                        others.iter().map(|p| format!("pid {p}")).collect::<Vec<_>>().join(", ")
                    },
                    if others.len() > 1 { "" } else { "s" }
                ),
                Err(e) if e.reason() == Some(perfpy_inject::Reason::ProcessGone) => {
                    tracing::debug!(pid, "exited before deactivation")
                }
                Err(e) => say!("perfpy: warning: pid {pid}: could not turn the perf trampoline off: {e}; run `perfpy inject -p {pid} --deactivate`"),
            }
        }
    }
}

impl Drop for Deactivator {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Lenient activation for `-a`: every CPython 3.12+ process gets its trampoline; others are
/// reported once with the reason.
fn inject_lenient(pid: u32, seen: &mut HashSet<(u32, u64)>, notes: &mut HashMap<u32, String>) {
    let start = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(19)?.parse().ok())
        })
        .unwrap_or(0u64);
    if !seen.insert((pid, start)) || pid == std::process::id() {
        return;
    }
    // What happened to each process is said, but not without end: with many short-lived
    // processes a line each would flood the terminal (or fill a pipe nobody reads until the
    // end, and block us). The summary at the end has the processes that were sampled.
    static SAID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    const SAY_AT_MOST: usize = 20;
    let say = |line: String| {
        let n = SAID.fetch_add(1, Ordering::Relaxed);
        if n < SAY_AT_MOST {
            say!("{line}");
        } else if n == SAY_AT_MOST {
            say!("perfpy: (further --inject-python messages in the debug log: RUST_LOG=debug)");
        }
        tracing::debug!("{line}");
    };
    // Expected with -a, and not worth a line: processes that exit while we look.
    let quiet =
        |e: &perfpy_inject::InjectError| e.reason() == Some(perfpy_inject::Reason::ProcessGone);
    let p = match perfpy_inject::discover(pid as i32) {
        Ok(p) => p,
        Err(e) if e.reason() == Some(perfpy_inject::Reason::NotPython) => return,
        Err(e) => {
            if quiet(&e) {
                tracing::debug!("pid {pid}: skipped: {e}");
            } else {
                say(format!("perfpy: pid {pid}: skipped: {e}"));
            }
            notes.insert(
                pid,
                format!(
                    "skipped: {}",
                    e.reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string())
                ),
            );
            return;
        }
    };
    match perfpy_inject::registry().activate(&p, INJECT_TIMEOUT) {
        Ok(perfpy_inject::ActivateOutcome::Activated) => {
            say(format!(
                "perfpy: pid {pid}: perf trampoline turned on (CPython {})",
                p.version_string()
            ));
            notes.insert(pid, "trampoline turned on by perfpy".into());
        }
        Ok(perfpy_inject::ActivateOutcome::AlreadyActive) => {
            say(format!(
                "perfpy: pid {pid}: perf trampoline already on (CPython {}); left as it is",
                p.version_string()
            ));
            notes.insert(pid, "trampoline already on".into());
        }
        Err(e) => {
            if quiet(&e) {
                tracing::debug!("pid {pid}: no trampoline: {e}");
            } else {
                say(format!("perfpy: pid {pid}: no trampoline: {e}"));
            }
            notes.insert(
                pid,
                format!(
                    "no trampoline: {}",
                    e.reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string())
                ),
            );
        }
    }
}

struct RingEntry {
    ring: Ring,
    #[allow(dead_code)]
    tid: u32,
}

#[derive(Default)]
pub struct Stats {
    pub samples: u64,
    pub lost: u64,
    pub unwind_incomplete: u64,
    /// Stacks cut short, per limit (`Cut as usize`).
    pub truncated: [u64; 4],
    /// Stacks deeper than the native stack copy whose Python frames the walker completed.
    pub py_beyond_copy: u64,
    pub foreign: u64,
    pub no_user_regs: u64,
}

/// The eBPF frame walker and what goes with it: registered processes, records waiting for
/// their sample, the code-object reader.
struct PyWalk {
    walker: perfpy_bpf::Walker,
    reader: perfpy_bpf::CodeReader,
    procs: HashMap<u32, (perfpy_bpf::Offsets, (u8, u8))>,
    pending: HashMap<u32, std::collections::VecDeque<perfpy_bpf::PyStack>>,
    tried: HashSet<u32>,
}

impl PyWalk {
    fn poll(&mut self) {
        let pending = &mut self.pending;
        self.walker.poll(&mut |s| {
            tracing::trace!(
                pid = s.pid,
                tid = s.tid,
                frames = s.frames.len(),
                no_tstate = s.no_thread_state,
                read_error = s.read_error,
                "walker record"
            );
            let q = pending.entry(s.tid).or_default();
            if q.len() >= 256 {
                q.pop_front();
            }
            q.push_back(s);
        });
    }

    /// The walker's record for the sample of `tid` at `time` (same instant, same clock): the
    /// latest one at that time. Older ones stay a while: a thread that moved to another CPU
    /// has older samples in that CPU's ring, which may be read after this one. (Dropping them
    /// here left those samples without Python frames.)
    fn take(&mut self, tid: u32, time: u64) -> Option<perfpy_bpf::PyStack> {
        let q = self.pending.get_mut(&tid)?;
        while q
            .front()
            .is_some_and(|f| f.time_ns.saturating_add(KEEP_RECORDS_NS) < time)
        {
            q.pop_front();
        }
        let i = q.iter().rposition(|f| f.time_ns <= time + 100_000)?;
        let best = q.remove(i)?;
        (time.saturating_sub(best.time_ns) < 2_000_000).then_some(best)
    }
}

/// Everything the records feed.
struct Collector {
    py: Option<PyWalk>,
    files: Files,
    procs: Vec<Process>,
    live: HashMap<u32, u32>,
    profile: Profile,
    stats: Stats,
    max_frames: usize,
    scratch_addrs: Vec<u64>,
    /// The stack pointer of each unwound frame (`scratch_addrs[i]` runs with `scratch_sps[i]`).
    scratch_sps: Vec<u64>,
    scratch_locs: Vec<u32>,
    /// Targets (pids) whose exit ends the run.
    exited: HashSet<u32>,
    /// Processes that exited, by key, with when: released once their last samples are in.
    to_release: std::collections::VecDeque<(Instant, u32)>,
    /// Pids that exited, not released yet, with their process's key: samples of other CPUs'
    /// rings read after the exit record still belong to it. (Made into a new process, such a
    /// sample stayed "alive" for ever, and kept the real one's place in the eBPF walker, whose
    /// table of 4096 processes was full after a few minutes of -a churn: later processes got no
    /// Python frames.)
    dying: HashMap<u32, u32>,
    /// Pids ever handed to the eBPF walker (for the summary).
    walked: HashSet<u32>,
    /// Processes the walker refused, with the reason (a 3.13+ debug-offsets table that failed).
    walk_refused: HashMap<u32, String>,
    /// Events sample every CPU and the eBPF program keeps the targets' samples only: the
    /// records of every other process are ignored (see [`Collector::ours`]).
    filter: bool,
    /// Processes found not to be ours, so that their next records cost no lookup: forgotten at
    /// their fork and exit records (a pid reused by a new process).
    not_ours: HashSet<u32>,
}

impl Collector {
    /// Frees what processes that exited at least `after` ago held only while alive: their
    /// mappings and unwind tables, their root directory, their place in the eBPF walker. Other
    /// CPUs' rings may still hold their last samples for a moment, hence the delay.
    fn release_exited(&mut self, after: Duration) {
        while let Some(&(at, key)) = self.to_release.front() {
            if at.elapsed() < after {
                break;
            }
            self.to_release.pop_front();
            let p = &mut self.procs[key as usize];
            if p.alive {
                continue;
            }
            p.release();
            let pid = p.pid;
            if self.dying.get(&pid) == Some(&key) {
                self.dying.remove(&pid);
            }
            if let Some(py) = self.py.as_mut() {
                for tid in p.threads.keys() {
                    py.pending.remove(tid);
                }
                py.reader.forget(pid);
                // A new process may have taken the pid meanwhile: it keeps its registration.
                if !self.live.contains_key(&pid) && py.procs.remove(&pid).is_some() {
                    py.walker.remove_process(pid);
                }
                if self.filter && !self.live.contains_key(&pid) {
                    // The kernel followed it through fork: it may hold a registration we
                    // never made.
                    py.walker.unkeep(pid);
                    py.walker.remove_process(pid);
                }
            }
        }
    }

    fn proc_key(&mut self, pid: u32) -> u32 {
        if let Some(k) = self.live.get(&pid).or_else(|| self.dying.get(&pid)) {
            return *k;
        }
        let key = self.procs.len() as u32;
        let mut p = Process::new(pid, key);
        p.refresh_maps(&mut self.files);
        // A child that exited before its fork record was read (records of several CPUs are
        // read one ring after the other): its parent's address space, as the kernel knows.
        if p.maps.is_empty() && self.filter {
            let parent = self.py.as_ref().and_then(|py| py.walker.kept(pid));
            if let Some(pk) = parent.and_then(|pp| self.live.get(&pp)) {
                p = Process::forked(&self.procs[*pk as usize], pid, key);
            }
        }
        self.procs.push(p);
        self.live.insert(pid, key);
        key
    }

    /// With the filter, whether a record's process is one of ours: known already, or kept
    /// by the eBPF program (a map lookup, once per process).
    fn ours(&mut self, pid: u32) -> bool {
        if !self.filter || self.live.contains_key(&pid) {
            return true;
        }
        if self.not_ours.contains(&pid) {
            return false;
        }
        let kept = self
            .py
            .as_ref()
            .is_some_and(|py| py.walker.kept(pid).is_some());
        if !kept {
            self.not_ours.insert(pid);
        }
        kept
    }

    fn handle(&mut self, rec: Record<'_>) {
        match &rec {
            Record::Mmap(m) if m.pid == 0 => return,
            Record::Comm { pid: 0, .. }
            | Record::Fork { pid: 0, .. }
            | Record::Exit { pid: 0, .. } => return,
            _ => {}
        }
        match rec {
            Record::Sample(s) => self.sample(s),
            Record::Mmap(m) => {
                if !m.prot_exec || !self.ours(m.pid) {
                    return;
                }
                let key = self.proc_key(m.pid);
                let path = String::from_utf8_lossy(m.filename).into_owned();
                let p = &mut self.procs[key as usize];
                if p.mapping(m.addr)
                    .is_some_and(|x| x.start == m.addr && x.end == m.addr + m.len)
                {
                    return;
                }
                p.add_mapping(&mut self.files, m.addr, m.addr + m.len, m.pgoff, &path);
                // As soon as the interpreter is mapped: samples taken before the walker knows
                // the process have no Python frames from it.
                self.register_python(key);
            }
            Record::Comm {
                pid,
                tid,
                exec,
                comm,
            } => {
                if !self.ours(pid) {
                    return;
                }
                let comm = String::from_utf8_lossy(comm).into_owned();
                // Rings are read one CPU after the other: the record of an earlier exec (of
                // `chroot`, say) can come after that of a later one (`python3.14`). A stale
                // one would start a new process under the old name: the name the process has
                // now, which its current key already carries, says it is stale.
                let stale = exec
                    && pid == tid
                    && crate::process::read_comm(pid, pid).is_some_and(|now| {
                        now != comm
                            && self
                                .live
                                .get(&pid)
                                .is_some_and(|k| self.procs[*k as usize].comm == now)
                    });
                if stale {
                    tracing::debug!(
                        pid,
                        comm,
                        "exec record older than the process's name: ignored"
                    );
                } else if exec && pid == tid {
                    // Another program: the walker's registration of the old one is void.
                    if let Some(py) = self.py.as_mut() {
                        if py.procs.remove(&pid).is_some() {
                            py.walker.remove_process(pid);
                        }
                    }
                    // A new program in this pid: a new process for us (its old frames keep
                    // their meaning under the old key).
                    if let Some(old) = self.live.remove(&pid) {
                        self.procs[old as usize].alive = false;
                        self.to_release.push_back((Instant::now(), old));
                    }
                    let key = self.proc_key(pid);
                    let p = &mut self.procs[key as usize];
                    p.exec(comm.clone());
                    p.refresh_maps(&mut self.files);
                    p.threads.insert(tid, comm);
                } else {
                    let key = self.proc_key(pid);
                    let p = &mut self.procs[key as usize];
                    if pid == tid {
                        p.comm = comm.clone();
                    }
                    p.threads.insert(tid, comm);
                }
            }
            Record::Fork { pid, ppid, tid } => {
                if pid == tid {
                    self.not_ours.remove(&pid);
                }
                if pid == tid && pid != ppid && !self.live.contains_key(&pid) && self.ours(pid) {
                    let key = self.procs.len() as u32;
                    let child = match self.live.get(&ppid) {
                        Some(pk) => Process::forked(&self.procs[*pk as usize], pid, key),
                        None => Process::new(pid, key),
                    };
                    self.procs.push(child);
                    self.live.insert(pid, key);
                }
            }
            Record::Exit { pid, tid } => {
                if pid == tid && self.not_ours.remove(&pid) {
                    return;
                }
                if pid == tid && self.ours(pid) {
                    if let Some(k) = self.live.remove(&pid) {
                        self.procs[k as usize].alive = false;
                        self.to_release.push_back((Instant::now(), k));
                        self.dying.insert(pid, k);
                    }
                    self.exited.insert(pid);
                }
            }
            Record::Lost(n) => self.stats.lost += n,
            Record::Other => {}
        }
    }

    /// Registers a CPython 3.11+ process with the eBPF walker, once.
    fn register_python(&mut self, key: u32) {
        let Some(py) = self.py.as_mut() else { return };
        let p = &self.procs[key as usize];
        if !p.is_python || !py.tried.insert(key) {
            return;
        }
        let Some(v) = p.python_version.as_deref() else {
            return;
        };
        let mut it = v.split('.').filter_map(|x| x.parse::<u8>().ok());
        let version = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        if perfpy_bpf::Offsets::for_version(version).is_none()
            && !perfpy_bpf::debug_offsets::from_target(version)
        {
            tracing::debug!(
                pid = p.pid,
                "CPython {v}: no eBPF walker for this version yet"
            );
            return;
        }
        // 3.7+: _PyRuntime; 2.7 and 3.6: the interpreter list head, `interp_head`. From the
        // interpreter file's symbols, read once per file (a new process costs no ELF parsing:
        // with -a, short-lived processes come by the dozen a second).
        let runtime = p.maps.iter().find_map(|m| {
            let f = m.file.as_ref()?;
            let vaddr = f
                .elf
                .as_ref()
                .filter(|e| e.is_python_interpreter)?
                .py_runtime?;
            Some(vaddr.wrapping_add(f.bias(m.start, m.pgoff)?))
        });
        let Some(runtime) = runtime else {
            tracing::debug!(
                pid = p.pid,
                "eBPF walker: no _PyRuntime or interp_head in the interpreter"
            );
            return;
        };
        // 3.13+: the offsets come from the target's own _Py_DebugOffsets, checked.
        let off = match perfpy_bpf::Offsets::for_version(version) {
            Some(o) => o,
            None => match perfpy_bpf::debug_offsets::read(
                &perfpy_bpf::code::LiveMemory,
                p.pid,
                runtime,
                version,
            ) {
                Ok(t) => t.offsets,
                Err(e) => {
                    tracing::debug!(pid = p.pid, "CPython {v}: eBPF walker refused: {e}");
                    self.walk_refused.insert(p.pid, e.to_string());
                    return;
                }
            },
        };
        match py.walker.add_process(&perfpy_bpf::PyProcess {
            pid: p.pid,
            version,
            runtime,
            offsets: off,
        }) {
            Ok(()) => {
                tracing::debug!(pid = p.pid, "CPython {v}: frames walked by the eBPF walker");
                py.procs.insert(p.pid, (off, version));
                self.walked.insert(p.pid);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }

    fn sample(&mut self, s: records::Sample<'_>) {
        if s.pid == 0 {
            // The idle task is excluded; pid 0 here is a task outside our PID namespace (the
            // kernel reports pids as our namespace sees them): not ours to show.
            self.stats.foreign += 1;
            return;
        }
        self.stats.samples += 1;
        let key = self.proc_key(s.pid);
        self.register_python(key);
        // The walker's Python frames for this sample, if the process is registered.
        let py_stack = match self.py.as_mut() {
            Some(py) if py.procs.contains_key(&s.pid) => py.take(s.tid, s.time).or_else(|| {
                py.poll();
                py.take(s.tid, s.time)
            }),
            _ => None,
        };
        let mut addrs = std::mem::take(&mut self.scratch_addrs);
        let mut sps = std::mem::take(&mut self.scratch_sps);
        sps.clear();
        let mut locs = std::mem::take(&mut self.scratch_locs);
        addrs.clear();
        locs.clear();
        for &k in &s.kernel {
            locs.push(self.profile.location(FrameKey::Kernel(k)));
        }
        let p = &mut self.procs[key as usize];
        p.thread_name(s.tid);
        let mut truncated = None;
        let mut beyond_copy = false;
        let mut native_incomplete = false;
        match s.user_regs {
            Some(regs) if regs[2] != 0 => {
                if p.mapping(regs[2]).is_none() {
                    p.refresh_maps(&mut self.files);
                }
                let mem = LiveMemory(s.pid);
                let o = unwind::unwind_sp(
                    p,
                    &mem,
                    regs,
                    s.stack,
                    self.max_frames,
                    &mut addrs,
                    Some(&mut sps),
                );
                native_incomplete = !o.complete;
                beyond_copy = !o.complete && o.truncated && !o.at_frame_limit;
                truncated = o.truncated.then_some(if o.at_frame_limit {
                    Cut::MaxFrames
                } else {
                    Cut::StackCopy
                });
            }
            _ => {
                if s.kernel.is_empty() {
                    addrs.push(s.ip);
                }
                self.stats.no_user_regs += 1;
            }
        }
        // Python frames from the walker, newest first, cut into groups: one per C-level
        // evaluation call (a group ends at its entry frame).
        let mut groups: Vec<Vec<FrameKey>> = Vec::new();
        // 3.12+: per group, the address of the shim frame under its entry frame, a local of
        // the C eval call running the group (0 where unknown).
        let mut shims: Vec<u64> = Vec::new();
        if let (Some(st), Some(py)) = (&py_stack, self.py.as_mut()) {
            if let Some((off, version)) = py.procs.get(&s.pid).copied() {
                let mut g = Vec::new();
                let mem = ForkedMemory(p.parent);
                for f in &st.frames {
                    if let Some(info) = py.reader.resolve(&mem, s.pid, &off, version, f) {
                        let func = self.profile.py_function(crate::profile::PyFunction {
                            qualname: info.qualname,
                            filename: info.filename,
                            first_line: info.first_line,
                        });
                        g.push(FrameKey::Py {
                            func,
                            line: info.line,
                        });
                    }
                    if f.entry {
                        groups.push(std::mem::take(&mut g));
                        shims.push(if version >= (3, 12) { f.first_local } else { 0 });
                    }
                }
                if !g.is_empty() {
                    groups.push(g);
                    shims.push(0);
                }
            }
        }
        let have_py = !groups.is_empty();
        if tracing::enabled!(tracing::Level::DEBUG)
            && !have_py
            && self
                .py
                .as_ref()
                .is_some_and(|py| py.procs.contains_key(&s.pid))
        {
            tracing::debug!(
                pid = s.pid,
                tid = s.tid,
                time = s.time,
                record = py_stack.is_some(),
                frames = py_stack.as_ref().map(|st| st.frames.len()),
                no_tstate = py_stack.as_ref().map(|st| st.no_thread_state),
                read_error = py_stack.as_ref().map(|st| st.read_error),
                "sample of a walked process without Python frames"
            );
        }
        if have_py {
            // The walker's frames reach the outermost Python frame whatever the stack copy
            // held (those the unwinding did not reach are added below): only the interpreter's
            // own start-up frames are then missing. Unless the walker itself stopped short.
            truncated = py_stack
                .as_ref()
                .and_then(|st| st.truncated)
                .map(|c| match c {
                    perfpy_bpf::WalkerCut::FrameLimit => Cut::PyFrames,
                    perfpy_bpf::WalkerCut::LoopBudget => Cut::PyLoopBudget,
                });
        }
        // Where every group's shim frame is known, the native frame whose stack frame holds it
        // runs the group: exact, even in a stripped interpreter whose evaluation loop has no
        // symbol (Debian's); otherwise the evaluation function's symbol decides.
        let by_shim =
            !shims.is_empty() && shims.iter().all(|&x| x != 0) && sps.len() == addrs.len();
        let mut next_group = 0;
        for (i, &a) in addrs.iter().enumerate() {
            // Return addresses point after the call: look up the call itself.
            let lookup = if i == 0 { a } else { a.saturating_sub(1) };
            if have_py {
                // The walker's frames replace the trampolines and the evaluation loop's frames.
                if p.trampolines.is_known_trampoline(a) {
                    p.trampoline_seen = true;
                    continue;
                }
                let is_eval = if by_shim {
                    let lo = sps[i];
                    let hi = sps.get(i + 1).copied().unwrap_or(0);
                    shims.get(next_group).is_some_and(|&x| lo <= x && x < hi)
                } else {
                    p.mapping(lookup).is_some_and(|m| {
                        m.file.as_ref().is_some_and(|f| {
                            let r = f.elf.as_ref().and_then(|e| e.eval_range.clone());
                            r.is_some_and(|r| {
                                f.file_offset_to_vaddr(lookup - m.start + m.pgoff)
                                    .is_some_and(|v| r.contains(&v))
                            })
                        })
                    })
                };
                if is_eval && next_group < groups.len() {
                    for k in &groups[next_group] {
                        locs.push(self.profile.location(*k));
                    }
                    next_group += 1;
                    continue;
                }
            }
            let fk = match p.mapping(lookup) {
                Some(m) => match &m.file {
                    Some(f) => FrameKey::File {
                        file: f.id,
                        offset: lookup - m.start + m.pgoff,
                    },
                    None => {
                        p.has_anon = true;
                        FrameKey::Anon {
                            proc: key,
                            addr: lookup,
                        }
                    }
                },
                None => {
                    p.has_anon = true;
                    FrameKey::Anon {
                        proc: key,
                        addr: lookup,
                    }
                }
            };
            locs.push(self.profile.location(fk));
        }
        // A stack deeper than the copy whose Python frames come from the walker is complete
        // but for native frames between its outer Python frames (C calling back into Python).
        if have_py && beyond_copy {
            if next_group < groups.len() && truncated.is_none() {
                self.stats.py_beyond_copy += 1;
            }
        } else if native_incomplete {
            self.stats.unwind_incomplete += 1;
        }
        // Python frames whose evaluation frames the native unwinding did not reach.
        for g in groups.iter().skip(next_group) {
            for k in g {
                locs.push(self.profile.location(*k));
            }
        }
        if let Some(cut) = truncated {
            self.stats.truncated[cut as usize] += 1;
            locs.push(self.profile.location(FrameKey::Truncated(cut)));
        }
        self.profile.add(key, s.tid, &locs);
        self.scratch_addrs = addrs;
        self.scratch_sps = sps;
        self.scratch_locs = locs;
    }
}

/// A process's memory, or once it is gone, that of the process it was forked from (without
/// exec since): a short-lived child's code objects are its parent's.
struct ForkedMemory(Option<u32>);

impl perfpy_bpf::code::RemoteMemory for ForkedMemory {
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool {
        use perfpy_bpf::code::LiveMemory;
        LiveMemory.read(pid, addr, buf) || self.0.is_some_and(|pp| LiveMemory.read(pp, addr, buf))
    }
}

/// Drains one ring into the collector.
fn drain(r: &mut RingEntry, c: &mut Collector, scratch: &mut Vec<u8>) {
    let (head, mut tail) = r.ring.positions();
    let size = r.ring.data_size() as u64;
    while tail < head {
        let data = r.ring.data();
        let off = (tail % size) as usize;
        // Records are 8-byte aligned, so the 8-byte header never wraps.
        let hsize = u16::from_ne_bytes([data[off + 6], data[off + 7]]) as usize;
        if hsize < 8 || tail + hsize as u64 > head {
            break;
        }
        let rec: &[u8] = if off + hsize <= data.len() {
            &data[off..off + hsize]
        } else {
            scratch.clear();
            scratch.extend_from_slice(&data[off..]);
            scratch.extend_from_slice(&data[..hsize - (data.len() - off)]);
            scratch
        };
        if let Some(rec) = records::parse(rec) {
            c.handle(rec);
        }
        tail += hsize as u64;
    }
    r.ring.set_tail(tail);
}

pub struct Outcome {
    /// Exit status of a launched command, if it exited during the recording.
    pub child_status: Option<i32>,
}

pub fn run(opts: Options, stop: Arc<AtomicBool>) -> Result<Outcome> {
    if opts.rate == 0 || opts.rate > 100_000 {
        bail!(
            "invalid rate {}: give samples per second between 1 and 100000 (e.g. -r 100)",
            opts.rate
        );
    }
    if let Some(n) = opts.stack_size.filter(|n| !(512..=65000).contains(n)) {
        bail!("invalid --stack-size {n}: give bytes between 512 and 65000");
    }
    // Targets first (no side effects), then the output file, then events.
    let mut tgids = Vec::new();
    for &pid in &opts.pids {
        let t = targets::check_pid(pid)?;
        if !tgids.contains(&t) {
            tgids.push(t);
        }
    }
    let target_name = if !opts.command.is_empty() {
        std::path::Path::new(&opts.command[0])
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cmd".into())
    } else if opts.all {
        "all".to_string()
    } else {
        tgids
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("-")
    };
    let out_path = opts.output.clone().unwrap_or_else(|| {
        let ts = chrono_like_now();
        PathBuf::from(format!(
            "perfpy-{target_name}-{ts}.{}",
            opts.format.extension()
        ))
    });
    let dest = crate::output::dest::Dest::prepare(&out_path)?;
    // A wrong or unreachable Collector is found now, before anything is done to a target.
    let otlp = opts
        .otlp
        .clone()
        .map(crate::output::otlp_export::Exporter::connect)
        .transpose()?;

    // --inject-python, strict with --pid: every target must be injectable, checked before any
    // event is opened or anything is done to a target.
    let mut to_inject = Vec::new();
    if opts.inject_python && !opts.all {
        if !opts.command.is_empty() {
            say!("perfpy: note: --inject-python is for -p and -a; a launched command is named by the eBPF walker from its start, or gets PYTHONPERFSUPPORT=1 where the walker cannot run (--python-perf-env: always)");
        }
        for &pid in &tgids {
            let p = perfpy_inject::discover(pid as i32)
                .with_context(|| format!("--inject-python: pid {pid}"))?;
            perfpy_inject::check_injectable(&p)
                .with_context(|| format!("--inject-python: pid {pid}"))?;
            to_inject.push(p);
        }
    }
    if opts.subprocesses && opts.pids.is_empty() {
        say!("perfpy: note: --subprocesses is for -p: a launched command's child processes are always profiled, and -a profiles every process");
    }
    let scan_stop = Arc::new(AtomicBool::new(false));
    let mut deactivator = Deactivator {
        done: false,
        halt: scan_stop.clone(),
        scanner: None,
    };

    // One event per (thread, CPU), each with a descriptor of its own for the eBPF walker too:
    // a busy server on a big machine needs thousands. The soft limit goes up to the hard one.
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) == 0
            && nofile.rlim_cur < nofile.rlim_max
        {
            nofile.rlim_cur = nofile.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &nofile);
        }
    }
    let mut period_ns = 1_000_000_000 / opts.rate;
    let is_root = nix::unistd::geteuid().is_root();
    let mut cfg = EventConfig {
        period_ns,
        stack_size: 0,
        kernel: true,
        enable_on_exec: false,
        inherit: !opts.all,
        exclude_idle: opts.all,
        wakeup_bytes: 0,
    };
    // One ring per CPU: 4 MiB (~80 samples of 48 KiB) each, less on machines with many CPUs.
    let ncpus = sys::online_cpus().len().max(1);
    let data_pages = ((64usize << 20) / ncpus / sys::page_size())
        .clamp(256, 1024)
        .next_power_of_two();
    cfg.wakeup_bytes = (data_pages * sys::page_size() / 4) as u32;

    let mut spawned = None;
    let mut perf_env_set = false;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;

    // The kernel refuses to map inherited per-task events (cpu == -1), so, as `perf record -p`
    // does, we open one event per (thread, CPU) and send all events of a CPU into one ring.
    let cpus = sys::online_cpus();
    let mut events: Vec<std::os::fd::OwnedFd> = Vec::new();
    let mut rings: Vec<Option<RingEntry>> = cpus.iter().map(|_| None).collect();
    // The eBPF frame walker, loaded before any event is opened and attached to each one as it is
    // opened: events inherited by threads created later carry the program only if their parent
    // had it when they were created. Without it, Python frames come from trampolines only.
    let t_load = Instant::now();
    // -p and launched commands: with the walker, events on every CPU whose samples of other
    // processes the walker drops (see `load_walker`).
    let (mut walker, per_cpu) = load_walker(&opts);
    tracing::debug!(elapsed = ?t_load.elapsed(), per_cpu, "eBPF walker");
    if per_cpu {
        cfg.inherit = false;
        cfg.exclude_idle = true;
    }
    if per_cpu || opts.all {
        // Events on a CPU sample at fixed instants of its clock. With a period that is a
        // multiple of the scheduler tick (HZ 100, 250, 1000), time slices that start and end on
        // ticks are always sampled at the same phase, which biases the counts (measured: 86% to
        // 126% of the CPU used at 250 Hz on a HZ=250 kernel). 1/512 longer, the phase drifts
        // through every value within a few hundred samples.
        period_ns += period_ns / 512;
        cfg.period_ns = period_ns;
    }
    // The kernel copies the stack into the ring at each sample, in the target's time: with the
    // walker naming Python frames, the copy only has to reach the native frames around them.
    cfg.stack_size = opts
        .stack_size
        .unwrap_or(if walker.is_some() { 16384 } else { 49152 })
        & !7;
    let walker_loaded = walker.is_some();
    let mut open = |cfg: &mut EventConfig,
                    tid: i32,
                    walker: &mut Option<perfpy_bpf::Walker>|
     -> Result<bool> {
        for (ci, &cpu) in cpus.iter().enumerate() {
            // tid -1: every task on this CPU (whole machine).
            let fd = match sys::perf_event_open(cfg, tid, cpu) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
                        && cfg.kernel =>
                {
                    let fix = if is_root {
                        "perfpy runs as root without CAP_PERFMON/CAP_SYS_ADMIN (a container: add --cap-add PERFMON)"
                    } else {
                        "run as root, or set kernel.perf_event_paranoid to 1"
                    };
                    say!("perfpy: warning: no permission to sample kernel code ({e}); kernel frames left out ({fix})");
                    cfg.kernel = false;
                    match sys::perf_event_open(cfg, tid, cpu) {
                        Ok(fd) => fd,
                        Err(e) => return Err(perm_error(e)),
                    }
                }
                Err(e) => return Err(perm_error(e)),
            };
            if let Some(w) = walker.as_mut() {
                if let Err(e) = w.attach(fd.as_fd()) {
                    if per_cpu {
                        // Without the program these events would keep every process's samples.
                        bail!("{e}; rerun with --no-ebpf");
                    }
                    say!("perfpy: warning: {e}; Python frames only from perf trampolines");
                    *walker = None;
                }
            }
            match &rings[ci] {
                Some(r) => {
                    sys::perf_event_set_output(fd.as_raw_fd(), r.ring.fd()).context(
                        "cannot attach an event to its CPU's ring (PERF_EVENT_IOC_SET_OUTPUT)",
                    )?;
                    events.push(fd);
                }
                None => {
                    let mut pages = data_pages;
                    let ring = loop {
                        match Ring::map(fd.try_clone()?, pages) {
                            Ok(r) => break r,
                            Err(e) if pages > 8 => {
                                tracing::debug!("ring of {pages} pages refused ({e}), trying fewer");
                                pages /= 2;
                            }
                            Err(e) => {
                                return Err(e).context(
                                    "cannot map the perf ring buffer: run as root or raise kernel.perf_event_mlock_kb",
                                )
                            }
                        }
                    };
                    events.push(fd);
                    rings[ci] = Some(RingEntry {
                        ring,
                        tid: tid.max(0) as u32,
                    });
                }
            }
        }
        Ok(true)
    };

    if opts.all {
        if !open(&mut cfg, -1, &mut walker)? {
            bail!("cannot open whole-machine events");
        }
    } else if !opts.command.is_empty() {
        // CPython 3.12+ turns its perf trampoline on from the start with PYTHONPERFSUPPORT=1,
        // which names every Python frame; older versions ignore it. The trampoline costs the
        // program time (it doubles the cost of resuming a generator), so it is only the
        // fallback where the eBPF walker cannot run, or asked for. Set by the user, it wins.
        perf_env_set = opts.python_perf_env.unwrap_or(!walker_loaded);
        let env: &[(&str, &str)] = if perf_env_set {
            &[("PYTHONPERFSUPPORT", "1")]
        } else {
            &[]
        };
        if perf_env_set && !walker_loaded && opts.python_perf_env.is_none() {
            say!("perfpy: note: no eBPF walker: the command gets PYTHONPERFSUPPORT=1, so CPython 3.12+ names its Python frames through its perf trampoline (which slows Python calls down)");
        }
        let sp = targets::spawn(&opts.command, env)?;
        if per_cpu {
            // The child waits for us before it execs; its samples count from the exec on (until
            // then it is a copy of perfpy), as enable_on_exec does for per-thread events.
            if let Some(w) = walker.as_mut() {
                w.keep_from_exec(sp.pid as u32)?;
            }
            open(&mut cfg, -1, &mut walker)?;
        } else {
            cfg.enable_on_exec = true;
            if !open(&mut cfg, sp.pid, &mut walker)? {
                bail!("the command exited before it could be profiled");
            }
        }
        tgids.push(sp.pid as u32);
        spawned = Some(sp);
    } else if per_cpu {
        if let Some(w) = walker.as_mut() {
            for &pid in &tgids {
                w.keep(pid, opts.subprocesses)?;
            }
            if opts.subprocesses {
                for pid in targets::descendants(&tgids) {
                    w.keep(pid, true)?;
                }
            }
        }
        open(&mut cfg, -1, &mut walker)?;
        if let Some(&pid) = tgids.iter().find(|p| targets::is_gone(**p)) {
            bail!("no process with pid {pid}: it exited before sampling started");
        }
    } else {
        for &pid in &tgids {
            // Threads may appear while we open events: list again until nothing is new.
            let mut seen = HashSet::new();
            let mut opened = 0;
            loop {
                let now = targets::threads(pid);
                let new: Vec<u32> = now.into_iter().filter(|t| !seen.contains(t)).collect();
                if new.is_empty() {
                    break;
                }
                for t in new {
                    seen.insert(t);
                    if open(&mut cfg, t as i32, &mut walker)? {
                        opened += 1;
                    }
                }
            }
            if opened == 0 || targets::is_gone(pid) {
                bail!("no process with pid {pid}: it exited before sampling started");
            }
        }
    }
    let events = events;
    let mut rings: Vec<RingEntry> = rings.into_iter().flatten().collect();
    // Edge-triggered: a ring whose thread exited reports HUP for ever, but inherited events
    // of its children still write into it, so it stays drained and watched.
    for (i, r) in rings.iter().enumerate() {
        epoll
            .add(
                r.ring_fd_borrow(),
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, i as u64),
            )
            .context("epoll_ctl")?;
    }

    if walker_loaded && opts.inject_python {
        let named: Vec<String> = to_inject
            .iter()
            .filter(|p| walker_names((p.version.0, p.version.1)))
            .map(|p| p.pid.to_string())
            .collect();
        if opts.all {
            say!("perfpy: note: --inject-python is not needed where the eBPF walker names Python frames (it does here); the trampolines it turns on slow the targets' Python calls down");
        } else if !named.is_empty() {
            say!("perfpy: note: --inject-python is not needed for pid {}: the eBPF walker names its Python frames; the trampoline turned on as asked slows its Python calls down (generator resumption ~2x)", named.join(", "));
        }
    }
    let inject_notes: Arc<std::sync::Mutex<HashMap<u32, String>>> = Arc::default();
    for p in &to_inject {
        inject_notes
            .lock()
            .unwrap()
            .insert(p.pid as u32, "trampoline (--inject-python)".into());
    }
    // -a --inject-python: a thread looks for Python processes every second, new ones included,
    // so that injecting (up to a few hundred ms per busy process) never holds up the rings.
    deactivator.scanner = (opts.all && opts.inject_python).then(|| {
        let (notes, halt, stop) = (inject_notes.clone(), scan_stop.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen: HashSet<(u32, u64)> = HashSet::new();
            while !halt.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                let pids: Vec<u32> = std::fs::read_dir("/proc")
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                for pid in pids {
                    if halt.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut local = HashMap::new();
                    inject_lenient(pid, &mut seen, &mut local);
                    notes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(local);
                }
                perfpy_inject::registry().prune();
                for _ in 0..10 {
                    if halt.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    });

    let py = walker.map(|w| PyWalk {
        walker: w,
        reader: perfpy_bpf::CodeReader::default(),
        procs: HashMap::new(),
        pending: HashMap::new(),
        tried: HashSet::new(),
    });
    let mut c = Collector {
        py,
        files: Files::default(),
        procs: Vec::new(),
        live: HashMap::new(),
        profile: Profile::default(),
        stats: Stats::default(),
        max_frames: opts.max_frames,
        scratch_addrs: Vec::with_capacity(256),
        scratch_sps: Vec::with_capacity(256),
        scratch_locs: Vec::with_capacity(256),
        exited: HashSet::new(),
        to_release: Default::default(),
        dying: HashMap::new(),
        walked: HashSet::new(),
        walk_refused: HashMap::new(),
        filter: per_cpu,
        not_ours: HashSet::new(),
    };
    for &pid in &tgids {
        let key = c.proc_key(pid);
        c.register_python(key);
    }
    let mut meter = crate::coverage::CpuMeter::start(
        if spawned.is_some() { &[] } else { &tgids },
        spawned.is_some(),
        opts.subprocesses,
        per_cpu,
    );
    // Turned on only now that the walker knows the targets: samples taken while the
    // activation runs (a few hundred ms) would otherwise have no Python frames at all.
    for p in &to_inject {
        match perfpy_inject::registry().activate(p, INJECT_TIMEOUT) {
            Ok(perfpy_inject::ActivateOutcome::Activated) => say!(
                "perfpy: pid {}: perf trampoline turned on (CPython {}); Python functions entered from now on are named",
                p.pid,
                p.version_string()
            ),
            Ok(perfpy_inject::ActivateOutcome::AlreadyActive) => say!(
                "perfpy: pid {}: perf trampoline already on (CPython {}); left as it is",
                p.pid,
                p.version_string()
            ),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("--inject-python: pid {}", p.pid))),
        }
    }
    if let Some(sp) = spawned.as_mut() {
        sp.release()?;
    }

    // Said once sampling runs (scripts wait for this line before starting their work).
    let what = if opts.all {
        "every process".to_string()
    } else if let Some(sp) = &spawned {
        format!("the command (pid {})", sp.pid)
    } else {
        let pids: Vec<String> = tgids.iter().map(|p| p.to_string()).collect();
        format!("pid {}", pids.join(", "))
    };
    let until = match opts.duration {
        Some(d) => format!("for {}s", d.as_secs_f64()),
        None => "until Ctrl-C".to_string(),
    };
    say!("perfpy: sampling {what} at {} Hz {until}", opts.rate);
    let start = Instant::now();
    let start_wall = SystemTime::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_status = Instant::now();
    let mut scratch = Vec::new();
    let mut ep_events = vec![EpollEvent::empty(); 64];
    let mut child_status = None;
    let end_reason;
    loop {
        // Records are read in batches (a ring wakes us when a quarter full); a process is
        // handed to the eBPF walker when its interpreter's mapping is read, and samples taken
        // before that have no Python frames from it. Short timeouts keep that gap small, at
        // start (a launched interpreter starts running code within milliseconds) and for
        // processes that start later.
        let timeout: u16 = if start.elapsed() < Duration::from_millis(300) {
            2
        } else {
            20
        };
        let _ = epoll.wait(&mut ep_events, EpollTimeout::from(timeout));
        if let Some(py) = c.py.as_mut() {
            py.poll();
        }
        for r in rings.iter_mut() {
            drain(r, &mut c, &mut scratch);
        }
        c.release_exited(Duration::from_secs(2));
        meter.poll();
        if stop.load(Ordering::Relaxed) {
            end_reason = "interrupted";
            break;
        }

        if let Some(d) = opts.duration {
            if start.elapsed() >= d {
                end_reason = "duration elapsed";
                break;
            }
        }
        if let Some(sp) = &spawned {
            match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(sp.pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                    child_status = Some(code);
                    end_reason = "command exited";
                    break;
                }
                Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                    child_status = Some(128 + sig as i32);
                    end_reason = "command killed";
                    break;
                }
                _ => {}
            }
        } else if !opts.all
            && tgids
                .iter()
                .all(|p| c.exited.contains(p) || targets::is_gone(*p))
        {
            end_reason = "target exited";
            break;
        }
        if tty && last_status.elapsed() >= Duration::from_millis(500) {
            last_status = Instant::now();
            say_part!(
                "\r\x1b[2Kperfpy: recording {:.1}s  samples {}  lost {}  processes {}",
                start.elapsed().as_secs_f64(),
                c.stats.samples,
                c.stats.lost,
                c.live.len()
            );
            let _ = std::io::stderr().flush();
        }
    }
    let duration = start.elapsed();
    crate::signals::sampling_done();
    // No activation may start after this point: the deactivation below must see them all.
    scan_stop.store(true, Ordering::Relaxed);
    if let Some(t) = deactivator.scanner.take() {
        let _ = t.join();
    }
    // A launched command still running when the recording ends is ended too, as py-spy does
    // (SIGTERM, then SIGKILL after 2 s): it was started for this recording only.
    if let (Some(sp), None) = (&spawned, child_status) {
        child_status = targets::terminate(sp.pid, Duration::from_secs(2));
    }
    for r in rings.iter_mut() {
        drain(r, &mut c, &mut scratch);
    }
    drop(rings);
    drop(events);
    let coverage = (!opts.all).then(|| meter.coverage(c.stats.samples, c.stats.lost, period_ns));
    // The walker's own cost, when the kernel counts it (sysctl kernel.bpf_stats_enabled=1); then
    // its ring buffer and programs go before symbolization, which needs memory of its own.
    tracing::debug!(
        processes = c.procs.len(),
        files = c.files.list.len(),
        locations = c.profile.locations.len(),
        stacks = c.profile.stacks.len(),
        counts = c.profile.counts.len(),
        py_functions = c.profile.py_functions.len(),
        code_cache = c.py.as_ref().map(|p| p.reader.len()),
        walker_processes = c.py.as_ref().map(|p| p.procs.len()),
        live = c.live.len(),
        dying = c.dying.len(),
        "recording size"
    );
    let walker_stats = c.py.as_ref().and_then(|p| p.walker.stats());
    let walker_ran = c.py.is_some();
    c.py = None;
    if tty {
        say_part!("\r\x1b[2K");
    }

    // Symbolize and write. (Tests wait for this debug line to signal perfpy while it names.)
    tracing::debug!("sampling ended; naming frames");
    let t_sym = Instant::now();
    let procs: HashMap<u32, &Process> = c.procs.iter().map(|p| (p.key, p)).collect();
    let symbolized = crate::symbols::resolve(&c.profile, &c.files, &procs, opts.keep_interpreter);
    // The perf maps are read: now the trampolines we turned on go off again.
    deactivator.finish();
    let refused_perf_maps = symbolized.refused_perf_maps;
    let symbolization_cut_short = symbolized.cut_short;
    let mut resolved = symbolized.resolved;
    crate::report::set_lines(&mut resolved, &c.profile, opts.lines);
    let (samples, resolved) = crate::report::build(
        &c.profile,
        resolved,
        &procs,
        &c.files,
        opts.keep_interpreter,
    );
    let report = crate::report::Report {
        locations: c.profile.locations.clone(),
        resolved,
        samples,
        period_ns,
        start: start_wall,
        duration,
        files: c
            .files
            .list
            .iter()
            .map(|f| {
                (
                    f.path.clone(),
                    f.elf.as_ref().and_then(|e| e.build_id.clone()),
                )
            })
            .collect(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let dest_name = dest.display();
    dest.write_with(|w| match opts.format {
        Format::Pprof => Ok(crate::output::pprof::write(&report, w)?),
        Format::Collapsed => Ok(crate::output::collapsed::write(&report, w)?),
        Format::Flamegraph => {
            crate::output::flamegraph::write(&report, &format!("perfpy {target_name}"), w)
        }
        Format::Speedscope => Ok(crate::output::speedscope::write(
            &report,
            &format!("perfpy {target_name}"),
            w,
        )?),
    })?;
    // Exported after the file is written; a failed export is reported after the summary.
    let exported =
        otlp.map(|exporter| crate::output::otlp::send_recording(exporter, &report, &dest_name));
    let sym_time = t_sym.elapsed();
    if let Some((runs, ns)) = walker_stats {
        if runs > 0 && ns > 0 {
            say!(
                "perfpy: eBPF walker: {runs} runs, {:.2} µs per run",
                ns as f64 / runs as f64 / 1000.0
            );
        }
    }

    let nprocs = c
        .procs
        .iter()
        .filter(|p| procs_with_samples(&c.profile, p.key))
        .count();
    say!(
        "perfpy: {end_reason} after {:.1}s: {} samples, {} lost, {} process{}, {} stacks incomplete ({:.1}%){}, symbolized in {:.2}s",
        duration.as_secs_f64(),
        c.stats.samples,
        c.stats.lost,
        nprocs,
        if nprocs == 1 { "" } else { "es" },
        c.stats.unwind_incomplete,
        100.0 * c.stats.unwind_incomplete as f64 / c.stats.samples.max(1) as f64,
        truncation_summary(&c.stats),
        sym_time.as_secs_f64(),
    );
    if let Some(code) = child_status {
        say!("perfpy: command exited with status {code}");
    }
    for (pid, why) in &refused_perf_maps {
        say!("perfpy: warning: pid {pid}: perf map not read: {why}; frames in its generated code are left as addresses");
    }
    if symbolization_cut_short {
        say!("perfpy: naming of frames cut short by a signal: some frames are left as addresses");
    }
    if let Some(cv) = &coverage {
        cv.print();
    }
    // Per process: samples and how its Python frames were named (or why not).
    // (samples, samples with Python frames, any named by the walker)
    let mut per: HashMap<u32, (u64, u64, bool)> = HashMap::new();
    let mut tramp_pids = HashSet::new();
    for s in &report.samples {
        let e = per.entry(s.pid).or_default();
        e.0 += s.count;
        if s.frames_from != "native" {
            e.1 += s.count;
        }
        e.2 |= s.frames_from.starts_with("ebpf");
        if s.frames_from.ends_with("trampoline") {
            tramp_pids.insert(s.pid);
        }
    }
    let mut rows: Vec<(u32, u64, u64, bool)> = per
        .into_iter()
        .map(|(pid, (n, py, eb))| (pid, n, py, eb))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    const SHOWN: usize = 15;
    for &(pid, n, py_samples, by_ebpf) in rows.iter().take(SHOWN) {
        let py_named = py_samples > 0;
        // Never claim more than the samples show: a source that named only some of them
        // (a trampoline turned off by someone else mid-run) is said with its share.
        let share = if py_named && py_samples < n {
            format!(
                " in {} of its samples ({:.0}%)",
                py_samples,
                100.0 * py_samples as f64 / n as f64
            )
        } else {
            String::new()
        };
        let p = c.procs.iter().rev().find(|p| p.pid == pid);
        let comm = p.map(|p| p.comm.as_str()).unwrap_or("?");
        let how = match p.and_then(|p| p.python_version.as_deref()) {
            Some(v) => {
                let note = inject_notes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&pid)
                    .cloned()
                    .or_else(|| {
                        let launched = spawned.as_ref().is_some_and(|sp| sp.pid as u32 == pid);
                        (launched && perf_env_set && trampoline_version(v))
                            .then(|| "trampoline (PYTHONPERFSUPPORT=1)".to_string())
                    });
                match (py_named, note) {
                    (true, Some(n)) if by_ebpf => format!(
                        "CPython {v}: Python frames from the eBPF walker; the {n} was on too, not needed, and slows Python calls down"
                    ),
                    (true, _)
                        if by_ebpf
                            && (tramp_pids.contains(&pid)
                                || p.is_some_and(|p| p.trampoline_seen)) =>
                    {
                        format!(
                            "CPython {v}: Python frames from the eBPF walker; its perf trampoline was on too (-X perf or PYTHONPERFSUPPORT), not needed, and slows Python calls down"
                        )
                    }
                    (true, _) if by_ebpf => {
                        format!("CPython {v}: Python frames from the eBPF walker, no trampoline{share}")
                    }
                    (true, Some(n)) => format!("CPython {v}: Python frames from the {n}{share}"),
                    (true, None) => {
                        format!(
                            "CPython {v}: Python frames from its perf trampoline (-X perf){share}"
                        )
                    }
                    (false, Some(n)) => format!("CPython {v}: native frames only ({n})"),
                    (false, None) => {
                        let mut it = v.split('.').filter_map(|x| x.parse::<u8>().ok());
                        let ver = (it.next().unwrap_or(0), it.next().unwrap_or(0));
                        let supported = perfpy_bpf::Offsets::for_version(ver).is_some()
                            || perfpy_bpf::debug_offsets::layout(ver).is_some();
                        let refused = c.walk_refused.get(&pid).cloned().unwrap_or_default();
                        let why = if !opts.ebpf {
                            "eBPF walker off (--no-ebpf)"
                        } else if !walker_ran {
                            "eBPF walker not loaded, see the warning above"
                        } else if !supported {
                            "the eBPF walker does not know this version"
                        } else if !refused.is_empty() {
                            refused.as_str()
                        } else if c.walked.contains(&pid) {
                            "no Python code ran while it was sampled"
                        } else {
                            "its interpreter could not be read: it exited first, or its symbols are stripped"
                        };
                        format!("CPython {v}: native frames only ({why}; on 3.12+ start it with -X perf or use --inject-python)")
                    }
                }
            }
            None => "native".to_string(),
        };
        say!("perfpy:   {pid:>8} {comm:<16} {n:>7} samples  {how}");
    }
    if rows.len() > SHOWN {
        say!("perfpy:   … and {} more processes", rows.len() - SHOWN);
    }
    match opts.format {
        Format::Pprof if dest_name != "stdout" => {
            say!("perfpy: wrote {dest_name}; open it with: go tool pprof -http=:8080 {dest_name}")
        }
        _ => say!("perfpy: wrote {dest_name}"),
    }
    if let Some(Err(e)) = exported {
        return Err(e);
    }
    Ok(Outcome { child_status })
}

/// The summary's part on stacks cut short: how many, by which limit, and the option that
/// raises it; and stacks deeper than the native copy that the walker completed.
fn truncation_summary(st: &Stats) -> String {
    let mut s = String::new();
    for cut in Cut::ALL {
        let n = st.truncated[cut as usize];
        if n > 0 {
            s += &format!(", {n} truncated {}", cut.summary());
        }
    }
    if st.py_beyond_copy > 0 {
        s += &format!(
            ", {} deeper than the native stack copy (Python frames complete; C code calling back into Python between the outer ones not shown: raise --stack-size, max 65000)",
            st.py_beyond_copy
        );
    }
    s
}

/// Whether CPython `X.Y[.Z]` has the perf trampoline (3.12+).
fn trampoline_version(v: &str) -> bool {
    let mut it = v.split('.').filter_map(|x| x.parse::<u8>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (3, 12)
}

/// Whether the eBPF walker names the Python frames of this CPython minor version.
fn walker_names(version: (u8, u8)) -> bool {
    // 3.13+: from the target's own debug offsets (a table that fails is refused per process).
    version >= (3, 13) || perfpy_bpf::Offsets::for_version(version).is_some()
}

/// The eBPF walker, and whether the events sample every CPU with the walker keeping only the
/// targets' samples: -p and launched commands, so that threads and processes that live less
/// than a period are sampled in proportion to their CPU time (inherited per-thread events
/// count the period per thread). Falls back to per-thread events, saying so.
fn load_walker(opts: &Options) -> (Option<perfpy_bpf::Walker>, bool) {
    if !opts.ebpf {
        return (None, false);
    }
    if !opts.all {
        let filtered =
            perfpy_bpf::Walker::load_with(opts.max_python_frames, true).and_then(|mut w| {
                w.follow_forks()?;
                Ok(w)
            });
        match filtered {
            Ok(w) => return (Some(w), true),
            Err(e) => tracing::debug!("eBPF sample filter: {e}"),
        }
    }
    match perfpy_bpf::Walker::load(opts.max_python_frames) {
        Ok(w) => {
            if !opts.all {
                say!("perfpy: warning: cannot follow the targets' processes in the kernel (RUST_LOG=debug says why): each thread is sampled per period of its own CPU time, so short-lived threads and processes are undercounted");
            }
            (Some(w), false)
        }
        Err(e) => {
            say!("perfpy: warning: {e}; Python frames only from perf trampolines");
            (None, false)
        }
    }
}

fn procs_with_samples(p: &Profile, key: u32) -> bool {
    p.counts.keys().any(|k| k.proc == key)
}

fn perm_error(e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            if nix::unistd::geteuid().is_root() {
                return anyhow::anyhow!(
                    "permission denied opening perf events ({e}) although perfpy runs as root: it lacks CAP_PERFMON (or CAP_SYS_ADMIN); in Docker add --cap-add PERFMON --cap-add SYS_PTRACE --cap-add BPF, in Kubernetes add them to the container's securityContext capabilities"
                );
            }
            // Debian and Android patch levels 3 and 4: no perf events at all without
            // CAP_PERFMON, whatever is asked.
            let extra = if paranoid.parse::<i32>().is_ok_and(|p| p >= 3) {
                " (levels 3 and above forbid perf events to unprivileged users entirely)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "permission denied opening perf events ({e}): run perfpy as root (sudo), or give it CAP_PERFMON (and CAP_SYS_PTRACE), or lower kernel.perf_event_paranoid (now {paranoid}{extra}) with `sysctl kernel.perf_event_paranoid=1`; in Docker add --cap-add PERFMON --cap-add SYS_PTRACE"
            )
        }
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => anyhow::anyhow!(
            "this kernel does not support cpu-clock sampling with perf_event_open ({e}): perfpy needs CONFIG_PERF_EVENTS"
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) => anyhow::anyhow!(
            "perf_event_open failed: {e}: perfpy opens one event per thread and CPU; raise the limit of open files (`ulimit -n 65536`) or profile fewer threads"
        ),
        _ => anyhow::anyhow!("perf_event_open failed: {e}"),
    }
}

/// Local time as YYYYmmdd-HHMMSS, for default file names.
fn chrono_like_now() -> String {
    let t = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes into our zeroed struct; `t` is a valid time_t.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        tm
    };
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

impl RingEntry {
    fn ring_fd_borrow(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by the ring, which outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.fd()) }
    }
}

#[allow(dead_code)]
fn _assert_fd(f: &File) -> i32 {
    f.as_fd().as_raw_fd()
}
