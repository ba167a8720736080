//! Collection: every record of the rings (and of the eBPF walker's ring) turned into the
//! profile: processes and their address spaces, unwinding, the merge of the walker's Python
//! frames with the native ones, aggregation.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::files::Files;
use crate::ids::ProcessKey;
use crate::process::Process;
use crate::profile::{Cut, FrameKey, Profile};
use crate::records::{self, Record};
use crate::sys::Ring;
use crate::unwind;
use perfpy_process::ReadMemory;

use super::merge;
use super::replay::Target;

/// How long a walker record waits for its sample (read from any CPU's ring) before it is
/// dropped, counted from the time of a later sample of its thread. Rings are drained every
/// 20 ms, but one after the other: after a pause (naming an interval in `top` or `agent`, a
/// busy machine) one CPU's ring brings samples up to now before another brings the thread's
/// older ones, whose records must still be there. The queue's length bounds memory (256 per
/// thread: 2.5 s at 100 Hz).
pub(super) const KEEP_RECORDS_NS: u64 = 2_000_000_000;

/// A Python stack deeper than the stack copy ends at its outermost Python frame: the native
/// frames under it (the interpreter's start, a thread's entry) are those its thread had under
/// the same outermost function in its last whole sample, so they are added from there. A whole
/// sample's are kept for that.
fn complete_root(
    p: &mut Process,
    tid: u32,
    m: &merge::Merged,
    incomplete: bool,
    stack: &mut Vec<FrameKey>,
) {
    let outer = |k: &FrameKey| match *k {
        FrameKey::Py { func, .. } => Some(FrameKey::Py { func, line: 0 }),
        _ => None,
    };
    if m.py_beyond_copy {
        let Some(last) = stack.last().and_then(outer) else {
            return;
        };
        if let Some((f, root)) = p.roots.get(&tid) {
            if *f == last {
                stack.extend_from_slice(root);
            }
        }
    } else if !incomplete && m.cut.is_none() {
        let Some(i) = stack.iter().rposition(|k| matches!(k, FrameKey::Py { .. })) else {
            return;
        };
        let Some(f) = outer(&stack[i]) else { return };
        let root = &stack[i + 1..];
        match p.roots.get_mut(&tid) {
            Some((g, r)) if *g == f && r.as_slice() == root => {}
            _ => {
                p.roots.insert(tid, (f, root.to_vec()));
            }
        }
    }
}

pub(super) struct RingEntry {
    pub(super) ring: Ring,
    #[allow(dead_code)]
    pub(super) tid: u32,
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
pub(super) struct PyWalk {
    /// `None` in a replay: the walker's records come from the fixture.
    pub(super) walker: Option<perfpy_bpf::Walker>,
    pub(super) reader: perfpy_bpf::CodeReader,
    pub(super) procs: HashMap<u32, (perfpy_bpf::Offsets, perfpy_process::Version)>,
    pub(super) pending: HashMap<u32, std::collections::VecDeque<perfpy_bpf::PyStack>>,
    pub(super) tried: HashSet<ProcessKey>,
    /// Python frames of off-CPU waits, by (tid, time), until their wait's record is read.
    pub(super) offcpu_py: HashMap<(u32, u64), perfpy_bpf::PyStack>,
}

impl PyWalk {
    pub(super) fn poll(&mut self, target: &Target) {
        let Some(walker) = self.walker.as_mut() else {
            return;
        };
        let pending = &mut self.pending;
        let offcpu_py = &mut self.offcpu_py;
        walker.poll(&mut |s| {
            if let Some(c) = target.capture() {
                c.walker(&s);
            }
            if s.offcpu {
                offcpu_py.insert((s.tid, s.time_ns), s);
                return;
            }
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
    pub(super) fn take(&mut self, tid: u32, time: u64) -> Option<perfpy_bpf::PyStack> {
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
pub(super) struct Collector {
    pub(super) py: Option<PyWalk>,
    pub(super) files: Files,
    pub(super) procs: Vec<Process>,
    pub(super) live: HashMap<u32, ProcessKey>,
    pub(super) profile: Profile,
    pub(super) stats: Stats,
    pub(super) max_frames: usize,
    pub(super) scratch_addrs: Vec<u64>,
    /// The stack pointer of each unwound frame (`scratch_addrs[i]` runs with `scratch_sps[i]`).
    pub(super) scratch_sps: Vec<u64>,
    pub(super) scratch_locs: Vec<u32>,
    pub(super) scratch_stack: Vec<FrameKey>,
    pub(super) scratch_native: Vec<merge::NativeFrame>,
    pub(super) scratch_py: Vec<merge::PyFrame>,
    /// Targets (pids) whose exit ends the run.
    pub(super) exited: HashSet<u32>,
    /// Processes that exited, by key, with when: released once their last samples are in.
    pub(super) to_release: std::collections::VecDeque<(Instant, ProcessKey)>,
    /// Pids that exited, not released yet, with their process's key: samples of other CPUs'
    /// rings read after the exit record still belong to it. (Made into a new process, such a
    /// sample stayed "alive" for ever, and kept the real one's place in the eBPF walker, whose
    /// table of 4096 processes was full after a few minutes of -a churn: later processes got no
    /// Python frames.)
    pub(super) dying: HashMap<u32, ProcessKey>,
    /// Pids ever handed to the eBPF walker (for the summary).
    pub(super) walked: HashSet<u32>,
    /// Processes the walker refused, with the reason (a 3.13+ debug-offsets table that failed).
    pub(super) walk_refused: HashMap<u32, String>,
    /// Events sample every CPU and the eBPF program keeps the targets' samples only: the
    /// records of every other process are ignored (see [`Collector::ours`]).
    pub(super) filter: bool,
    /// Processes found not to be ours, so that their next records cost no lookup: forgotten at
    /// their fork and exit records (a pid reused by a new process).
    pub(super) not_ours: HashSet<u32>,
    /// `--off-cpu`: waits being matched with their Python frames and their length.
    pub(super) offcpu: Option<super::offcpu::OffCpu>,
    /// Where the targets are read from.
    pub(super) target: Target,
}

impl Collector {
    /// An empty collector; `walker`: the eBPF walker, if loaded; `filter`: see [`Collector::filter`].
    /// It reads its targets live (see [`Collector::target`]).
    pub(super) fn new(
        walker: Option<perfpy_bpf::Walker>,
        max_frames: usize,
        filter: bool,
    ) -> Collector {
        Collector {
            py: walker.map(|walker| PyWalk {
                walker: Some(walker),
                reader: perfpy_bpf::CodeReader::default(),
                procs: HashMap::new(),
                pending: HashMap::new(),
                tried: HashSet::new(),
                offcpu_py: HashMap::new(),
            }),
            files: Files::default(),
            procs: Vec::new(),
            live: HashMap::new(),
            profile: Profile::default(),
            stats: Stats::default(),
            max_frames,
            scratch_addrs: Vec::with_capacity(256),
            scratch_sps: Vec::with_capacity(256),
            scratch_locs: Vec::with_capacity(256),
            scratch_stack: Vec::with_capacity(256),
            scratch_native: Vec::with_capacity(256),
            scratch_py: Vec::with_capacity(256),
            exited: HashSet::new(),
            to_release: Default::default(),
            dying: HashMap::new(),
            walked: HashSet::new(),
            walk_refused: HashMap::new(),
            filter,
            not_ours: HashSet::new(),
            target: Target::Live,
            offcpu: None,
        }
    }

    /// The files of the recording as the report names them: (path, build id) by file id.
    pub(super) fn report_files(&self) -> Vec<(String, Option<Vec<u8>>)> {
        super::report_files(&self.files)
    }

    /// Frees what processes that exited at least `after` ago held only while alive: their
    /// mappings and unwind tables, their root directory, their place in the eBPF walker. Other
    /// CPUs' rings may still hold their last samples for a moment, hence the delay.
    pub(super) fn release_exited(&mut self, after: Duration) {
        while let Some(&(at, key)) = self.to_release.front() {
            if at.elapsed() < after {
                break;
            }
            self.to_release.pop_front();
            let p = &mut self.procs[key.index()];
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
                    py.pending.remove(&tid.0);
                }
                py.reader.forget(pid);
                // A new process may have taken the pid meanwhile: it keeps its registration.
                if !self.live.contains_key(&pid) && py.procs.remove(&pid).is_some() {
                    if let Some(w) = py.walker.as_mut() {
                        w.remove_process(pid);
                    }
                }
                if self.filter && !self.live.contains_key(&pid) {
                    // The kernel followed it through fork: it may hold a registration we
                    // never made.
                    if let Some(w) = py.walker.as_mut() {
                        w.unkeep(pid);
                        w.remove_process(pid);
                    }
                }
            }
        }
    }

    pub(super) fn proc_key(&mut self, pid: u32) -> ProcessKey {
        if let Some(k) = self.live.get(&pid).or_else(|| self.dying.get(&pid)) {
            return *k;
        }
        let key = ProcessKey(self.procs.len() as u32);
        let mut p = Process::new(pid, key);
        self.target.refresh_maps(&mut p, &mut self.files);
        // A child that exited before its fork record was read (records of several CPUs are
        // read one ring after the other): its parent's address space, as the kernel knows.
        if p.maps.is_empty() && self.filter {
            let parent = self
                .py
                .as_ref()
                .and_then(|py| py.walker.as_ref()?.kept(pid));
            if let Some(pk) = parent.and_then(|pp| self.live.get(&pp)) {
                p = Process::forked(&self.procs[pk.index()], pid, key);
            }
        }
        self.procs.push(p);
        self.live.insert(pid, key);
        key
    }

    /// With the filter, whether a record's process is one of ours: known already, or kept
    /// by the eBPF program (a map lookup, once per process).
    pub(super) fn ours(&mut self, pid: u32) -> bool {
        if !self.filter || self.live.contains_key(&pid) {
            return true;
        }
        if self.not_ours.contains(&pid) {
            return false;
        }
        let kept = self
            .py
            .as_ref()
            .and_then(|py| py.walker.as_ref())
            .is_some_and(|w| w.kept(pid).is_some());
        if !kept {
            self.not_ours.insert(pid);
        }
        kept
    }

    /// One ring record, whatever its CPU: the collection stage's entry point (the live loop
    /// and replay both feed it).
    pub(super) fn handle(&mut self, rec: Record<'_>) {
        match rec {
            Record::Mmap(m) if m.pid == 0 => {}
            Record::Comm { pid: 0, .. }
            | Record::Fork { pid: 0, .. }
            | Record::Exit { pid: 0, .. } => {}
            Record::Sample(s) => self.sample(s),
            Record::Mmap(m) => self.mmap(&m),
            Record::Comm {
                pid,
                tid,
                exec,
                comm,
            } => self.comm(pid, tid, exec, comm),
            Record::Fork { pid, ppid, tid } => self.fork(pid, ppid, tid),
            Record::Exit { pid, tid } => self.exit(pid, tid),
            Record::Lost(n) => self.stats.lost += n,
            Record::Other => {}
        }
    }

    /// An executable mapping: its file opened (in the process's root) and its unwind table.
    fn mmap(&mut self, m: &crate::records::Mmap<'_>) {
        if !m.prot_exec || !self.ours(m.pid) {
            return;
        }
        let key = self.proc_key(m.pid);
        let path = String::from_utf8_lossy(m.filename).into_owned();
        let p = &mut self.procs[key.index()];
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

    /// A thread's name, or an exec (`exec`, a new program in the pid).
    fn comm(&mut self, pid: u32, tid: u32, exec: bool, comm: &[u8]) {
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
            && perfpy_process::proc::comm(pid, pid).is_some_and(|now| {
                now != comm
                    && self
                        .live
                        .get(&pid)
                        .is_some_and(|k| self.procs[k.index()].comm == now)
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
                    if let Some(w) = py.walker.as_mut() {
                        w.remove_process(pid);
                    }
                }
            }
            // A new program in this pid: a new process for us (its old frames keep
            // their meaning under the old key).
            if let Some(old) = self.live.remove(&pid) {
                self.procs[old.index()].alive = false;
                self.to_release.push_back((Instant::now(), old));
            }
            let key = self.proc_key(pid);
            let p = &mut self.procs[key.index()];
            p.exec(comm.clone());
            self.target.refresh_maps(p, &mut self.files);
            p.threads.insert(crate::ids::Tid(tid), comm);
        } else {
            let key = self.proc_key(pid);
            let p = &mut self.procs[key.index()];
            if pid == tid {
                p.comm = comm.clone();
            }
            p.threads.insert(crate::ids::Tid(tid), comm);
        }
    }

    /// A new process (pid == tid) or thread.
    fn fork(&mut self, pid: u32, ppid: u32, tid: u32) {
        if pid == tid {
            self.not_ours.remove(&pid);
        }
        if pid == tid && pid != ppid && !self.live.contains_key(&pid) && self.ours(pid) {
            let key = ProcessKey(self.procs.len() as u32);
            let child = match self.live.get(&ppid) {
                Some(pk) => Process::forked(&self.procs[pk.index()], pid, key),
                None => Process::new(pid, key),
            };
            self.procs.push(child);
            self.live.insert(pid, key);
        }
    }

    /// A thread or (pid == tid) process ended; the process is released a little later.
    fn exit(&mut self, pid: u32, tid: u32) {
        if pid == tid && self.not_ours.remove(&pid) {
            return;
        }
        if pid == tid && self.ours(pid) {
            if let Some(k) = self.live.remove(&pid) {
                self.procs[k.index()].alive = false;
                self.to_release.push_back((Instant::now(), k));
                self.dying.insert(pid, k);
            }
            self.exited.insert(pid);
        }
    }

    /// Registers a CPython process (2.7, 3.6 and later) with the eBPF walker, once.
    pub(super) fn register_python(&mut self, key: ProcessKey) {
        let Some(py) = self.py.as_mut() else { return };
        let p = &self.procs[key.index()];
        if !p.is_python || !py.tried.insert(key) {
            return;
        }
        let Some(v) = p.python_version else {
            return;
        };
        let version = v;
        if !super::summary::walker_names(version) {
            tracing::debug!(
                pid = p.pid,
                "CPython {v}: no eBPF walker for this version yet"
            );
            return;
        }
        let runtime = p.py_runtime_address();
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
                &PidMemory(&self.target, p.pid),
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
        let Some(walker) = py.walker.as_mut() else {
            return;
        };
        match walker.add_process(&perfpy_bpf::PyProcess {
            pid: p.pid,
            version,
            runtime,
            offsets: off,
        }) {
            Ok(()) => {
                tracing::debug!(pid = p.pid, "CPython {v}: frames walked by the eBPF walker");
                py.procs.insert(p.pid, (off, version));
                if let Some(c) = self.target.capture() {
                    c.registered(p.pid, version, runtime);
                }
                self.walked.insert(p.pid);
            }
            Err(e) => tracing::warn!("{:#}", anyhow::Error::from(e)),
        }
    }

    pub(super) fn sample(&mut self, s: records::Sample<'_>) {
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
                py.poll(&self.target);
                py.take(s.tid, s.time)
            }),
            _ => None,
        };
        self.add_stack(key, &s, py_stack, None);
    }

    /// Unwinds the sample's user stack, merges the walker's Python frames (`py_stack`) and
    /// adds the stack to the profile: one CPU sample, or with `offcpu` an off-CPU wait (its
    /// nanoseconds blocked, and runnable: those get a `preempted` root frame).
    pub(super) fn add_stack(
        &mut self,
        key: ProcessKey,
        s: &records::Sample<'_>,
        py_stack: Option<perfpy_bpf::PyStack>,
        offcpu: Option<super::offcpu::Off>,
    ) {
        self.procs[key.index()].thread_name(crate::ids::Tid(s.tid));
        let mut py_frames = std::mem::take(&mut self.scratch_py);
        py_frames.clear();
        if let Some(st) = &py_stack {
            self.name_python_frames(key, st, &mut py_frames);
        }
        let have_py = py_frames.iter().any(|f| f.key.is_some());
        let mut native = std::mem::take(&mut self.scratch_native);
        let ns = self.unwind_native(key, s, have_py, &mut native);
        let ns = merge::NativeStack {
            frames: &native,
            ..ns
        };
        let py = merge::PyStack {
            frames: &py_frames,
            cut: py_stack
                .as_ref()
                .and_then(|st| st.truncated)
                .map(|c| match c {
                    perfpy_bpf::WalkerCut::FrameLimit => Cut::PyFrames,
                    perfpy_bpf::WalkerCut::LoopBudget => Cut::PyLoopBudget,
                }),
        };
        let mut stack = std::mem::take(&mut self.scratch_stack);
        stack.clear();
        stack.extend(s.kernel.iter().map(|&k| FrameKey::Kernel(k)));
        let m = merge::merge(&ns, &py, &mut stack);
        if tracing::enabled!(tracing::Level::DEBUG) && !m.have_py {
            self.debug_no_python(s, py_stack.as_ref());
        }
        let p = &mut self.procs[key.index()];
        if m.have_py {
            complete_root(p, s.tid, &m, ns.incomplete, &mut stack);
        }
        p.trampoline_seen |= m.trampoline_replaced;
        self.stats.py_beyond_copy += m.py_beyond_copy as u64;
        self.stats.unwind_incomplete += m.unwind_incomplete as u64;
        if let Some(cut) = m.cut {
            self.stats.truncated[cut as usize] += 1;
        }
        let mut locs = std::mem::take(&mut self.scratch_locs);
        locs.clear();
        for &k in &stack {
            p.has_anon |= matches!(k, FrameKey::Anon { .. });
            locs.push(self.profile.location(k));
        }
        match offcpu {
            // Blocked, then runnable (woken, or preempted): waiting for a CPU.
            Some(super::offcpu::Off {
                blocked,
                runnable,
                kind,
            }) => {
                if let Some(kind) = kind {
                    locs.push(self.profile.location(FrameKey::Wait(kind)));
                }
                if blocked > 0 {
                    self.profile
                        .add_offcpu(key, crate::ids::Tid(s.tid), &locs, blocked)
                }
                if runnable > 0 {
                    let w = crate::wait::WaitKind::Preempted;
                    locs.push(self.profile.location(FrameKey::Wait(w)));
                    self.profile
                        .add_offcpu(key, crate::ids::Tid(s.tid), &locs, runnable)
                }
            }
            None => self.profile.add(key, crate::ids::Tid(s.tid), &locs),
        }
        self.scratch_locs = locs;
        self.scratch_stack = stack;
        self.scratch_native = native;
        self.scratch_py = py_frames;
    }

    /// Names the walker's frames of a sample (newest first), keeping their entry marks.
    fn name_python_frames(
        &mut self,
        key: ProcessKey,
        st: &perfpy_bpf::PyStack,
        out: &mut Vec<merge::PyFrame>,
    ) {
        let Some(py) = self.py.as_mut() else { return };
        let p = &self.procs[key.index()];
        let Some((off, version)) = py.procs.get(&p.pid).copied() else {
            return;
        };
        let mem = ForkedMemory(&self.target, p.pid, p.parent);
        for f in &st.frames {
            let info = py.reader.resolve(&mem, p.pid, &off, version, f);
            // A frame whose code object could not be read (its process exited before its
            // records were drained, or the object was freed and its address reused since the
            // sample) keeps its place, named as such, without a file: dropping it would take
            // its evaluation frame with it.
            let info = info.filter(|i| i.qualname != perfpy_bpf::code::UNREADABLE);
            let line = info.as_ref().map_or(0, |i| i.line);
            let func = match info {
                Some(info) => crate::profile::PyFunction {
                    qualname: info.qualname,
                    filename: info.filename,
                    first_line: info.first_line,
                },
                None => crate::profile::PyFunction {
                    qualname: perfpy_bpf::code::UNREADABLE.to_string(),
                    filename: String::new(),
                    first_line: 0,
                },
            };
            let key = Some(FrameKey::Py {
                func: self.profile.py_function(func),
                line,
            });
            // 3.12+: the address of the shim frame under the entry frame, a local of the C
            // eval call running its group.
            let entry = f.entry.then_some(if version.at_least(3, 12) {
                f.first_local
            } else {
                0
            });
            out.push(merge::PyFrame { key, entry });
        }
    }

    /// Unwinds a sample's native stack into `out` (innermost first), each frame classified
    /// for the merge (trampoline, evaluation loop) when there are Python frames to place.
    fn unwind_native(
        &mut self,
        key: ProcessKey,
        s: &records::Sample<'_>,
        have_py: bool,
        out: &mut Vec<merge::NativeFrame>,
    ) -> merge::NativeStack<'static> {
        let mut addrs = std::mem::take(&mut self.scratch_addrs);
        let mut sps = std::mem::take(&mut self.scratch_sps);
        addrs.clear();
        sps.clear();
        out.clear();
        let p = &mut self.procs[key.index()];
        let mut ns = merge::NativeStack::default();
        match s.user_regs {
            Some(regs) if regs[2] != 0 => {
                if p.mapping(regs[2]).is_none() {
                    self.target.refresh_maps(p, &mut self.files);
                }
                let mem = PidMemory(&self.target, s.pid);
                let o = unwind::unwind_sp(
                    p,
                    &mem,
                    regs,
                    s.stack,
                    self.max_frames,
                    &mut addrs,
                    Some(&mut sps),
                );
                ns.incomplete = !o.complete;
                ns.beyond_copy = !o.complete && o.truncated && !o.at_frame_limit;
                ns.cut = o.truncated.then_some(if o.at_frame_limit {
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
        ns.sps = sps.len() == addrs.len();
        for (i, &a) in addrs.iter().enumerate() {
            // Return addresses point after the call: look up the call itself.
            let lookup = if i == 0 { a } else { a.saturating_sub(1) };
            let m = p.mapping(lookup);
            out.push(merge::NativeFrame {
                key: match m.and_then(|m| m.file.as_ref().map(|f| (m, f))) {
                    Some((m, f)) => FrameKey::File {
                        file: f.id,
                        offset: lookup - m.start + m.pgoff,
                    },
                    None => FrameKey::Anon {
                        proc: key,
                        addr: lookup,
                    },
                },
                trampoline: have_py && p.trampolines.is_known_trampoline(a),
                in_eval: have_py && m.is_some_and(|m| in_eval(m, lookup)),
                sp: sps.get(i).copied().unwrap_or(0),
            });
        }
        self.scratch_addrs = addrs;
        self.scratch_sps = sps;
        ns
    }

    fn debug_no_python(&self, s: &records::Sample<'_>, st: Option<&perfpy_bpf::PyStack>) {
        if self
            .py
            .as_ref()
            .is_some_and(|py| py.procs.contains_key(&s.pid))
        {
            tracing::debug!(
                pid = s.pid,
                tid = s.tid,
                time = s.time,
                record = st.is_some(),
                frames = st.map(|st| st.frames.len()),
                no_tstate = st.map(|st| st.no_thread_state),
                read_error = st.map(|st| st.read_error),
                "sample of a walked process without Python frames"
            );
        }
    }
}

/// Whether `addr` (in mapping `m`) is inside the interpreter's evaluation function.
fn in_eval(m: &crate::process::Mapping, addr: u64) -> bool {
    m.file.as_ref().is_some_and(|f| {
        let r = f.elf.as_ref().and_then(|e| e.eval_range.clone());
        r.is_some_and(|r| {
            f.file_offset_to_vaddr(addr - m.start + m.pgoff)
                .is_some_and(|v| r.contains(&v))
        })
    })
}

/// A process's memory, or once it is gone, that of the process it was forked from (without
/// exec since): a short-lived child's code objects are its parent's.
pub(super) struct ForkedMemory<'a>(&'a Target, u32, Option<u32>);

impl ReadMemory for ForkedMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let own = self.0.read(self.1, addr, buf);
        match (&own, self.2) {
            (Ok(n), _) if *n == buf.len() => own,
            (_, Some(pp)) => self.0.read(pp, addr, buf),
            _ => own,
        }
    }
}

/// The memory of one process as the collector reads it: live, captured or replayed (see
/// [`Target`]).
pub(super) struct PidMemory<'a>(pub(super) &'a Target, pub(super) u32);

impl ReadMemory for PidMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(self.1, addr, buf)
    }
}

/// Drains one ring into the collector.
pub(super) fn drain(r: &mut RingEntry, c: &mut Collector, scratch: &mut Vec<u8>) {
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
        if let Some(parsed) = records::parse(rec) {
            c.handle(parsed);
            if let Some(cap) = c.target.capture() {
                cap.ring(rec);
            }
        }
        tail += hsize as u64;
    }
    r.ring.set_tail(tail);
}

impl RingEntry {
    pub(super) fn ring_fd_borrow(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by the ring, which outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.fd()) }
    }
}
