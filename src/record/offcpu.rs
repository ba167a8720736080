//! `--off-cpu`: the eBPF walker's off-CPU records turned into off-CPU stacks of the profile.
//! A wait's record comes after its Python frames (emitted first into the walker's ring, read
//! first); a thread stacked as it left the CPU (preempted, a page fault) gets its wait from a
//! later resume record. Waits under the threshold come from the kernel's per-thread counts at
//! the end, as one stack per thread.

use std::collections::HashMap;
use std::time::Duration;

use perfpy_bpf::{OffCpuEvent, OffCpuLost, OffCpuRecord};

use super::collect::Collector;
use crate::profile::FrameKey;
use crate::records;
use crate::wait::WaitKind;

/// A wait in progress at the end that no switch stacked: its thread and time.
#[derive(Clone, Copy, Debug)]
struct Blocked {
    pid: u32,
    tid: u32,
    ns: u64,
}

/// Each process's Python threads as read at the end, by pid (`None`: not readable).
type PythonsNow = HashMap<u32, Option<crate::dump::PythonNow>>;

/// Bytes of a blocked thread's user stack read for its native frames (as a sample's copy).
const BLOCKED_STACK: usize = 16 << 10;

/// Python frames older than this (and never claimed: a short wait's) are dropped.
const KEEP_PY_NS: u64 = 2_000_000_000;

#[derive(Default)]
pub(crate) struct OffCpu {
    /// `--min-block` in nanoseconds.
    pub(crate) min_block_ns: u64,
    /// The recording's window (CLOCK_MONOTONIC ns; end 0 while it runs): the part of a wait
    /// outside it is not counted (the programs run from before the start to the last drain).
    pub(crate) window: (u64, u64),
    /// The targets' threads at the start with their CPU time so far (schedstat, ns): one
    /// that never ran during the recording waited all of it, without a switch to see.
    idle_check: Vec<(u32, u32, u64)>,
    /// Waits whose Python frames were not read yet: they get one more poll.
    waiting: Vec<OffCpuRecord>,
    /// Stacked as they left, by tid: their wait comes with a resume record.
    pending: HashMap<u32, OffCpuRecord>,
    pub(crate) stats: OffCpuStats,
}

#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct OffCpuStats {
    /// Waits stacked, and their time.
    pub(crate) waits: u64,
    pub(crate) wait_ns: u64,
    /// Waits under the threshold, and their time.
    pub(crate) short: u64,
    pub(crate) short_ns: u64,
    /// Waits whose native stack could not be unwound to its start, or was cut short.
    pub(crate) incomplete: u64,
    pub(crate) lost: OffCpuLost,
}

impl OffCpu {
    pub(crate) fn new(min_block_ns: u64) -> OffCpu {
        OffCpu {
            min_block_ns,
            ..Default::default()
        }
    }
}

/// A wait's time into the profile: blocked, then runnable (woken, or preempted), and its kind
/// where its stack cannot tell it (no kernel frames).
pub(super) struct Off {
    pub blocked: u64,
    pub runnable: u64,
    pub kind: Option<WaitKind>,
}

impl Collector {
    /// A wait still going on at the end that no switch stacked (the thread was blocked before
    /// the recording began, or is in a system call whose return has not come): stacked with
    /// what the thread has now — its Python frames as `perfpy dump` reads them, its native
    /// frames unwound from the registers the kernel saved at its system call — under its kind.
    /// The thread is still in that call, so that is the stack it waits with.
    fn add_blocked_now(&mut self, w: Blocked, pythons: &mut PythonsNow) {
        let Blocked { pid, tid, ns } = w;
        let key = self.proc_key(pid);
        let (kind, sp_pc) = syscall_now(pid, tid);
        let Some((sp, pc)) = sp_pc.filter(|_| self.target.is_live()) else {
            let root = self.profile.location(FrameKey::Wait(kind));
            self.profile
                .add_offcpu(key, crate::ids::Tid(tid), &[root], ns);
            return;
        };
        let mut stack = vec![0u8; BLOCKED_STACK];
        let n = perfpy_process::ReadMemory::read(&perfpy_process::LiveMemory(pid), sp, &mut stack)
            .unwrap_or(0);
        stack.truncate(n);
        self.register_python(key);
        let py_stack = pythons
            .entry(pid)
            .or_insert_with(|| crate::dump::PythonNow::read(&self.procs[key.index()]))
            .as_ref()
            .and_then(|py| py.stack(tid));
        let s = records::Sample {
            ip: pc,
            pid,
            tid,
            time: 0,
            cpu: 0,
            period: 0,
            kernel: Vec::new(),
            user_regs: Some([0, sp, pc]),
            stack: &stack,
        };
        let off = Off {
            blocked: ns,
            runnable: 0,
            kind: Some(kind),
        };
        self.add_stack(key, &s, py_stack, Some(off));
        if let Some(o) = self.offcpu.as_mut() {
            o.stats.waits += 1;
            o.stats.wait_ns += ns;
        }
    }

    /// Waits still going on when the recording ends, up to its end: those stacked as they left
    /// with their stacks, the others (blocked in a system call, stacked only when it returns)
    /// with their kind from the system call, as a root frame alone.
    fn add_in_progress(&mut self) {
        let Some(off) = self.offcpu.as_mut() else {
            return;
        };
        let (start, end) = off.window;
        let min_block = off.min_block_ns;
        let pending: Vec<OffCpuRecord> = off.pending.drain().map(|(_, r)| r).collect();
        // Threads that did not run at all: off the CPU for the whole recording.
        let idle: Vec<(u32, u32)> = off
            .idle_check
            .drain(..)
            .filter(|&(pid, tid, ran)| run_time(pid, tid) == Some(ran))
            .map(|(pid, tid, _)| (pid, tid))
            .collect();
        // Still off the CPU: the kernel still holds its start. Otherwise it ran again and its
        // resume record was lost (a full ring): its wait is not known, and not counted.
        let still: std::collections::HashSet<u32> =
            match self.py.as_ref().and_then(|py| py.walker.as_ref()) {
                Some(w) => w
                    .waits_in_progress()
                    .iter()
                    .filter(|w| w.stacked)
                    .map(|w| w.tid)
                    .collect(),
                None => Default::default(),
            };
        for mut r in pending.into_iter().filter(|r| still.contains(&r.tid)) {
            let stack = self
                .py
                .as_mut()
                .and_then(|py| py.offcpu_py.remove(&(r.tid, r.time_ns)));
            r.wait_ns = end.saturating_sub(r.time_ns);
            // Preempted: runnable all along. Otherwise not known to be woken yet.
            r.runq_ns = if r.state == 0 { r.wait_ns } else { 0 };
            r.time_ns = end;
            self.add_wait(&r, stack);
        }
        let mut blocked: Vec<Blocked> = idle
            .into_iter()
            .map(|(pid, tid)| {
                tracing::debug!(pid, tid, "off-CPU: did not run during the recording");
                Blocked {
                    pid,
                    tid,
                    ns: end.saturating_sub(start),
                }
            })
            .collect();
        self.add_unstacked(&mut blocked, (start, end), min_block);
        // Each process's Python threads read once, however many of them wait.
        let mut pythons = PythonsNow::new();
        for w in blocked {
            self.add_blocked_now(w, &mut pythons);
        }
    }

    /// Waits in progress that no switch stacked (blocked in a system call since before the
    /// window, or not yet returned): short ones counted, the others into `blocked`.
    fn add_unstacked(
        &mut self,
        blocked: &mut Vec<Blocked>,
        (start, end): (u64, u64),
        min_block: u64,
    ) {
        let Some(walker) = self.py.as_ref().and_then(|py| py.walker.as_ref()) else {
            return;
        };
        for w in walker.waits_in_progress() {
            if w.stacked || w.pid == 0 {
                continue;
            }
            let from = if w.ended {
                end.saturating_sub(w.before_ns)
            } else {
                w.since_ns.saturating_sub(w.before_ns)
            };
            let ns = end.saturating_sub(from.max(start));
            if ns == 0 || !std::path::Path::new(&format!("/proc/{}/task/{}", w.pid, w.tid)).exists()
            {
                continue;
            }
            tracing::debug!(?w, ns, "off-CPU: wait in progress at the end");
            if ns < min_block {
                let key = self.proc_key(w.pid);
                let root = self.profile.location(FrameKey::Wait(WaitKind::Short));
                self.profile
                    .add_offcpu(key, crate::ids::Tid(w.tid), &[root], ns);
            } else {
                blocked.push(Blocked {
                    pid: w.pid,
                    tid: w.tid,
                    ns,
                });
            }
        }
    }
}

/// CLOCK_MONOTONIC now, in ns (the clock of the eBPF programs' bpf_ktime_get_ns).
pub(super) fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

impl Collector {
    /// The recording starts (`end` false) or ends now: off-CPU time is counted inside.
    pub(super) fn offcpu_window(&mut self, end: bool) {
        if let Some(off) = self.offcpu.as_mut() {
            let now = monotonic_ns();
            if end {
                off.window.1 = now;
            } else {
                off.window.0 = now;
                off.idle_check = self
                    .live
                    .keys()
                    .flat_map(|&pid| {
                        crate::targets::threads(pid)
                            .into_iter()
                            .filter_map(move |tid| Some((pid, tid, run_time(pid, tid)?)))
                    })
                    .collect();
            }
        }
    }

    /// Reads the walker's rings (Python frames first) and adds the waits they complete.
    pub(super) fn poll_offcpu(&mut self) {
        let (Some(py), Some(off)) = (self.py.as_mut(), self.offcpu.as_mut()) else {
            return;
        };
        py.poll(&self.target);
        let mut events = Vec::new();
        if let Some(w) = py.walker.as_mut() {
            w.poll_offcpu(&mut |e| events.push(e));
        }
        let mut ready: Vec<OffCpuRecord> = std::mem::take(&mut off.waiting);
        let mut births = Vec::new();
        for e in events {
            match e {
                OffCpuEvent::Wait(r) if r.pending => {
                    off.pending.insert(r.tid, r);
                }
                OffCpuEvent::Wait(r) => {
                    if r.has_py && !py.offcpu_py.contains_key(&(r.tid, r.time_ns)) {
                        off.waiting.push(r);
                    } else {
                        ready.push(r);
                    }
                }
                // A new thread's first wait for a CPU (under the threshold: counted as short).
                OffCpuEvent::Resume {
                    pid,
                    tid,
                    time_ns,
                    wait_ns,
                    birth: true,
                    ..
                } => {
                    if wait_ns >= off.min_block_ns {
                        births.push((pid, tid, time_ns, wait_ns));
                    }
                }
                OffCpuEvent::Resume {
                    tid,
                    wait_ns,
                    runq_ns,
                    ..
                } => {
                    if let Some(mut r) = off.pending.remove(&tid) {
                        // Under the threshold: counted by the kernel with the short waits.
                        if wait_ns >= off.min_block_ns {
                            r.wait_ns = wait_ns;
                            r.runq_ns = runq_ns.min(wait_ns);
                            ready.push(r);
                        }
                    }
                }
            }
        }
        for (pid, tid, time_ns, wait_ns) in births {
            self.add_birth(pid, tid, time_ns, wait_ns);
        }
        let latest = ready.iter().map(|r| r.time_ns).max().unwrap_or(0);
        for r in ready {
            let stack = self
                .py
                .as_mut()
                .and_then(|py| py.offcpu_py.remove(&(r.tid, r.time_ns)));
            self.add_wait(&r, stack);
        }
        if let Some(py) = self.py.as_mut() {
            py.offcpu_py.retain(|_, s| s.time_ns + KEEP_PY_NS > latest);
        }
    }

    /// A new thread's wait for its first CPU: `preempted`, with no other frame (it has run no
    /// code yet).
    fn add_birth(&mut self, pid: u32, tid: u32, time_ns: u64, wait_ns: u64) {
        let window = self.offcpu.as_ref().map(|o| o.window).unwrap_or((0, 0));
        let (_, ns) = split_wait(time_ns, wait_ns, wait_ns, window);
        if pid == 0 || ns == 0 {
            return;
        }
        let key = self.proc_key(pid);
        let root = self.profile.location(FrameKey::Wait(WaitKind::Preempted));
        self.profile
            .add_offcpu(key, crate::ids::Tid(tid), &[root], ns);
        if let Some(off) = self.offcpu.as_mut() {
            off.stats.waits += 1;
            off.stats.wait_ns += ns;
        }
    }

    /// One wait into the profile: unwound and merged as a CPU sample is; the part of it
    /// runnable (woken, or preempted) goes to the same stack as `preempted`.
    fn add_wait(&mut self, r: &OffCpuRecord, py_stack: Option<perfpy_bpf::PyStack>) {
        let window = self.offcpu.as_ref().map(|o| o.window).unwrap_or((0, 0));
        let runq = if r.state == 0 { r.wait_ns } else { r.runq_ns };
        let (blocked, runnable) = split_wait(r.time_ns, r.wait_ns, runq, window);
        let wait_ns = blocked + runnable;
        if r.pid == 0 || wait_ns == 0 {
            return;
        }
        let key = self.proc_key(r.pid);
        self.register_python(key);
        let s = records::Sample {
            ip: r.user_regs[2],
            pid: r.pid,
            tid: r.tid,
            time: r.time_ns,
            cpu: 0,
            period: 0,
            kernel: r.kernel.clone(),
            user_regs: (r.user_regs[1] != 0).then_some(r.user_regs),
            stack: &r.stack,
        };
        // The CPU samples' unwinding counters stay theirs (the summary gives them as shares
        // of the samples): a wait's are counted here.
        let st = &self.stats;
        let before = (
            st.unwind_incomplete,
            st.no_user_regs,
            st.py_beyond_copy,
            st.truncated,
        );
        let off = Off {
            blocked,
            runnable,
            kind: None,
        };
        self.add_stack(key, &s, py_stack, Some(off));
        let st = &mut self.stats;
        let incomplete = st.unwind_incomplete > before.0 || st.truncated != before.3;
        (
            st.unwind_incomplete,
            st.no_user_regs,
            st.py_beyond_copy,
            st.truncated,
        ) = before;
        if let Some(off) = self.offcpu.as_mut() {
            off.stats.waits += 1;
            off.stats.wait_ns += wait_ns;
            off.stats.incomplete += u64::from(incomplete);
        }
    }

    /// At the end: the last records, the short waits per thread (one stack each), what was
    /// lost, and the root frames of every wait kind (named with the others).
    pub(super) fn finish_offcpu(&mut self) {
        if self.offcpu.is_none() {
            return;
        }
        // Twice: Python frames read by the first poll's last ring read are matched by the
        // second.
        self.poll_offcpu();
        self.poll_offcpu();
        // Records still waiting for Python frames that never came: without them.
        if let Some(off) = self.offcpu.as_mut() {
            let left = std::mem::take(&mut off.waiting);
            for r in left {
                self.add_wait(&r, None);
            }
        }
        self.add_in_progress();
        let (shorts, lost) = match self.py.as_ref().and_then(|py| py.walker.as_ref()) {
            Some(w) => (w.short_waits(), w.offcpu_lost()),
            None => return,
        };
        let root = self.profile.location(FrameKey::Wait(WaitKind::Short));
        let mut stats = OffCpuStats::default();
        for ((pid, tid), w) in shorts {
            stats.short += w.count;
            stats.short_ns += w.ns;
            let key = self.proc_key(pid);
            self.profile
                .add_offcpu(key, crate::ids::Tid(tid), &[root], w.ns);
        }
        for k in WaitKind::ALL {
            self.profile.location(FrameKey::Wait(k));
        }
        if let Some(off) = self.offcpu.as_mut() {
            off.stats.short = stats.short;
            off.stats.short_ns = stats.short_ns;
            off.stats.lost = lost;
        }
    }
}

/// A wait ending at `time` after `wait` ns, the last `runq` of them runnable, clipped to the
/// recording's `window` (end 0 while it runs): its (blocked, runnable) ns inside.
fn split_wait(time: u64, wait: u64, runq: u64, (start, end): (u64, u64)) -> (u64, u64) {
    let until = if end > 0 { time.min(end) } else { time };
    let clip = |from: u64, to: u64| to.min(until).saturating_sub(from.max(start));
    let woke = time.saturating_sub(runq.min(wait));
    (clip(time.saturating_sub(wait), woke), clip(woke, time))
}

/// A thread's time on a CPU so far (ns), from the kernel's schedstat.
fn run_time(pid: u32, tid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A thread blocked now: the kind of its wait, from the system call it is in (x86-64 numbers;
/// `/proc/PID/task/TID/syscall`), and the user stack and instruction pointers the kernel saved
/// at that call — one read for both.
fn syscall_now(pid: u32, tid: u32) -> (WaitKind, Option<(u64, u64)>) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).unwrap_or_default();
    let sp_pc = perfpy_process::proc::Syscall::parse(&s).and_then(|c| c.sp_pc);
    (kind_of_syscall(&s), sp_pc)
}

/// The wait kind of a system call, from its line of `/proc/PID/task/TID/syscall`.
fn kind_of_syscall(s: &str) -> WaitKind {
    let mut words = s.split_whitespace();
    let nr = words.next().and_then(|n| n.parse::<i64>().ok());
    // Its arguments, in hex.
    let args: Vec<u64> = words
        .take(6)
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect();
    match nr {
        // select/pselect6 with no descriptors (2.7's and older 3.x's time.sleep), poll/ppoll
        // with none: a sleep.
        Some(23 | 270) if args.first() == Some(&0) => WaitKind::Sleep,
        Some(7 | 271) if args.get(1) == Some(&0) => WaitKind::Sleep,
        Some(0 | 17 | 19 | 295) => WaitKind::IoRead,
        Some(35 | 230) => WaitKind::Sleep,
        Some(202) => WaitKind::Lock,
        Some(7 | 23 | 232 | 270 | 271 | 281 | 441) => WaitKind::Poll,
        Some(42 | 43 | 45 | 47 | 288 | 299) => WaitKind::Network,
        _ => WaitKind::Other,
    }
}

/// A thread's name, CPU ns, off-CPU ns per wait kind, and the time it held the GIL (running
/// Python, or preempted in Python code), for a Python thread.
type ThreadRow = (String, u64, HashMap<&'static str, u64>, Option<u64>);

/// The off-CPU part of the summary: waits stacked and counted, what was lost, and per thread
/// (the 12 with the most recorded time) its wall time split into CPU and each wait kind: two
/// threads each half on CPU and half in `GIL` are serialised by the GIL.
pub(super) fn print_summary(c: &Collector, report: &crate::report::Report, wall: Duration) {
    let Some(off) = c.offcpu.as_ref() else {
        return;
    };
    let st = off.stats;
    say!(
        "perfpy: off-CPU: {} waits of at least {} stacked ({:.2} s), {} shorter ones counted ({:.2} s)",
        st.waits,
        human_ns(off.min_block_ns),
        st.wait_ns as f64 / 1e9,
        st.short,
        st.short_ns as f64 / 1e9
    );
    if st.incomplete > 0 {
        say!(
            "perfpy: off-CPU: {} of the stacked waits incomplete ({:.1}%): their outer native frames are missing",
            st.incomplete,
            st.incomplete as f64 * 100.0 / st.waits.max(1) as f64
        );
    }
    if st.lost.records > 0 {
        say!("perfpy: warning: off-CPU: {} waits lost (the ring was full): raise --min-block, or profile fewer threads", st.lost.records);
    }
    if st.lost.short_threads > 0 {
        say!("perfpy: warning: off-CPU: short waits of {} threads not counted (per-thread table full)", st.lost.short_threads);
    }
    let mut per: HashMap<(u32, u32), ThreadRow> = HashMap::new();
    for s in &report.samples {
        let e = per
            .entry((s.pid, s.tid.0))
            .or_insert_with(|| (s.thread.clone(), 0, HashMap::new(), None));
        e.1 += s.count * report.period_ns;
        if let Some(w) = s.wait {
            *e.2.entry(w.label()).or_default() += s.offcpu_ns;
        }
        // A thread runs Python code only while it holds the GIL, and keeps it when preempted.
        let python = s.frames_from.python();
        if s.python_version.is_some() {
            let held = e.3.get_or_insert(0);
            let kept = s.wait == Some(WaitKind::Preempted) && !s.gil_wait;
            if python && (s.wait.is_none() || kept) {
                *held += s.count * report.period_ns + s.offcpu_ns;
            }
        }
    }
    let mut rows: Vec<_> = per.into_iter().collect();
    rows.sort_by_key(|(k, (_, cpu, w, _))| (std::cmp::Reverse(cpu + w.values().sum::<u64>()), *k));
    let wall = wall.as_nanos().max(1) as f64;
    for ((pid, tid), (name, cpu, waits, held)) in rows.into_iter().take(12) {
        let gil = waits.get(WaitKind::Gil.label()).copied().unwrap_or(0);
        let mut kinds: Vec<_> = waits.into_iter().filter(|(_, ns)| *ns > 0).collect();
        kinds.sort_by_key(|(k, ns)| (std::cmp::Reverse(*ns), *k));
        let kinds: Vec<String> = kinds
            .iter()
            .map(|(k, ns)| format!("{k} {:.0}%", *ns as f64 * 100.0 / wall))
            .collect();
        let gil = match held {
            Some(h) => format!(
                "; GIL held ~{:.0}%, waited for {:.0}%",
                h as f64 * 100.0 / wall,
                gil as f64 * 100.0 / wall
            ),
            None => String::new(),
        };
        say!(
            "perfpy:   {pid}/{tid} {name}: on CPU {:.0}%, off CPU: {}{gil}",
            cpu as f64 * 100.0 / wall,
            if kinds.is_empty() {
                "-".to_string()
            } else {
                kinds.join(", ")
            }
        );
    }
}

/// `1ms`, `500µs`, `2s`: the threshold as given.
fn human_ns(ns: u64) -> String {
    match ns {
        0 => "0".into(),
        n if n % 1_000_000_000 == 0 => format!("{}s", n / 1_000_000_000),
        n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        n if n % 1000 == 0 => format!("{}µs", n / 1000),
        n => format!("{n}ns"),
    }
}

#[cfg(test)]
mod tests {
    use super::split_wait;

    #[test]
    fn a_wait_splits_into_blocked_then_runnable_inside_the_window() {
        // 10 ns off the CPU until 100, the last 3 runnable.
        assert_eq!(split_wait(100, 10, 3, (0, 0)), (7, 3));
        // The window starts at 95: 2 blocked, 3 runnable inside; ends at 98: 5 blocked, 1.
        assert_eq!(split_wait(100, 10, 3, (95, 0)), (2, 3));
        assert_eq!(split_wait(100, 10, 3, (0, 98)), (7, 1));
        assert_eq!(split_wait(100, 10, 3, (91, 96)), (5, 0));
        // Preempted: all runnable; a runnable part longer than the wait is the wait.
        assert_eq!(split_wait(100, 10, 10, (0, 0)), (0, 10));
        assert_eq!(split_wait(100, 10, 50, (0, 0)), (0, 10));
        // Outside the window.
        assert_eq!(split_wait(100, 10, 3, (200, 0)), (0, 0));
    }
}
