//! A sampling session: the events opened, the targets injected, the launched command released,
//! then collection until the recording ends (or until a deadline, for callers that take the
//! profile interval by interval), and the teardown that leaves the targets as they were.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use nix::sys::epoll::{EpollEvent, EpollTimeout};

use super::capture::{self, Capture};
use super::collect::{drain, Collector};
use super::inject::Injection;
use super::Options;
use crate::coverage::{Coverage, CpuMeter};
use crate::targets;

/// Why collection ended, and the launched command's exit status if it exited.
#[derive(Clone, Copy, Debug)]
pub(super) struct End {
    pub(super) reason: &'static str,
    pub(super) child_status: Option<i32>,
}

pub(super) struct Session {
    pub(super) tgids: Vec<u32>,
    pub(super) capture: Capture,
    pub(super) c: Collector,
    meter: CpuMeter,
    pub(super) injection: Injection,
    /// When sampling started (the line "perfpy: sampling …" is said then).
    pub(super) start: Instant,
    pub(super) start_wall: SystemTime,
    /// The "recording 1.5s samples …" line on a terminal.
    pub(super) status_line: bool,
    last_status: Instant,
    scratch: Vec<u8>,
    ep_events: Vec<EpollEvent>,
}

/// What the teardown measured.
pub(super) struct Finished {
    pub(super) duration: Duration,
    pub(super) child_status: Option<i32>,
    pub(super) coverage: Option<Coverage>,
    /// The walker's runs and nanoseconds, when the kernel counts them.
    pub(super) walker_stats: Option<(u64, u64)>,
    pub(super) walker_ran: bool,
}

impl Session {
    /// Opens the events, registers the targets with the walker, turns trampolines on where
    /// asked and releases a launched command: from the return on, samples count.
    pub(super) fn start(
        opts: &Options,
        mut tgids: Vec<u32>,
        to_inject: &[perfpy_inject::PythonProcess],
        stop: &Arc<AtomicBool>,
    ) -> Result<Session> {
        let mut capture = capture::open(opts, &mut tgids)?;
        // Measured from now: the events sample from now on, and naming the targets' files
        // below takes a while (its samples count; the CPU time under them must too).
        let launched = capture.spawned.is_some();
        let meter = CpuMeter::start(
            if launched { &[] } else { &tgids },
            launched,
            opts.subprocesses,
            capture.per_cpu,
        );
        let injection = Injection::start(opts, to_inject, capture.walker.is_some(), stop);
        let mut c = Collector::new(capture.walker.take(), opts.max_frames, capture.per_cpu);
        c.target = super::replay::Target::from_env()?;
        c.offcpu = opts.off_cpu.map(super::offcpu::OffCpu::new);
        for &pid in &tgids {
            let key = c.proc_key(pid);
            c.register_python(key);
        }
        // Turned on only now that the walker knows the targets: samples taken while the
        // activation runs (a few hundred ms) would otherwise have no Python frames at all.
        injection.activate(to_inject)?;
        if let Some(sp) = capture.spawned.as_mut() {
            sp.release()?;
        }
        c.offcpu_window(false);
        Ok(Session {
            tgids,
            capture,
            c,
            meter,
            injection,
            start: Instant::now(),
            start_wall: SystemTime::now(),
            status_line: std::io::stderr().is_terminal(),
            last_status: Instant::now(),
            scratch: Vec::new(),
            ep_events: vec![EpollEvent::empty(); 64],
        })
    }

    /// The share of the `-p` targets' CPU time that the samples so far cover (`perfpy top`'s
    /// header); None for a launched command (its time is known once it is reaped), `-a`, or
    /// under 50 ms of CPU. Reads one small /proc file per target.
    pub(super) fn coverage_now(&mut self) -> Option<f64> {
        if self.launched().is_some() {
            return None;
        }
        let (samples, lost) = (self.c.stats.samples, self.c.stats.lost);
        let c = self.meter.coverage(samples, lost, self.capture.period_ns);
        let sampled = samples.saturating_mul(self.capture.period_ns) as f64 / 1e9;
        (c.cpu >= Duration::from_millis(50)).then(|| sampled / c.cpu.as_secs_f64())
    }

    /// The launched command's pid, if any.
    pub(super) fn launched(&self) -> Option<i32> {
        self.capture.spawned.as_ref().map(|sp| sp.pid)
    }

    /// Collects until the recording ends (the duration, a signal, the launched command's end
    /// or every target's exit: `Some`) or until `until` passes (`None`).
    pub(super) fn collect_until(
        &mut self,
        opts: &Options,
        stop: &AtomicBool,
        until: Option<Instant>,
    ) -> Option<End> {
        loop {
            self.poll();
            if let Some(end) = self.ended(opts, stop) {
                return Some(end);
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                return None;
            }
            if self.status_line && self.last_status.elapsed() >= Duration::from_millis(500) {
                self.last_status = Instant::now();
                say_part!(
                    "\r\x1b[2Kperfpy: recording {:.1}s  samples {}  lost {}  processes {}",
                    self.start.elapsed().as_secs_f64(),
                    self.c.stats.samples,
                    self.c.stats.lost,
                    self.c.live.len()
                );
                let _ = std::io::stderr().flush();
            }
        }
    }

    /// One round: waits for a ring to fill (or a short while), then drains every ring.
    fn poll(&mut self) {
        // Records are read in batches (a ring wakes us when a quarter full); a process is
        // handed to the eBPF walker when its interpreter's mapping is read, and samples taken
        // before that have no Python frames from it. Short timeouts keep that gap small, at
        // start (a launched interpreter starts running code within milliseconds) and for
        // processes that start later.
        let timeout: u16 = if self.start.elapsed() < Duration::from_millis(300) {
            2
        } else {
            20
        };
        let _ = self
            .capture
            .epoll
            .wait(&mut self.ep_events, EpollTimeout::from(timeout));
        if let Some(py) = self.c.py.as_mut() {
            py.poll(&self.c.target);
        }
        for r in self.capture.rings.iter_mut() {
            drain(r, &mut self.c, &mut self.scratch);
        }
        self.c.poll_offcpu();
        self.c.release_exited(Duration::from_secs(2));
        self.meter
            .poll(self.c.live.keys().chain(self.c.dying.keys()).copied());
    }

    /// Whether the recording has ended, and why.
    fn ended(&mut self, opts: &Options, stop: &AtomicBool) -> Option<End> {
        let end = |reason, child_status| {
            Some(End {
                reason,
                child_status,
            })
        };
        if stop.load(Ordering::Relaxed) {
            return end("interrupted", None);
        }
        if opts.duration.is_some_and(|d| self.start.elapsed() >= d) {
            return end("duration elapsed", None);
        }
        if let Some(pid) = self.launched() {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return end("command exited", Some(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return end("command killed", Some(128 + sig as i32))
                }
                _ => {}
            }
        } else if !opts.all
            && self
                .tgids
                .iter()
                .all(|p| self.c.exited.contains(p) || targets::is_gone(*p))
        {
            return end("target exited", None);
        }
        None
    }

    /// Ends sampling: no more activations, a launched command still running ended too (as
    /// py-spy does: SIGTERM, then SIGKILL after 2 s: it was started for this recording only),
    /// the last records drained, the events closed and the walker unloaded (symbolization
    /// needs memory of its own). The trampolines stay on until the perf maps are read.
    pub(super) fn finish(&mut self, opts: &Options, end: End) -> Finished {
        let duration = self.start.elapsed();
        self.c.offcpu_window(true);
        crate::signals::sampling_done();
        self.injection.stop_scanning();
        let mut child_status = end.child_status;
        if let (Some(pid), None) = (self.launched(), child_status) {
            child_status = targets::terminate(pid, Duration::from_secs(2));
        }
        for r in self.capture.rings.iter_mut() {
            drain(r, &mut self.c, &mut self.scratch);
        }
        self.c.finish_offcpu();
        self.capture.rings.clear();
        self.capture.events.clear();
        if let Some(cap) = self.c.target.capture() {
            if let Err(e) = cap.finish(&self.c) {
                say!("perfpy: warning: PERFPY_CAPTURE: {e:#}");
            }
        }
        let c = &self.c;
        let coverage = (!opts.all).then(|| {
            self.meter
                .coverage(c.stats.samples, c.stats.lost, self.capture.period_ns)
        });
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
        // The walker's own cost, when the kernel counts it (sysctl kernel.bpf_stats_enabled=1).
        let walker_stats = c.py.as_ref().and_then(|p| p.walker.as_ref()?.stats());
        let walker_ran = c.py.is_some();
        self.c.py = None;
        if self.status_line {
            say_part!("\r\x1b[2K");
        }
        Finished {
            duration,
            child_status,
            coverage,
            walker_stats,
            walker_ran,
        }
    }
}
