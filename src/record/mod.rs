//! The record session: open events, drain rings, unwind and aggregate each sample, stop on the
//! duration, a signal or the targets' exit, then symbolize and write.

use std::collections::{HashMap, HashSet};
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
use crate::profile::Profile;
use crate::sys::{self, EventConfig, Ring};
use crate::targets;

mod collect;
mod events;
mod inject;
mod offcpu;
mod summary;

use collect::{drain, Collector, PyWalk, RingEntry, Stats};
use events::{load_walker, perm_error};
use inject::{inject_lenient, Deactivator, INJECT_TIMEOUT};
use summary::walker_names;

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
    /// -p: follow the targets' child processes too.
    pub subprocesses: bool,
    /// `--function` / `--nolineno`: what Python frames carry as line.
    pub lines: crate::report::Lines,
    /// `--off-cpu`: the `--min-block` threshold in nanoseconds.
    pub off_cpu: Option<u64>,
    /// `--sample`: what collapsed, flamegraph and speedscope show (None: wall with --off-cpu).
    pub sample: Option<crate::report::SampleView>,
}

pub struct Outcome {
    /// Exit status of a launched command, if it exited during the recording.
    pub child_status: Option<i32>,
}

pub fn run(opts: Options, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let Plan {
        mut tgids,
        target_name,
        dest,
        otlp,
        to_inject,
    } = plan(&opts)?;
    if opts.subprocesses && opts.pids.is_empty() {
        say!("perfpy: note: --subprocesses is for -p: a launched command's child processes are always profiled, and -a profiles every process");
    }
    let scan_stop = Arc::new(AtomicBool::new(false));
    let mut deactivator = Deactivator {
        done: false,
        halt: scan_stop.clone(),
        scanner: None,
    };

    events::raise_nofile_limit();
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
    let (mut walker, per_cpu) = load_walker(&opts)?;
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
        offcpu_py: HashMap::new(),
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
        offcpu: opts.off_cpu.map(offcpu::OffCpu::new),
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
    c.offcpu_window(false);
    let start_wall = SystemTime::now();
    let tty = std::io::stderr().is_terminal();
    let mut scratch = Vec::new();
    let (end_reason, mut child_status) = sample_until_done(
        &opts,
        &stop,
        &epoll,
        &mut rings,
        &mut c,
        &mut meter,
        spawned.as_ref().map(|sp| sp.pid),
        &tgids,
        start,
    );
    let duration = start.elapsed();
    c.offcpu_window(true);
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
    c.finish_offcpu();
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
    let Named {
        report,
        refused_perf_maps,
        cut_short: symbolization_cut_short,
    } = name_frames(&c, &opts, &mut deactivator, period_ns, start_wall, duration);
    let dest_name = dest.display();
    let mut text_report;
    let text = if opts.format == Format::Pprof {
        &report
    } else {
        // Collapsed, flamegraph, speedscope: one value, chosen by --sample.
        text_report = report.clone();
        text_report.select(opts.sample.unwrap_or(if opts.off_cpu.is_some() {
            crate::report::SampleView::Wall
        } else {
            crate::report::SampleView::Cpu
        }));
        &text_report
    };
    dest.write_with(|w| match opts.format {
        Format::Pprof => Ok(crate::output::pprof::write(text, w)?),
        Format::Collapsed => Ok(crate::output::collapsed::write(text, w)?),
        Format::Flamegraph => {
            crate::output::flamegraph::write(text, &format!("perfpy {target_name}"), w)
        }
        Format::Speedscope => Ok(crate::output::speedscope::write(
            text,
            &format!("perfpy {target_name}"),
            w,
        )?),
    })?;
    // Exported after the file is written; a failed export is reported after the summary.
    let exported =
        otlp.map(|exporter| crate::output::otlp::send_recording(exporter, &report, &dest_name));
    let inject_notes = inject_notes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    summary::print(&summary::Ending {
        end_reason,
        duration,
        sym_time: t_sym.elapsed(),
        walker_stats,
        child_status,
        refused_perf_maps: &refused_perf_maps,
        cut_short: symbolization_cut_short,
        coverage: coverage.as_ref(),
        report: &report,
        collector: &c,
        inject_notes: &inject_notes,
        launched: spawned.as_ref().map(|sp| sp.pid as u32),
        perf_env_set,
        ebpf: opts.ebpf,
        walker_ran,
    });
    offcpu::print_summary(&c, &report, duration);
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

/// The profile as users read it, and what naming its frames met.
struct Named {
    report: crate::report::Report,
    /// Perf maps not read (pid, why).
    refused_perf_maps: Vec<(u32, String)>,
    /// A signal cut naming short.
    cut_short: bool,
}

/// Names every location once, releases the trampolines (the perf maps are read then), and
/// builds the report the writers take.
fn name_frames(
    c: &Collector,
    opts: &Options,
    deactivator: &mut Deactivator,
    period_ns: u64,
    start: SystemTime,
    duration: Duration,
) -> Named {
    let procs: HashMap<u32, &Process> = c.procs.iter().map(|p| (p.key, p)).collect();
    let symbolized = crate::symbols::resolve(&c.profile, &c.files, &procs, opts.keep_interpreter);
    // The perf maps are read: now the trampolines we turned on go off again.
    deactivator.finish();
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
        start,
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
        offcpu: opts.off_cpu.is_some(),
    };
    Named {
        report,
        refused_perf_maps: symbolized.refused_perf_maps,
        cut_short: symbolized.cut_short,
    }
}

/// Collects until the recording ends: the duration, a signal, the launched command's end or
/// every target's exit. Returns why it ended and the command's exit status, if it ended.
#[allow(clippy::too_many_arguments)]
fn sample_until_done(
    opts: &Options,
    stop: &AtomicBool,
    epoll: &Epoll,
    rings: &mut [RingEntry],
    c: &mut Collector,
    meter: &mut crate::coverage::CpuMeter,
    launched: Option<i32>,
    tgids: &[u32],
    start: Instant,
) -> (&'static str, Option<i32>) {
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
            drain(r, c, &mut scratch);
        }
        c.poll_offcpu();
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
        if let Some(pid) = launched {
            match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
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
    (end_reason, child_status)
}

/// What a recording works on, checked before anything is done: the targets (pids as
/// processes), the output (created now, so an unwritable path fails first), the Collector
/// (reached now), the processes to inject (each checked).
struct Plan {
    tgids: Vec<u32>,
    target_name: String,
    dest: crate::output::dest::Dest,
    otlp: Option<crate::output::otlp_export::Exporter>,
    to_inject: Vec<perfpy_inject::PythonProcess>,
}

/// The first step of a recording: every check that needs no side effect on a target.
fn plan(opts: &Options) -> Result<Plan> {
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
    Ok(Plan {
        tgids,
        target_name,
        dest,
        otlp,
        to_inject,
    })
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
