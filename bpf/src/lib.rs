//! The eBPF frame walker: CPython's Python frames at the sample instant.
//!
//! The program (`src/bpf/walker.bpf.c`, compiled by clang through libbpf-cargo) runs on
//! perfpy's sampling events. For each registered process it walks the sampled thread's frame
//! chain and emits (code object, instruction pointer, flags) per frame into a ring buffer. User
//! space ([`CodeReader`]) turns code objects into names, files and lines.
//!
//! Supported: CPython 2.7 and 3.6 – 3.10 (`PyFrameObject` chain, thread matched on its
//! `thread_id`, the pthread_t that equals the thread's fsbase) and 3.11 on
//! (`_PyInterpreterFrame` chain, thread matched on `native_thread_id`). Offsets per version are
//! typed tables in [`offsets`] up to 3.12 and the target's own `_Py_DebugOffsets` from 3.13
//! ([`debug_offsets`]), handed to the program per process through the `procs` map. The types
//! the program and user space share are generated from its C header (the private `abi`
//! module).

mod abi;
pub mod code;
pub mod debug_offsets;
pub mod offcpu;
pub mod offsets;

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, OpenObject, RingBuffer, RingBufferBuilder};

use abi::skel;
pub use abi::{DEFAULT_PY_FRAMES, FRAME_ENTRY, MAX_PY_FRAMES_CAP};
pub use code::{CodeReader, PyFrameInfo};
pub use offcpu::{InProgress, OffCpuEvent, OffCpuLost, OffCpuRecord, ShortWaits};
pub use offsets::Offsets;

/// Why the walker could not be loaded, attached or told about a process: what failed and what
/// to do. The kernel's or libbpf's error is the `source`, not repeated in the message: print
/// the chain (`{:#}` of an `anyhow::Error`) to show it, as `message: cause`.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{LOAD}: this kernel has no BTF (/sys/kernel/btf/vmlinux: CONFIG_DEBUG_INFO_BTF)")]
    NoBtf,
    #[error(
        "{LOAD}: /proc/self/ns/pid, perfpy's PID namespace, cannot be read (is /proc mounted?)"
    )]
    PidNamespace(#[source] std::io::Error),
    #[error("{LOAD}: the program has no .rodata section (a broken build of perfpy: rebuild it)")]
    NoRodata,
    #[error("{LOAD}")]
    Load(#[source] libbpf_rs::Error),
    #[error("cannot attach the eBPF frame walker to a perf event: its descriptor cannot be duplicated (out of file descriptors? raise `ulimit -n`)")]
    Dup(#[source] std::io::Error),
    #[error("cannot attach the eBPF frame walker to a perf event")]
    Attach(#[source] libbpf_rs::Error),
    #[error("cannot attach the eBPF walker's {hook} program, which follows the targets' forks and execs (it needs BTF-enabled tracepoints, tp_btf)")]
    Hook {
        hook: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("cannot register pid {pid} with the eBPF walker, whose table holds {capacity} processes (its samples get native frames only)")]
    Register {
        pid: u32,
        capacity: u32,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("cannot have the eBPF walker keep the samples of pid {pid}, in a table of {capacity} processes (--no-ebpf does without it)")]
    Keep {
        pid: u32,
        capacity: u32,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("--max-python-frames {0}: choose from 1 to {MAX_PY_FRAMES_CAP}")]
    FrameLimit(u32),
    #[error("cannot trace context switches for --off-cpu: {0}; it needs root (or CAP_BPF + CAP_PERFMON) and a kernel with BTF (tracepoints sched_switch, sched_wakeup, sched_wakeup_new and sys_exit)")]
    OffCpu(String),
}

/// How every load error starts: what loading the walker needs.
const LOAD: &str = "cannot load the eBPF frame walker, which needs root or CAP_BPF + CAP_PERFMON, a kernel with BTF (/sys/kernel/btf/vmlinux) and bpf_loop (5.17+)";

/// One frame as the program saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyFrameRef {
    pub code: u64,
    pub instr: u64,
    /// First Python frame run by its C-level `_PyEval_EvalFrameDefault` call.
    pub entry: bool,
    pub owner: u8,
    /// ≤ 3.10: the frame's first argument (`self` or `cls` in a method, from its cell where a
    /// closure captured it), for qualified names.
    pub first_local: u64,
    /// `co_name ^ rotl(co_filename, 1)` read at the sample: 0 where unread.
    pub ident: u64,
    /// ≤ 3.10: what names `first_local`'s class, read at the sample (its type, or a 2.7
    /// old-style instance's class): 0 where unread.
    pub self_class: u64,
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
    pub version: perfpy_process::Version,
    /// Absolute address of `_PyRuntime` (3.7+) or of `interp_head` (2.7, 3.6) in the process.
    pub runtime: u64,
    /// Its offsets: [`Offsets::for_version`] up to 3.12, its own `_Py_DebugOffsets` from 3.13.
    pub offsets: Offsets,
}

/// The opened-then-loaded program and the reader of its ring buffer, which borrow each other:
/// the skeleton borrows the `OpenObject` libbpf opened it into (`&'obj mut`, for as long as the
/// program lives), and the ring buffer is built from the skeleton's `events` map, which must
/// outlive it.
///
/// libbpf-rs's examples keep the `OpenObject` on the caller's stack; here the walker lives in the
/// collector for the whole recording, and a lifetime parameter would spread through it. So the
/// walker owns all three, and ouroboros builds that self-referential struct without unsafe
/// code of ours (a pinned box and a raw pointer would need it, in the borrow and in `Drop`): it
/// keeps each borrowed field in a box of its own that does not claim uniqueness (its address
/// stays put when the walker moves, and moving it invalidates no borrow), and drops the
/// borrowers first: the ring buffer, then the skeleton (program and maps), then the object.
#[ouroboros::self_referencing]
struct Loaded {
    obj: MaybeUninit<OpenObject>,
    #[borrows(mut obj)]
    #[covariant]
    skel: skel::WalkerSkel<'this>,
    #[borrows(skel)]
    #[covariant]
    ring: RingBuffer<'this>,
}

/// The loaded program, its attachments and its ring buffer.
pub struct Walker {
    /// Declared first, so dropped first: the program's users before the program.
    links: Vec<Link>,
    loaded: Loaded,
    /// Records decoded by the ring buffer's callback, until [`Walker::poll`] hands them out.
    out: Arc<Mutex<Vec<PyStack>>>,
    offcpu_out: Arc<Mutex<Vec<OffCpuEvent>>>,
    offcpu: bool,
}

/// The ring buffer's size for `ncpus` CPUs sampling at up to a few kHz: per CPU 256 KiB, or 32
/// of the longest records when they are longer (most stacks are shallow; 32 deep ones are
/// about 60 ms at 497 Hz, three times the reader's 20 ms period), from 1 MiB to 64 MiB, a power
/// of two as the kernel requires.
fn ring_bytes(ncpus: usize, max_frames: u32) -> u32 {
    let per_cpu = (256u32 << 10).max(32 * abi::record_bytes(max_frames));
    ((ncpus.max(1) as u32).saturating_mul(per_cpu))
        .clamp(1 << 20, 64 << 20)
        .next_power_of_two()
}

/// Opens the program into `obj`, sizes its maps, sets its read-only configuration and loads it
/// (the verifier checks it here).
fn open_and_load(
    obj: &mut MaybeUninit<OpenObject>,
    max_py_frames: u32,
    filter: bool,
    offcpu: Option<u64>,
) -> Result<skel::WalkerSkel<'_>, BpfError> {
    let mut open = skel::WalkerSkelBuilder::default()
        .open(obj)
        .map_err(BpfError::Load)?;
    let ncpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(libbpf_rs::num_possible_cpus().unwrap_or(1));
    open.maps
        .events
        .set_max_entries(ring_bytes(ncpus, max_py_frames))
        .map_err(BpfError::Load)?;
    // One scratch record per CPU (indexed by CPU number: possible CPUs, which may be more
    // than those online), each holding the frame limit's frames.
    let possible = libbpf_rs::num_possible_cpus().unwrap_or(ncpus).max(ncpus);
    open.maps
        .scratch
        .set_max_entries(possible as u32)
        .and_then(|()| {
            open.maps
                .scratch
                .set_value_size(abi::record_bytes(max_py_frames))
        })
        .map_err(BpfError::Load)?;
    // Our PID namespace: the program reports pids as we see them.
    let ns = std::fs::metadata("/proc/self/ns/pid").map_err(BpfError::PidNamespace)?;
    {
        use std::os::unix::fs::MetadataExt;
        let ro = open
            .maps
            .rodata_data
            .as_deref_mut()
            .ok_or(BpfError::NoRodata)?;
        ro.pidns_dev = ns.dev();
        ro.pidns_ino = ns.ino();
        // The initial PID namespace has a fixed inode number (PROC_PID_INIT_INO).
        const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
        ro.in_child_pidns = u8::from(ns.ino() != PROC_PID_INIT_INO);
        ro.max_py_frames = max_py_frames;
        ro.filter_kept = u8::from(filter);
        ro.min_block_ns = offcpu.unwrap_or(0);
    }
    open_offcpu(&mut open, offcpu, ncpus, possible)?;
    // The fork and exec hooks only serve the filter: without it they are not even loaded.
    open.progs.on_fork.set_autoload(filter);
    open.progs.on_exec.set_autoload(filter);
    open.load().map_err(BpfError::Load)
}

/// The context-switch programs of `--off-cpu` and their maps: loaded only with `offcpu` (the
/// threshold in ns); without, the smallest ring and one scratch entry.
fn open_offcpu(
    open: &mut skel::OpenWalkerSkel<'_>,
    offcpu: Option<u64>,
    ncpus: usize,
    possible: usize,
) -> Result<(), BpfError> {
    open.progs.on_switch.set_autoload(offcpu.is_some());
    open.progs.on_sys_exit.set_autoload(offcpu.is_some());
    open.progs.on_wakeup.set_autoload(offcpu.is_some());
    open.progs.on_wakeup_new.set_autoload(offcpu.is_some());
    let (oring, oentries) = match offcpu {
        Some(_) => (offcpu::ring_bytes(ncpus), possible as u32),
        None => (4096, 1),
    };
    open.maps
        .offcpu_events
        .set_max_entries(oring)
        .and_then(|()| open.maps.offcpu_scratch.set_max_entries(oentries))
        .map_err(BpfError::Load)
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
            return Err(BpfError::NoBtf);
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
        let out: Arc<Mutex<Vec<PyStack>>> = Arc::default();
        let offcpu_out: Arc<Mutex<Vec<OffCpuEvent>>> = Arc::default();
        let (sink, offcpu_sink) = (out.clone(), offcpu_out.clone());
        let loaded = Loaded::try_new(
            MaybeUninit::uninit(),
            |obj| open_and_load(obj, max_py_frames, filter, offcpu),
            |skel| {
                let mut b = RingBufferBuilder::new();
                b.add(&skel.maps.events, move |data: &[u8]| {
                    if let Some(s) = abi::decode(data) {
                        sink.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                    }
                    0
                })
                .map_err(BpfError::Load)?;
                if offcpu.is_some() {
                    b.add(&skel.maps.offcpu_events, move |data: &[u8]| {
                        if let Some(r) = offcpu::parse(data) {
                            offcpu_sink
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(r);
                        }
                        0
                    })
                    .map_err(BpfError::Load)?;
                }
                b.build().map_err(BpfError::Load)
            },
        )?;
        Ok(Walker {
            links: Vec::new(),
            loaded,
            out,
            offcpu_out,
            offcpu: offcpu.is_some(),
        })
    }

    fn skel(&self) -> &skel::WalkerSkel<'_> {
        self.loaded.borrow_skel()
    }

    /// Runs the program at every sample of this perf event.
    pub fn attach(&mut self, perf_event_fd: BorrowedFd<'_>) -> Result<(), BpfError> {
        // libbpf closes (and disables) the event's descriptor when the link goes: give it a
        // descriptor of its own, so that ours stays valid and is closed once, by us.
        let own = perf_event_fd.try_clone_to_owned().map_err(BpfError::Dup)?;
        let link = self
            .skel()
            .progs
            .on_sample
            .attach_perf_event(own.as_raw_fd())
            .map_err(BpfError::Attach)?;
        // The link owns it now.
        std::mem::forget(own);
        self.links.push(link);
        Ok(())
    }

    /// Starts following forks and execs of kept processes (a walker loaded with a filter).
    pub fn follow_forks(&mut self) -> Result<(), BpfError> {
        let mut links = Vec::new();
        for p in [&self.skel().progs.on_fork, &self.skel().progs.on_exec] {
            links.push(p.attach_trace().map_err(|source| BpfError::Hook {
                hook: p.name().to_string_lossy().into_owned(),
                source,
            })?);
        }
        self.links.extend(links);
        Ok(())
    }

    /// Keeps the samples of process `pid` (as perfpy sees it); with `children`, also of the
    /// processes it forks from now on, and theirs.
    pub fn keep(&mut self, pid: u32, children: bool) -> Result<(), BpfError> {
        self.keep_flags(pid, if children { abi::KEEP_CHILDREN } else { 0 })
    }

    /// Keeps the samples of a launched command, with its children's, from its next exec on
    /// (before it, the process is still a copy of perfpy).
    pub fn keep_from_exec(&mut self, pid: u32) -> Result<(), BpfError> {
        self.keep_flags(pid, abi::KEEP_CHILDREN | abi::KEEP_FROM_EXEC)
    }

    fn keep_flags(&mut self, pid: u32, flags: u32) -> Result<(), BpfError> {
        let kept = &self.skel().maps.kept;
        kept.update(
            &pid.to_ne_bytes(),
            bytemuck::bytes_of(&abi::kept_target(flags)),
            MapFlags::ANY,
        )
        .map_err(|source| BpfError::Keep {
            pid,
            capacity: kept.max_entries(),
            source,
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
        abi::kept_parent(&v)
    }

    /// Forgets a kept process that exited (its pid may be reused).
    pub fn unkeep(&mut self, pid: u32) {
        let _ = self.skel().maps.kept.delete(&pid.to_ne_bytes());
    }

    /// Starts walking the frames of a process.
    pub fn add_process(&mut self, p: &PyProcess) -> Result<(), BpfError> {
        let procs = &self.skel().maps.procs;
        procs
            .update(
                &p.pid.to_ne_bytes(),
                bytemuck::bytes_of(&abi::proc_cfg(p)),
                MapFlags::ANY,
            )
            .map_err(|source| BpfError::Register {
                pid: p.pid,
                capacity: procs.max_entries(),
                source,
            })
    }

    pub fn remove_process(&mut self, pid: u32) {
        let _ = self.skel().maps.procs.delete(&pid.to_ne_bytes());
    }

    /// Drains the ring buffer into `f`, without blocking.
    pub fn poll(&mut self, f: &mut dyn FnMut(PyStack)) {
        let _ = self.loaded.borrow_ring().consume();
        let v = std::mem::take(&mut *self.out.lock().unwrap_or_else(|e| e.into_inner()));
        for s in v {
            f(s);
        }
    }

    /// Starts tracing context switches (a walker loaded with `offcpu`): tracepoints only
    /// (`sched_switch`, `sched_wakeup`, `sched_wakeup_new`, `sys_exit`), which every kernel with BTF has.
    pub fn attach_offcpu(&mut self) -> Result<(), BpfError> {
        if !self.offcpu {
            return Err(BpfError::OffCpu("loaded without --off-cpu".into()));
        }
        let mut links = Vec::new();
        let progs = &self.skel().progs;
        for p in [
            &progs.on_switch,
            &progs.on_sys_exit,
            &progs.on_wakeup,
            &progs.on_wakeup_new,
        ] {
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
        let _ = self.loaded.borrow_ring().consume();
        let v = std::mem::take(&mut *self.offcpu_out.lock().unwrap_or_else(|e| e.into_inner()));
        for r in v {
            f(r);
        }
    }

    /// Per thread (pid, tid), the waits shorter than the threshold.
    pub fn short_waits(&self) -> Vec<((u32, u32), ShortWaits)> {
        let m = &self.skel().maps.offcpu_shorts;
        m.keys()
            .filter_map(|k| offcpu::parse_short(&k, &m.lookup(&k, MapFlags::ANY).ok()??))
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
        let mut info = libbpf_sys::bpf_prog_info::default();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: bpf_obj_get_info_by_fd writes at most `len` bytes into `info`, a
        // `bpf_prog_info` of `len` bytes.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_source_and_say_what_to_do() {
        use std::error::Error as _;
        let eperm = || libbpf_rs::Error::from(std::io::Error::from_raw_os_error(libc::EPERM));
        let e = BpfError::Load(eperm());
        let cause = e.source().expect("the libbpf error is the source");
        assert_eq!(
            cause.downcast_ref::<libbpf_rs::Error>().map(|e| e.kind()),
            Some(libbpf_rs::ErrorKind::PermissionDenied)
        );
        let msg = e.to_string();
        assert!(msg.contains("CAP_BPF") && msg.contains("BTF"), "{msg}");
        assert!(
            !msg.contains("not permitted"),
            "the cause is not repeated: {msg}"
        );
        let e = BpfError::Register {
            pid: 7,
            capacity: 4096,
            source: eperm(),
        };
        assert!(e.to_string().contains("4096") && e.source().is_some());
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
        if !needs_root() {
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
        if !needs_root() {
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
        // This thread's waits only: other tests run in other threads of this process, and a
        // thread preempted just now has its wait still to come (a pending record).
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let mine: Vec<_> = recs
            .iter()
            .filter(|r| r.pid == me && r.tid == tid)
            .collect();
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
            .filter(|((p, t), _)| *p == me && *t == tid)
            .map(|(_, s)| s.count)
            .sum();
        assert!(shorts >= 150, "{shorts} short waits counted of 200");
        assert_eq!(w.offcpu_lost(), OffCpuLost::default());
    }

    /// Whether a test that loads BPF programs can run: as root. Not root is a skip with a
    /// note, a failure under CI=true (CI runs as root).
    fn needs_root() -> bool {
        if nix_is_root() {
            return true;
        }
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true: this test loads BPF programs and must run as root"
        );
        eprintln!("NOTE: not root: BPF loading not tested");
        false
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
