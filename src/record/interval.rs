//! A profile taken interval by interval, for consumers that run until stopped (`perfpy agent`
//! exports each interval; `perfpy top` shows it): sampling never stops, and at each deadline the
//! samples of the interval just past are named and handed over as a [`Report`], then forgotten.
//!
//! What persists from one interval to the next: the processes and their address spaces, the
//! mapped files, the eBPF walker's registrations (processes that exited are released as in a
//! recording), the Python functions, and the names of locations already named
//! ([`NameCache`]: a location is named once, a perf map is read again only for an anonymous
//! address not named yet). What does not: the interval's counts, stacks and locations. Memory
//! is then bounded by one interval's distinct stacks, plus what the machine's processes and
//! files need.
//!
//! ```ignore
//! let mut p = Periodic::start(opts, stop)?;
//! loop {
//!     let iv = p.next(Instant::now() + Duration::from_secs(10));
//!     use_it(&iv.report);
//!     if iv.end.is_some() { break; }
//! }
//! ```

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::session::Session;
use super::Options;
use crate::process::Process;
use crate::report::Report;
use crate::symbols::{Incremental, NameCache};

/// One interval's profile, named.
pub struct Interval {
    /// Its samples only (counts of this interval), named; `start` and `duration` are the
    /// interval's.
    pub report: Report,
    /// 1 for the first interval.
    pub index: u64,
    /// Samples taken and lost (the kernel's ring full) during the interval.
    pub samples: u64,
    pub lost: u64,
    /// Processes alive (known to the session) at the interval's end.
    pub processes: usize,
    /// Time spent naming the interval's locations (sampling goes on meanwhile: the rings
    /// fill, and their records count in the next interval).
    pub naming: Duration,
    pub names: Incremental,
    /// The last interval: why the session ended (a signal, every `-p` target exited).
    pub end: Option<&'static str>,
}

/// A sampling session cut into intervals.
pub struct Periodic {
    opts: Options,
    stop: Arc<AtomicBool>,
    s: Session,
    names: NameCache,
    /// The current interval's start.
    start: Instant,
    start_wall: SystemTime,
    /// The session's sample and loss counts at the current interval's start.
    counted: (u64, u64),
    index: u64,
    ended: bool,
}

impl Periodic {
    /// Checks the options and targets (strict for `-p`: a bad pid is an error now; lenient for
    /// `-a`), opens the events and starts sampling; `--inject-python` as for `record`. From
    /// the return on, samples count in the first interval. No status line is drawn.
    pub fn start(opts: Options, stop: Arc<AtomicBool>) -> Result<Periodic> {
        let tgids = super::check_targets(&opts)?;
        let to_inject = super::injectable(&opts, &tgids)?;
        let mut s = Session::start(&opts, tgids, &to_inject, &stop)?;
        s.status_line = false;
        Ok(Periodic {
            opts,
            stop,
            s,
            names: NameCache::default(),
            start: Instant::now(),
            start_wall: SystemTime::now(),
            counted: (0, 0),
            index: 0,
            ended: false,
        })
    }

    /// Keeps names (and the symbolizer's parsed files) unused for this many intervals instead
    /// of [`NameCache::KEEP_UNUSED`]: for a caller that takes many short intervals.
    pub fn keep_names_for(&mut self, intervals: u64) {
        self.names.keep_unused = intervals.max(1);
    }

    /// The share of the `-p` targets' CPU time the samples so far cover, where it can be told.
    pub fn coverage(&mut self) -> Option<f64> {
        if self.ended {
            return None;
        }
        self.s.coverage_now()
    }

    /// What is sampled, for a "sampling …" line: "every process", "pid 12, 34".
    pub fn sampled(&self) -> String {
        super::sampled(&self.opts, &self.s)
    }

    /// The sampling period, as opened (slightly longer than 1/rate with `-a`: see capture).
    pub fn period_ns(&self) -> u64 {
        self.s.capture.period_ns
    }

    /// Samples until `until` (or the session's end: a signal on the `stop` flag, every `-p`
    /// target gone), then names the interval's samples and returns them. After the interval
    /// whose `end` is set, the session is over: the events are closed, trampolines turned on
    /// by `--inject-python` turned off, and further calls return empty intervals.
    pub fn next(&mut self, until: Instant) -> Interval {
        let end = if self.ended {
            None
        } else {
            self.s.collect_until(&self.opts, &self.stop, Some(until))
        };
        if let Some(e) = end {
            self.s.finish(&self.opts, e);
            self.ended = true;
        }
        let now = Instant::now();
        let now_wall = SystemTime::now();
        let c = &self.s.c;
        let procs: HashMap<u32, &Process> = c.procs.iter().map(|p| (p.key, p)).collect();
        let (symbolized, names) = crate::symbols::resolve_incremental(
            &c.profile,
            &c.files,
            &procs,
            self.opts.keep_interpreter,
            &mut self.names,
        );
        if end.is_some() {
            // The perf maps are read: the trampolines we turned on go off again.
            self.s.injection.deactivator.finish();
        }
        for (pid, why) in &symbolized.refused_perf_maps {
            tracing::info!(pid, "perf map not read: {why}");
        }
        let report = super::build_report(
            c,
            &procs,
            symbolized.resolved,
            &self.opts,
            (self.period_ns(), self.start_wall, now - self.start),
        );
        drop(procs);
        let naming = now.elapsed();
        let (samples, lost) = (self.s.c.stats.samples, self.s.c.stats.lost);
        self.index += 1;
        let iv = Interval {
            report,
            index: self.index,
            samples: samples - self.counted.0,
            lost: lost - self.counted.1,
            processes: self.s.c.live.len(),
            naming,
            names,
            end: end.map(|e| e.reason),
        };
        tracing::debug!(
            index = iv.index,
            samples = iv.samples,
            lost = iv.lost,
            locations = self.s.c.profile.locations.len(),
            stacks = self.s.c.profile.stacks.len(),
            named = names.named,
            from_cache = names.cached,
            cache = names.kept,
            py_functions = self.s.c.profile.py_functions.len(),
            processes_ever = self.s.c.procs.len(),
            files = self.s.c.files.list.len(),
            naming = ?naming,
            "interval"
        );
        self.s.c.profile.reset_samples();
        if self.opts.all {
            // Only -p runs end on their targets' exits: with -a, every exit would be kept.
            self.s.c.exited.clear();
        }
        self.counted = (samples, lost);
        self.start = now;
        self.start_wall = now_wall;
        iv
    }
}
