//! The eBPF frame walker: CPython's Python frames at the sample instant.
//!
//! The program (`src/bpf/walker.bpf.c`, compiled by clang through libbpf-cargo) runs on
//! perfpy's sampling events. For each registered process it walks the sampled thread's frame
//! chain and emits (code object, instruction pointer, flags) per frame into a ring buffer. User
//! space ([`CodeReader`]) turns code objects into names, files and lines.
//!
//! Supported: CPython 2.7 and 3.6 – 3.10 (`PyFrameObject` chain, thread matched on its
//! `thread_id`, the pthread_t that equals the thread's fsbase) and 3.11 – 3.13
//! (`_PyInterpreterFrame` chain, thread matched on `native_thread_id`). Offsets per version are
//! typed tables in [`offsets`], handed to the program per process through the `procs` map.

pub mod code;
pub mod debug_offsets;
pub mod offcpu;
pub mod offsets;

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, RingBuffer, RingBufferBuilder};

#[allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    dead_code,
    non_camel_case_types
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/walker.skel.rs"));
}

pub use code::{CodeReader, PyFrameInfo};
pub use offcpu::{InProgress, OffCpuEvent, OffCpuLost, OffCpuRecord, ShortWaits};
pub use offsets::Offsets;

/// Default of `--max-python-frames`: above CPython's default recursion limit (1,000).
pub const DEFAULT_PY_FRAMES: u32 = 1024;
/// The most Python frames a record can be asked to hold (a 640 KiB record).
pub const MAX_PY_FRAMES_CAP: u32 = 16384;
const REC_NO_TSTATE: u32 = 1;
const REC_TRUNCATED: u32 = 2;
const REC_READ_ERROR: u32 = 4;
const REC_LOOP_BUDGET: u32 = 8;
const REC_OFFCPU: u32 = 16;
pub const FRAME_ENTRY: u32 = 0x100;
const KEEP_CHILDREN: u32 = 1;
const KEEP_FROM_EXEC: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot load the eBPF frame walker: {0}; it needs root or CAP_BPF + CAP_PERFMON, a kernel with BTF (/sys/kernel/btf/vmlinux) and bpf_loop (5.17+)")]
    Load(String),
    #[error("cannot attach the eBPF frame walker to a perf event: {0}")]
    Attach(String),
    #[error("cannot register pid {pid} with the eBPF walker: {detail}")]
    Register { pid: u32, detail: String },
    #[error("--max-python-frames {0}: choose from 1 to {MAX_PY_FRAMES_CAP}")]
    FrameLimit(u32),
    #[error("cannot trace context switches for --off-cpu: {0}; it needs root (or CAP_BPF + CAP_PERFMON) and a kernel with BTF (tracepoints sched_switch and sys_exit)")]
    OffCpu(String),
}

/// One frame as the program saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyFrameRef {
    pub code: u64,
    pub instr: u64,
    /// First Python frame run by its C-level `_PyEval_EvalFrameDefault` call.
    pub entry: bool,
    pub owner: u8,
    /// ≤ 3.10: the frame's first local (`self` or `cls` in a method), for qualified names.
    pub first_local: u64,
    /// `co_name ^ rotl(co_filename, 1)` read at the sample: 0 where unread.
    pub ident: u64,
}

/// Why the walker stopped before the outermost Python frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkerCut {
    /// More Python frames than `--max-python-frames`.
    FrameLimit,
    /// The walk's loop budget (twice the frame limit: 3.12+ perf trampolines add one shim frame
    /// per call) ran out first.
    LoopBudget,
}

/// The Python stack of one sample, newest frame first.
#[derive(Clone, Debug)]
pub struct PyStack {
    pub pid: u32,
    pub tid: u32,
    /// CLOCK_MONOTONIC nanoseconds (the perf events use the same clock).
    pub time_ns: u64,
    pub frames: Vec<PyFrameRef>,
    /// Set when outer Python frames are missing, with the limit that cut them.
    pub truncated: Option<WalkerCut>,
    /// The thread holds no Python thread state (a native thread): no Python frames.
    pub no_thread_state: bool,
    pub read_error: bool,
    /// Taken for an off-CPU wait (see [`OffCpuRecord`]), not for a CPU sample.
    pub offcpu: bool,
}

/// A process handed to the walker.
#[derive(Clone, Debug)]
pub struct PyProcess {
    pub pid: u32,
    pub version: (u8, u8),
    /// Absolute address of `_PyRuntime` (3.7+) or of `interp_head` (2.7, 3.6) in the process.
    pub runtime: u64,
    /// Its offsets: [`Offsets::for_version`] up to 3.12, its own `_Py_DebugOffsets` from 3.13.
    pub offsets: Offsets,
}

/// The loaded program, its attachments and its ring buffer.
pub struct Walker {
    /// Borrows `*open_obj` (hence `'static`): dropped before it, in `Drop`.
    skel: Option<Box<skel::WalkerSkel<'static>>>,
    /// Owned; freed in `Drop` after everything that borrows it.
    open_obj: *mut MaybeUninit<libbpf_rs::OpenObject>,
    links: Vec<Link>,
    ring: Option<RingBuffer<'static>>,
    out: Arc<Mutex<Vec<PyStack>>>,
    offcpu_out: Arc<Mutex<Vec<OffCpuEvent>>>,
    offcpu: bool,
}

impl Drop for Walker {
    fn drop(&mut self) {
        // Users of the program first, then the program and its maps, then the object they
        // borrow.
        self.ring = None;
        self.links.clear();
        self.skel = None;
        // SAFETY: `open_obj` came from `Box::into_raw` in `load` and is freed only here, once;
        // the skeleton borrowing it was dropped just above.
        drop(unsafe { Box::from_raw(self.open_obj) });
    }
}

/// Bytes of a record holding `frames` Python frames.
fn record_bytes(frames: u32) -> u32 {
    HEADER_SIZE as u32 + frames * FRAME_SIZE as u32
}

/// The ring buffer's size for `ncpus` CPUs sampling at up to a few kHz: per CPU 256 KiB, or 32
/// of the longest records when they are longer (most stacks are shallow; 32 deep ones are
/// about 60 ms at 497 Hz, three times the reader's 20 ms period), from 1 MiB to 64 MiB, a power
/// of two as the kernel requires.
fn ring_bytes(ncpus: usize, max_frames: u32) -> u32 {
    let per_cpu = (256u32 << 10).max(32 * record_bytes(max_frames));
    ((ncpus.max(1) as u32).saturating_mul(per_cpu))
        .clamp(1 << 20, 64 << 20)
        .next_power_of_two()
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ProcCfg {
    runtime: u64,
    off: [i32; 18],
}

/// `struct pyframe` and the header of `struct record` in walker.h.
const FRAME_SIZE: usize = 40;
const HEADER_SIZE: usize = 24;

fn parse(data: &[u8]) -> Option<PyStack> {
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    let pid = u32_at(0)?;
    let tid = u32_at(4)?;
    let time_ns = u64_at(8)?;
    // Records hold only their frames: never read past the record.
    let n = (u32_at(16)? as usize).min(data.len().saturating_sub(HEADER_SIZE) / FRAME_SIZE);
    let flags = u32_at(20)?;
    let mut frames = Vec::with_capacity(n);
    for i in 0..n {
        let o = HEADER_SIZE + i * FRAME_SIZE;
        let f = u32_at(o + 32)?;
        frames.push(PyFrameRef {
            code: u64_at(o)?,
            instr: u64_at(o + 8)?,
            first_local: u64_at(o + 16)?,
            ident: u64_at(o + 24)?,
            entry: f & FRAME_ENTRY != 0,
            owner: (f & 0xff) as u8,
        });
    }
    Some(PyStack {
        pid,
        tid,
        time_ns,
        frames,
        truncated: if flags & REC_TRUNCATED != 0 {
            Some(WalkerCut::FrameLimit)
        } else if flags & REC_LOOP_BUDGET != 0 {
            Some(WalkerCut::LoopBudget)
        } else {
            None
        },
        no_thread_state: flags & REC_NO_TSTATE != 0,
        read_error: flags & REC_READ_ERROR != 0,
        offcpu: flags & REC_OFFCPU != 0,
    })
}

impl Walker {
    /// Loads the program (the verifier checks it here), its records holding up to
    /// `max_py_frames` Python frames.
    pub fn load(max_py_frames: u32) -> Result<Walker, BpfError> {
        Self::load_with(max_py_frames, false)
    }

    /// Loads the program; with `filter`, it keeps only the samples of the processes given to
    /// [`Walker::keep`] (and, with their `children` flag, of the processes they fork), for
    /// events that sample every task of a CPU. [`Walker::follow_forks`] then starts following.
    pub fn load_with(max_py_frames: u32, filter: bool) -> Result<Walker, BpfError> {
        Self::load_full(max_py_frames, filter, None)
    }

    /// Loads the program; with `offcpu` (the threshold in ns), the context-switch programs of
    /// `--off-cpu` too, started by [`Walker::attach_offcpu`].
    pub fn load_full(
        max_py_frames: u32,
        filter: bool,
        offcpu: Option<u64>,
    ) -> Result<Walker, BpfError> {
        if !(1..=MAX_PY_FRAMES_CAP).contains(&max_py_frames) {
            return Err(BpfError::FrameLimit(max_py_frames));
        }
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(BpfError::Load(
                "this kernel has no BTF (/sys/kernel/btf/vmlinux: CONFIG_DEBUG_INFO_BTF)".into(),
            ));
        }
        // libbpf's own messages go to our log (RUST_LOG=debug), not raw onto stderr: the
        // error we return says what failed and what to do.
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Info, |_, msg: String| {
            tracing::debug!("libbpf: {}", msg.trim_end());
        })));
        // Recent kernels account BPF memory to the cgroup; older ones need RLIMIT_MEMLOCK
        // raised. Raising it may be refused (containers): that is not an error by itself.
        let rl = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct we pass; failure is only logged.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
            tracing::debug!("setrlimit(RLIMIT_MEMLOCK) refused; relying on memcg accounting");
        }
        // The open object must outlive the skeleton: the walker owns both and drops them in
        // order. Until the walker exists, an early return leaks it (a few hundred bytes).
        let open_obj = Box::into_raw(Box::new(MaybeUninit::<libbpf_rs::OpenObject>::uninit()));
        // SAFETY: `open_obj` is a valid, exclusively owned allocation that lives until the
        // walker's Drop, after the skeleton borrowing it.
        let obj_ref: &'static mut MaybeUninit<libbpf_rs::OpenObject> = unsafe { &mut *open_obj };
        let mut open = skel::WalkerSkelBuilder::default()
            .open(obj_ref)
            .map_err(|e| BpfError::Load(e.to_string()))?;
        let ncpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .max(libbpf_rs::num_possible_cpus().unwrap_or(1));
        open.maps
            .events
            .set_max_entries(ring_bytes(ncpus, max_py_frames))
            .map_err(|e| BpfError::Load(e.to_string()))?;
        // One scratch record per CPU (indexed by CPU number: possible CPUs, which may be more
        // than those online), each holding the frame limit's frames.
        let possible = libbpf_rs::num_possible_cpus().unwrap_or(ncpus).max(ncpus);
        open.maps
            .scratch
            .set_max_entries(possible as u32)
            .and_then(|()| {
                open.maps
                    .scratch
                    .set_value_size(record_bytes(max_py_frames))
            })
            .map_err(|e| BpfError::Load(e.to_string()))?;
        // Our PID namespace: the program reports pids as we see them.
        let ns = std::fs::metadata("/proc/self/ns/pid")
            .map_err(|e| BpfError::Load(format!("/proc/self/ns/pid: {e}")))?;
        {
            use std::os::unix::fs::MetadataExt;
            let ro = open
                .maps
                .rodata_data
                .as_deref_mut()
                .ok_or_else(|| BpfError::Load("no .rodata in the program".into()))?;
            ro.pidns_dev = ns.dev();
            ro.pidns_ino = ns.ino();
            // The initial PID namespace has a fixed inode number (PROC_PID_INIT_INO).
            const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
            ro.in_child_pidns = u8::from(ns.ino() != PROC_PID_INIT_INO);
            ro.max_py_frames = max_py_frames;
            ro.filter_kept = u8::from(filter);
            ro.min_block_ns = offcpu.unwrap_or(0);
        }
        open.progs.on_switch.set_autoload(offcpu.is_some());
        open.progs.on_sys_exit.set_autoload(offcpu.is_some());
        // Off-CPU records are at most ~17 KiB; per CPU room for 128 of them, bounded. Without
        // --off-cpu the smallest ring and one scratch entry.
        let (oring, oentries) = match offcpu {
            Some(_) => (
                ((ncpus as u32).saturating_mul(2 << 20)).clamp(4 << 20, 64 << 20),
                possible as u32,
            ),
            None => (4096, 1),
        };
        open.maps
            .offcpu_events
            .set_max_entries(oring.next_power_of_two())
            .and_then(|()| open.maps.offcpu_scratch.set_max_entries(oentries))
            .map_err(|e| BpfError::Load(e.to_string()))?;
        // The fork and exec hooks only serve the filter: without it they are not even loaded.
        open.progs.on_fork.set_autoload(filter);
        open.progs.on_exec.set_autoload(filter);
        let skel = open.load().map_err(|e| BpfError::Load(e.to_string()))?;
        let out: Arc<Mutex<Vec<PyStack>>> = Arc::default();
        let mut w = Walker {
            skel: Some(Box::new(skel)),
            open_obj,
            links: Vec::new(),
            ring: None,
            out,
            offcpu_out: Arc::default(),
            offcpu: offcpu.is_some(),
        };
        let sink = w.out.clone();
        let mut b = RingBufferBuilder::new();
        let skel_ptr: *const skel::WalkerSkel<'static> = &**w.skel.as_ref().expect("just set");
        // SAFETY: the skeleton is boxed (its address is stable) and owned by the walker, whose
        // Drop drops the ring buffer before the skeleton.
        let skel_ref: &'static skel::WalkerSkel<'static> = unsafe { &*skel_ptr };
        b.add(&skel_ref.maps.events, move |data: &[u8]| {
            if let Some(s) = parse(data) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            }
            0
        })
        .map_err(|e| BpfError::Load(e.to_string()))?;
        if w.offcpu {
            let sink = w.offcpu_out.clone();
            b.add(&skel_ref.maps.offcpu_events, move |data: &[u8]| {
                if let Some(r) = offcpu::parse(data) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                }
                0
            })
            .map_err(|e| BpfError::Load(e.to_string()))?;
        }
        w.ring = Some(b.build().map_err(|e| BpfError::Load(e.to_string()))?);
        Ok(w)
    }

    fn skel(&self) -> &skel::WalkerSkel<'static> {
        self.skel.as_deref().expect("the skeleton lives until Drop")
    }

    /// Runs the program at every sample of this perf event.
    pub fn attach(&mut self, perf_event_fd: BorrowedFd<'_>) -> Result<(), BpfError> {
        // libbpf closes (and disables) the event's descriptor when the link goes: give it a
        // descriptor of its own, so that ours stays valid and is closed once, by us.
        let own = perf_event_fd
            .try_clone_to_owned()
            .map_err(|e| BpfError::Attach(format!("dup: {e}")))?;
        let link = self
            .skel()
            .progs
            .on_sample
            .attach_perf_event(own.as_raw_fd())
            .map_err(|e| BpfError::Attach(e.to_string()))?;
        // The link owns it now.
        std::mem::forget(own);
        self.links.push(link);
        Ok(())
    }

    /// Starts following forks and execs of kept processes (a walker loaded with a filter).
    pub fn follow_forks(&mut self) -> Result<(), BpfError> {
        let mut links = Vec::new();
        for p in [&self.skel().progs.on_fork, &self.skel().progs.on_exec] {
            links.push(
                p.attach_trace().map_err(|e| {
                    BpfError::Attach(format!("{}: {e}", p.name().to_string_lossy()))
                })?,
            );
        }
        self.links.extend(links);
        Ok(())
    }

    /// Keeps the samples of process `pid` (as perfpy sees it); with `children`, also of the
    /// processes it forks from now on, and theirs.
    pub fn keep(&mut self, pid: u32, children: bool) -> Result<(), BpfError> {
        self.keep_flags(pid, u32::from(children))
    }

    /// Keeps the samples of a launched command, with its children's, from its next exec on
    /// (before it, the process is still a copy of perfpy).
    pub fn keep_from_exec(&mut self, pid: u32) -> Result<(), BpfError> {
        self.keep_flags(pid, KEEP_CHILDREN | KEEP_FROM_EXEC)
    }

    fn keep_flags(&mut self, pid: u32, flags: u32) -> Result<(), BpfError> {
        let mut v = [0u8; 8];
        v[4..].copy_from_slice(&flags.to_ne_bytes());
        self.skel()
            .maps
            .kept
            .update(&pid.to_ne_bytes(), &v, MapFlags::ANY)
            .map_err(|e| BpfError::Register {
                pid,
                detail: e.to_string(),
            })
    }

    /// Whether `pid` is kept: `Some(parent)` (the kept process that forked it, 0 for a target).
    /// One map lookup (a system call).
    pub fn kept(&self, pid: u32) -> Option<u32> {
        let v = self
            .skel()
            .maps
            .kept
            .lookup(&pid.to_ne_bytes(), MapFlags::ANY)
            .ok()??;
        Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
    }

    /// Forgets a kept process that exited (its pid may be reused).
    pub fn unkeep(&mut self, pid: u32) {
        let _ = self.skel().maps.kept.delete(&pid.to_ne_bytes());
    }

    /// Starts walking the frames of a process.
    pub fn add_process(&mut self, p: &PyProcess) -> Result<(), BpfError> {
        let o = p.offsets;
        let cfg = ProcCfg {
            runtime: p.runtime,
            off: [
                o.runtime_interp_head,
                o.interp_tstate_head,
                o.tstate_next,
                o.tstate_native_tid,
                o.tstate_cframe,
                o.tstate_current_frame,
                o.frame_code,
                o.frame_instr,
                o.frame_previous,
                o.frame_owner,
                o.frame_is_entry,
                o.owned_by_cstack,
                o.tstate_thread_id,
                o.lasti_int,
                o.frame_localsplus,
                o.code_name,
                o.code_filename,
                // 3.14+: f_executable is a _PyStackRef (tag bits to mask).
                i32::from(p.version >= (3, 14)),
            ],
        };
        // SAFETY: ProcCfg is repr(C) plain data without padding (u64 then 18 i32), read as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                &cfg as *const ProcCfg as *const u8,
                std::mem::size_of::<ProcCfg>(),
            )
        };
        self.skel()
            .maps
            .procs
            .update(&p.pid.to_ne_bytes(), bytes, MapFlags::ANY)
            .map_err(|e| BpfError::Register {
                pid: p.pid,
                detail: e.to_string(),
            })
    }

    pub fn remove_process(&mut self, pid: u32) {
        let _ = self.skel().maps.procs.delete(&pid.to_ne_bytes());
    }

    /// Drains the ring buffer into `f`, without blocking.
    pub fn poll(&mut self, f: &mut dyn FnMut(PyStack)) {
        if let Some(r) = &self.ring {
            let _ = r.consume();
        }
        let v = std::mem::take(&mut *self.out.lock().unwrap_or_else(|e| e.into_inner()));
        for s in v {
            f(s);
        }
    }

    /// Starts tracing context switches (a walker loaded with `offcpu`): tracepoints only
    /// (`sched_switch`, `sys_exit`), which every kernel with BTF has.
    pub fn attach_offcpu(&mut self) -> Result<(), BpfError> {
        if !self.offcpu {
            return Err(BpfError::OffCpu("loaded without --off-cpu".into()));
        }
        let mut links = Vec::new();
        for p in [&self.skel().progs.on_switch, &self.skel().progs.on_sys_exit] {
            links.push(
                p.attach_trace().map_err(|e| {
                    BpfError::OffCpu(format!("{}: {e}", p.name().to_string_lossy()))
                })?,
            );
        }
        self.links.extend(links);
        Ok(())
    }

    /// Drains the off-CPU ring into `f`, without blocking. Call after [`Walker::poll`]: a
    /// record's Python frames went into the walker's ring first.
    pub fn poll_offcpu(&mut self, f: &mut dyn FnMut(OffCpuEvent)) {
        if !self.offcpu {
            return;
        }
        if let Some(r) = &self.ring {
            let _ = r.consume();
        }
        let v = std::mem::take(&mut *self.offcpu_out.lock().unwrap_or_else(|e| e.into_inner()));
        for r in v {
            f(r);
        }
    }

    /// Per thread (pid, tid), the waits shorter than the threshold.
    pub fn short_waits(&self) -> Vec<((u32, u32), ShortWaits)> {
        let m = &self.skel().maps.offcpu_shorts;
        m.keys()
            .filter_map(|k| {
                let v = m.lookup(&k, MapFlags::ANY).ok()??;
                let key = u64::from_ne_bytes(k.get(..8)?.try_into().ok()?);
                let w = |o: usize| {
                    v.get(o..o + 8)
                        .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
                };
                Some((
                    ((key >> 32) as u32, key as u32),
                    ShortWaits {
                        count: w(0)?,
                        ns: w(8)?,
                    },
                ))
            })
            .collect()
    }

    /// The waits going on now (threads off the CPU since they were last seen leaving it).
    pub fn waits_in_progress(&self) -> Vec<InProgress> {
        let m = &self.skel().maps.offcpu_start;
        m.keys()
            .filter_map(|k| offcpu::parse_start(&m.lookup(&k, MapFlags::ANY).ok()??))
            .collect()
    }

    /// What the off-CPU programs could not record.
    pub fn offcpu_lost(&self) -> OffCpuLost {
        let m = &self.skel().maps.offcpu_lost;
        let at = |i: u32| {
            m.lookup(&i.to_ne_bytes(), MapFlags::ANY)
                .ok()
                .flatten()
                .and_then(|v| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)))
                .unwrap_or(0)
        };
        OffCpuLost {
            records: at(0),
            short_threads: at(1),
        }
    }

    /// (run count, total run time in ns) of the program, when `kernel.bpf_stats_enabled` is 1.
    pub fn stats(&self) -> Option<(u64, u64)> {
        use std::os::fd::AsFd;
        let fd = self.skel().progs.on_sample.as_fd().as_raw_fd();
        let mut info: libbpf_sys::bpf_prog_info = unsafe_zeroed();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: bpf_obj_get_info_by_fd writes at most `len` bytes into `info`.
        let r = unsafe {
            libbpf_sys::bpf_obj_get_info_by_fd(
                fd,
                (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
                &mut len,
            )
        };
        (r == 0).then_some((info.run_cnt, info.run_time_ns))
    }
}

fn unsafe_zeroed<T>() -> T {
    // SAFETY: only used for plain C structs (integers), for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_matches_the_c_header() {
        // pid, tid, time, nframes, flags, then 40-byte frames.
        let mut b = vec![0u8; 24 + 2 * FRAME_SIZE];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&8u32.to_ne_bytes());
        b[8..16].copy_from_slice(&99u64.to_ne_bytes());
        b[16..20].copy_from_slice(&2u32.to_ne_bytes());
        b[20..24].copy_from_slice(&REC_TRUNCATED.to_ne_bytes());
        b[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[48..56].copy_from_slice(&0xabcu64.to_ne_bytes());
        b[56..60].copy_from_slice(&(FRAME_ENTRY | 3).to_ne_bytes());
        let s = parse(&b).unwrap();
        assert_eq!((s.pid, s.tid, s.time_ns, s.frames.len()), (7, 8, 99, 2));
        assert_eq!(s.truncated, Some(WalkerCut::FrameLimit));
        assert!(s.frames[0].entry && s.frames[0].owner == 3 && !s.frames[1].entry);
        assert_eq!((s.frames[0].code, s.frames[0].ident), (0x1000, 0xabc));
        assert_eq!(std::mem::size_of::<ProcCfg>(), 8 + 18 * 4);
    }

    #[test]
    fn loads_and_passes_the_verifier() {
        // The verifier bounds each frame index by the limit: the smallest, the default and
        // the largest limits all pass.
        for limit in [1, DEFAULT_PY_FRAMES, MAX_PY_FRAMES_CAP] {
            let w = Walker::load(limit);
            if std::env::var("CI").is_ok_and(|v| v == "true") || nix_is_root() {
                w.unwrap_or_else(|e| panic!("load with {limit} frames: {e}"));
            }
        }
        assert!(matches!(
            Walker::load(MAX_PY_FRAMES_CAP + 1),
            Err(BpfError::FrameLimit(_))
        ));
    }

    #[test]
    fn the_filter_follows_forks_of_kept_processes_only() {
        if !nix_is_root() {
            return;
        }
        let mut w = Walker::load_with(DEFAULT_PY_FRAMES, true).expect("load with the filter");
        w.follow_forks().expect("fork and exec hooks");
        let me = std::process::id();
        w.keep(me, true).expect("keep");
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(
            w.kept(c.id()),
            Some(me),
            "a child of a kept process is kept"
        );
        let _ = c.kill();
        let _ = c.wait();
        w.unkeep(c.id());
        w.keep(me, false).expect("keep");
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(
            w.kept(c.id()),
            None,
            "children not followed without the flag"
        );
        let _ = c.kill();
        let _ = c.wait();
    }

    #[test]
    fn offcpu_records_a_sleep_with_its_length_and_stacks() {
        if !nix_is_root() {
            return;
        }
        let mut w = Walker::load_full(DEFAULT_PY_FRAMES, true, Some(1_000_000))
            .expect("load with --off-cpu");
        w.follow_forks().expect("fork and exec hooks");
        w.attach_offcpu()
            .expect("attach the context-switch programs");
        let me = std::process::id();
        w.keep(me, false).expect("keep");
        // 20 waits of 5 ms and 200 of ~0 ms (a yield or a short sleep).
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for _ in 0..200 {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        let mut recs = Vec::new();
        w.poll(&mut |_| {});
        w.poll_offcpu(&mut |e| {
            if let OffCpuEvent::Wait(r) = e {
                recs.push(r)
            }
        });
        let mine: Vec<_> = recs.iter().filter(|r| r.pid == me).collect();
        let sleeps = mine
            .iter()
            .filter(|r| (5_000_000..50_000_000).contains(&r.wait_ns))
            .count();
        assert!(
            sleeps >= 18,
            "{sleeps} waits of 5 ms recorded of 20: {mine:?}"
        );
        for r in &mine {
            assert!(!r.kernel.is_empty(), "kernel frames");
            assert!(
                r.user_regs[1] != 0 && r.stack.len() >= 512,
                "user stack copied"
            );
            assert!(r.state != 0 || r.wait_ns >= 1_000_000);
        }
        let shorts: u64 = w
            .short_waits()
            .into_iter()
            .filter(|((p, _), _)| *p == me)
            .map(|(_, s)| s.count)
            .sum();
        assert!(shorts >= 150, "{shorts} short waits counted of 200");
        assert_eq!(w.offcpu_lost(), OffCpuLost::default());
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
