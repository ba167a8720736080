//! A profile taken interval by interval, for consumers that run until stopped (`perfpy agent`
//! exports each interval; `perfpy top` shows it): sampling never stops. At each deadline the
//! draining thread cuts the interval just past ([`Periodic::cut`]: its counts, stacks and
//! locations moved out as a [`Raw`], with copies of what naming needs of its processes and the
//! session's files) and samples on; a [`Namer`] turns it into a named [`Report`], on a thread
//! of its own (`perfpy agent`) or inline ([`Periodic::next`], `perfpy top`).
//!
//! What persists from one interval to the next: the processes and their address spaces, the
//! mapped files, the eBPF walker's registrations (processes that exited are released as in a
//! recording), the Python functions (the namer keeps its own copy, sent over as they appear),
//! and the names of locations already named (the namer's [`NameCache`]: a location is named
//! once, a perf map is read again only for an anonymous address not named yet; only the namer
//! uses it, whichever thread it runs on). What does not: the interval's counts, stacks and
//! locations. Memory is then bounded by the intervals in hand (the one being sampled, the one
//! being named, and what the consumer keeps waiting), plus what the machine's processes and
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

use crate::ids::ProcessKey;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::session::Session;
use super::{Options, ReportOptions};
use crate::files::{Files, MappedFile};
use crate::process::Process;
use crate::profile::{FrameKey, Profile, PyFunction, SampleKey};
use crate::report::Report;
use crate::symbols::{Incremental, NameCache};
use crate::wait::WaitKind;

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
    /// Time spent naming the interval's locations (sampling goes on meanwhile).
    pub naming: Duration,
    pub names: Incremental,
    /// The last interval: why the session ended (a signal, every `-p` target exited).
    pub end: Option<&'static str>,
}

/// One interval's samples as the draining thread cut them, not named yet: everything naming
/// needs, owned, so that it can be named on another thread while sampling goes on.
pub struct Raw {
    locations: Vec<FrameKey>,
    stacks: Vec<Box<[u32]>>,
    counts: HashMap<SampleKey, u64>,
    offcpu: HashMap<SampleKey, u64>,
    /// Python functions first seen since the previous cut, in id order (the namer's copy of
    /// the session's list grows by these).
    functions: Vec<PyFunction>,
    /// The session's files (ids index it), kept open while they are named.
    files: Vec<Arc<MappedFile>>,
    /// Naming copies of the processes with samples in the interval.
    procs: Vec<Process>,
    /// Sampling period, start, length.
    span: (u64, SystemTime, Duration),
    pub index: u64,
    pub samples: u64,
    pub lost: u64,
    pub processes: usize,
    pub end: Option<&'static str>,
}

impl Raw {
    /// This interval takes the place of `older`, not named (the namer fell behind): `older`'s
    /// samples are dropped, its Python functions kept (the ids of later ones follow them).
    pub fn replaces(&mut self, older: Raw) {
        let mut functions = older.functions;
        functions.append(&mut self.functions);
        self.functions = functions;
    }
}

/// How a session's intervals are to be named: what a [`Namer`] is made from, on the thread
/// that will use it (blazesym's symbolizer, which the namer keeps, stays on one thread).
#[derive(Clone, Copy)]
pub struct Naming {
    how: ReportOptions,
    keep_unused: u64,
}

/// Names the intervals' samples and builds their reports, in the order they were cut; keeps
/// the names (and the symbolizer's parsed files) from one interval to the next.
pub struct Namer {
    names: NameCache,
    py_functions: Vec<PyFunction>,
    how: ReportOptions,
}

impl Namer {
    pub fn new(n: Naming) -> Namer {
        let mut names = NameCache::default();
        names.keep_unused = n.keep_unused;
        Namer {
            names,
            py_functions: Vec::new(),
            how: n.how,
        }
    }

    /// Names `raw`'s locations (those named in earlier intervals from the cache) and builds
    /// its report.
    pub fn name(&mut self, raw: Raw) -> Interval {
        let t = Instant::now();
        self.py_functions.extend(raw.functions);
        let mut profile = Profile::default();
        // The ids are the cut profile's: its locations interned again, in order.
        for k in raw.locations {
            profile.location(k);
        }
        if self.how.offcpu {
            // Every wait kind can be the root of an off-CPU stack (see `report::build`).
            for k in WaitKind::ALL {
                profile.location(FrameKey::Wait(k));
            }
        }
        profile.stacks = raw.stacks;
        profile.counts = raw.counts;
        profile.samples = profile.counts.values().sum();
        profile.offcpu = raw.offcpu;
        profile.py_functions = std::mem::take(&mut self.py_functions);
        let mut files = Files::default();
        files.list = raw.files;
        let procs: HashMap<ProcessKey, &Process> = raw.procs.iter().map(|p| (p.key, p)).collect();
        let (symbolized, names) = crate::symbols::resolve_incremental(
            &profile,
            &files,
            &procs,
            self.how.keep_interpreter,
            &mut self.names,
        );
        for (pid, why) in &symbolized.refused_perf_maps {
            tracing::info!(pid, "perf map not read: {why}");
        }
        let report = super::build_report(
            (&profile, &files),
            &procs,
            symbolized.resolved,
            self.how,
            raw.span,
        );
        let naming = t.elapsed();
        tracing::debug!(
            index = raw.index,
            locations = profile.locations.len(),
            stacks = profile.stacks.len(),
            named = names.named,
            from_cache = names.cached,
            cache = names.kept,
            py_functions = profile.py_functions.len(),
            processes = procs.len(),
            files = files.list.len(),
            naming = ?naming,
            "interval named"
        );
        self.py_functions = std::mem::take(&mut profile.py_functions);
        Interval {
            report,
            index: raw.index,
            samples: raw.samples,
            lost: raw.lost,
            processes: raw.processes,
            naming,
            names,
            end: raw.end,
        }
    }
}

/// A sampling session cut into intervals.
pub struct Periodic {
    opts: Options,
    stop: Arc<AtomicBool>,
    s: Session,
    naming: Naming,
    /// [`Periodic::next`]'s namer, made at its first call.
    namer: Option<Namer>,
    /// The current interval's start.
    start: Instant,
    start_wall: SystemTime,
    /// The session's sample and loss counts at the current interval's start.
    counted: (u64, u64),
    /// Python functions handed over so far.
    functions_sent: usize,
    /// `--off-cpu`: the short waits per thread (pid, tid) handed over so far, in ns.
    shorts_sent: HashMap<(u32, u32), u64>,
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
        let naming = Naming {
            how: ReportOptions::of(&opts),
            keep_unused: NameCache::KEEP_UNUSED,
        };
        Ok(Periodic {
            opts,
            stop,
            s,
            naming,
            namer: None,
            start: Instant::now(),
            start_wall: SystemTime::now(),
            counted: (0, 0),
            functions_sent: 0,
            shorts_sent: HashMap::new(),
            index: 0,
            ended: false,
        })
    }

    /// Keeps names (and the symbolizer's parsed files) unused for this many intervals instead
    /// of [`NameCache::KEEP_UNUSED`]: for a caller that takes many short intervals.
    pub fn keep_names_for(&mut self, intervals: u64) {
        self.naming.keep_unused = intervals.max(1);
    }

    /// How to make the [`Namer`] of a consumer that names the [`Raw`] intervals of
    /// [`Periodic::cut`] itself (on a thread of its own), instead of calling
    /// [`Periodic::next`]: one or the other for a session, since the namer's copy of the
    /// Python functions grows by what each cut hands over.
    pub fn naming(&self) -> Naming {
        self.naming
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

    /// Samples until `until` (or the session's end: a signal on the `stop` flag, every `-p`
    /// target gone), then names the interval's samples and returns them. After the interval
    /// whose `end` is set, the session is over: the events are closed, trampolines turned on
    /// by `--inject-python` turned off, and further calls return empty intervals.
    pub fn next(&mut self, until: Instant) -> Interval {
        let raw = self.cut(until);
        let naming = self.naming;
        let iv = self
            .namer
            .get_or_insert_with(|| Namer::new(naming))
            .name(raw);
        if iv.end.is_some() {
            self.release_trampolines();
        }
        iv
    }

    /// Turns off the trampolines `--inject-python` turned on, once the last interval is named
    /// (their perf maps read). Also done when the `Periodic` is dropped.
    pub fn release_trampolines(&mut self) {
        self.s.injection.deactivator.finish();
    }

    /// Samples until `until` (or the session's end, as [`Periodic::next`]), then cuts the
    /// interval: its samples, stacks and locations are moved out, not named, and the next
    /// interval starts. Costs the draining thread copies of the interval's processes' names
    /// and of the file list, no naming.
    pub fn cut(&mut self, until: Instant) -> Raw {
        let end = if self.ended {
            None
        } else {
            self.s.collect_until(&self.opts, &self.stop, Some(until))
        };
        if let Some(e) = end {
            self.s.finish(&self.opts, e);
            self.ended = true;
        }
        if self.opts.off_cpu.is_some() {
            self.short_waits(end.is_some());
        }
        let now = Instant::now();
        let now_wall = SystemTime::now();
        let c = &mut self.s.c;
        let keys: HashSet<ProcessKey> = c
            .profile
            .counts
            .keys()
            .chain(c.profile.offcpu.keys())
            .map(|k| k.proc)
            .collect();
        let procs = c
            .procs
            .iter()
            .filter(|p| keys.contains(&p.key))
            .map(Process::naming_copy)
            .collect();
        let (samples, lost) = (c.stats.samples, c.stats.lost);
        self.index += 1;
        let raw = Raw {
            locations: std::mem::take(&mut c.profile.locations),
            stacks: std::mem::take(&mut c.profile.stacks),
            counts: std::mem::take(&mut c.profile.counts),
            offcpu: std::mem::take(&mut c.profile.offcpu),
            functions: c.profile.py_functions[self.functions_sent..].to_vec(),
            files: c.files.list.clone(),
            procs,
            span: (self.s.capture.period_ns, self.start_wall, now - self.start),
            index: self.index,
            samples: samples - self.counted.0,
            lost: lost - self.counted.1,
            processes: c.live.len(),
            end: end.map(|e| e.reason),
        };
        self.functions_sent = c.profile.py_functions.len();
        // What was moved out is empty now; the ids that referred to it are forgotten.
        c.profile.reset_samples();
        if self.opts.all {
            // Only -p runs end on their targets' exits: with -a, every exit would be kept.
            c.exited.clear();
        }
        self.counted = (samples, lost);
        self.start = now;
        self.start_wall = now_wall;
        raw
    }

    /// `--off-cpu`: the waits under `--min-block` that the kernel counted per thread since the
    /// last cut, as one stack per thread (a recording adds them once, at its end: at the last
    /// cut the session has added the whole run's, and what earlier intervals had is taken off).
    fn short_waits(&mut self, last: bool) {
        let c = &mut self.s.c;
        let root = c.profile.location(FrameKey::Wait(WaitKind::Short));
        let stack = c.profile.stack(&[root]);
        if last {
            for ((pid, tid), sent) in self.shorts_sent.drain() {
                let Some(&proc) = c.live.get(&pid).or_else(|| c.dying.get(&pid)) else {
                    continue;
                };
                let key = SampleKey {
                    proc,
                    tid: crate::ids::Tid(tid),
                    stack,
                };
                if let Some(ns) = c.profile.offcpu.get_mut(&key) {
                    *ns = ns.saturating_sub(sent);
                }
            }
            c.profile.offcpu.retain(|_, ns| *ns > 0);
            return;
        }
        let Some(walker) = c.py.as_ref().and_then(|py| py.walker.as_ref()) else {
            return;
        };
        let counted = walker.short_waits();
        for &((pid, tid), w) in &counted {
            let sent = self.shorts_sent.entry((pid, tid)).or_default();
            let ns = w.ns.saturating_sub(*sent);
            *sent = w.ns;
            if ns > 0 {
                let key = c.proc_key(pid);
                c.profile.add_offcpu(key, crate::ids::Tid(tid), &[root], ns);
            }
        }
        // Threads the kernel's table no longer holds: as many as it holds at most are kept.
        let now: HashSet<(u32, u32)> = counted.iter().map(|(k, _)| *k).collect();
        self.shorts_sent.retain(|k, _| now.contains(k));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn function(name: &str) -> PyFunction {
        PyFunction {
            qualname: name.into(),
            filename: "app.py".into(),
            first_line: 1,
        }
    }

    /// An interval cut with one stack of one Python frame (function `func` at line 7) counted
    /// `n` times, handing over `functions` as first seen in it.
    pub(crate) fn raw(index: u64, func: u32, n: u64, functions: Vec<PyFunction>) -> Raw {
        let mut counts = HashMap::new();
        counts.insert(
            SampleKey {
                proc: crate::ids::ProcessKey(0),
                tid: crate::ids::Tid(1),
                stack: 0,
            },
            n,
        );
        Raw {
            locations: vec![FrameKey::Py { func, line: 7 }],
            stacks: vec![vec![0].into_boxed_slice()],
            counts,
            offcpu: HashMap::new(),
            functions,
            files: Vec::new(),
            procs: Vec::new(),
            span: (10_000_000, SystemTime::now(), Duration::from_secs(1)),
            index,
            samples: n,
            lost: 0,
            processes: 1,
            end: None,
        }
    }

    fn namer() -> Namer {
        Namer::new(Naming {
            how: ReportOptions {
                lines: crate::report::Lines::Current,
                keep_interpreter: false,
                offcpu: false,
            },
            keep_unused: NameCache::KEEP_UNUSED,
        })
    }

    fn leaf(iv: &Interval) -> (String, u64) {
        let s = &iv.report.samples[0];
        let r = &iv.report.resolved[s.locs[0] as usize];
        (r.frames[0].function.clone(), s.count)
    }

    #[test]
    fn a_dropped_interval_passes_its_python_functions_on() {
        let mut n = namer();
        let iv = n.name(raw(1, 0, 3, vec![function("main")]));
        assert_eq!(leaf(&iv), ("main".to_string(), 3));
        // Interval 2 (first seeing `Shape.area`, id 1) is replaced by interval 3 (first seeing
        // `spin`, id 2) before it is named: its samples go, its function stays.
        let second = raw(2, 1, 5, vec![function("Shape.area")]);
        let mut third = raw(3, 2, 4, vec![function("spin")]);
        third.replaces(second);
        let iv = n.name(third);
        assert_eq!(iv.index, 3);
        assert_eq!(leaf(&iv), ("spin".to_string(), 4));
        assert_eq!(iv.report.samples.len(), 1);
        // Later intervals still name the functions of the dropped one.
        let iv = n.name(raw(4, 1, 2, Vec::new()));
        assert_eq!(leaf(&iv), ("Shape.area".to_string(), 2));
        assert_eq!(iv.names.cached, 0, "a location of its own");
    }

    #[test]
    fn names_are_cached_across_intervals() {
        let mut n = namer();
        let first = n.name(raw(1, 0, 1, vec![function("main")]));
        assert_eq!((first.names.named, first.names.cached), (1, 0));
        let second = n.name(raw(2, 0, 1, Vec::new()));
        assert_eq!((second.names.named, second.names.cached), (0, 1));
        assert_eq!(leaf(&second).0, "main");
    }
}
