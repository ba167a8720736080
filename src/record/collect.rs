//! Collection: every record of the rings (and of the eBPF walker's ring) turned into the
//! profile: processes and their address spaces, unwinding, the merge of the walker's Python
//! frames with the native ones, aggregation.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::files::Files;
use crate::process::Process;
use crate::profile::{Cut, FrameKey, Profile};
use crate::records::{self, Record};
use crate::sys::Ring;
use crate::unwind::{self, LiveMemory};

/// How long a walker record waits for its sample (read from any CPU's ring) before it is
/// dropped: rings are drained at least every 20 ms.
pub(super) const KEEP_RECORDS_NS: u64 = 200_000_000;

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
    pub(super) walker: perfpy_bpf::Walker,
    pub(super) reader: perfpy_bpf::CodeReader,
    pub(super) procs: HashMap<u32, (perfpy_bpf::Offsets, (u8, u8))>,
    pub(super) pending: HashMap<u32, std::collections::VecDeque<perfpy_bpf::PyStack>>,
    pub(super) tried: HashSet<u32>,
    /// Python frames of off-CPU waits, by (tid, time), until their wait's record is read.
    pub(super) offcpu_py: HashMap<(u32, u64), perfpy_bpf::PyStack>,
}

impl PyWalk {
    pub(super) fn poll(&mut self) {
        let pending = &mut self.pending;
        let offcpu_py = &mut self.offcpu_py;
        self.walker.poll(&mut |s| {
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
    pub(super) live: HashMap<u32, u32>,
    pub(super) profile: Profile,
    pub(super) stats: Stats,
    pub(super) max_frames: usize,
    pub(super) scratch_addrs: Vec<u64>,
    /// The stack pointer of each unwound frame (`scratch_addrs[i]` runs with `scratch_sps[i]`).
    pub(super) scratch_sps: Vec<u64>,
    pub(super) scratch_locs: Vec<u32>,
    /// Targets (pids) whose exit ends the run.
    pub(super) exited: HashSet<u32>,
    /// Processes that exited, by key, with when: released once their last samples are in.
    pub(super) to_release: std::collections::VecDeque<(Instant, u32)>,
    /// Pids that exited, not released yet, with their process's key: samples of other CPUs'
    /// rings read after the exit record still belong to it. (Made into a new process, such a
    /// sample stayed "alive" for ever, and kept the real one's place in the eBPF walker, whose
    /// table of 4096 processes was full after a few minutes of -a churn: later processes got no
    /// Python frames.)
    pub(super) dying: HashMap<u32, u32>,
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
}

impl Collector {
    /// Frees what processes that exited at least `after` ago held only while alive: their
    /// mappings and unwind tables, their root directory, their place in the eBPF walker. Other
    /// CPUs' rings may still hold their last samples for a moment, hence the delay.
    pub(super) fn release_exited(&mut self, after: Duration) {
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

    pub(super) fn proc_key(&mut self, pid: u32) -> u32 {
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
            .is_some_and(|py| py.walker.kept(pid).is_some());
        if !kept {
            self.not_ours.insert(pid);
        }
        kept
    }

    pub(super) fn handle(&mut self, rec: Record<'_>) {
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
    pub(super) fn register_python(&mut self, key: u32) {
        let Some(py) = self.py.as_mut() else { return };
        let p = &self.procs[key as usize];
        if !p.is_python || !py.tried.insert(key) {
            return;
        }
        let Some(v) = p.python_version.as_deref() else {
            return;
        };
        let version = crate::process::minor_of(v);
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
                py.poll();
                py.take(s.tid, s.time)
            }),
            _ => None,
        };
        self.add_stack(key, &s, py_stack, None);
    }

    /// Unwinds the sample's user stack, merges the walker's Python frames (`py_stack`) and
    /// adds the stack to the profile: one CPU sample, or with `offcpu` an off-CPU wait (its
    /// nanoseconds, and whether the thread was preempted: a root frame says so).
    pub(super) fn add_stack(
        &mut self,
        key: u32,
        s: &records::Sample<'_>,
        py_stack: Option<perfpy_bpf::PyStack>,
        offcpu: Option<(u64, bool)>,
    ) {
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
        match offcpu {
            Some((ns, preempted)) => {
                if preempted {
                    let w = crate::wait::WaitKind::Preempted;
                    locs.push(self.profile.location(FrameKey::Wait(w)));
                }
                self.profile.add_offcpu(key, s.tid, &locs, ns)
            }
            None => self.profile.add(key, s.tid, &locs),
        }
        self.scratch_addrs = addrs;
        self.scratch_sps = sps;
        self.scratch_locs = locs;
    }
}

/// A process's memory, or once it is gone, that of the process it was forked from (without
/// exec since): a short-lived child's code objects are its parent's.
pub(super) struct ForkedMemory(Option<u32>);

impl perfpy_bpf::code::RemoteMemory for ForkedMemory {
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool {
        use perfpy_bpf::code::LiveMemory;
        LiveMemory.read(pid, addr, buf) || self.0.is_some_and(|pp| LiveMemory.read(pp, addr, buf))
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
        if let Some(rec) = records::parse(rec) {
            c.handle(rec);
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
