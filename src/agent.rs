//! `perfpy agent`: continuous profiling into an OpenTelemetry Collector. Samples until SIGTERM
//! or SIGINT (the whole machine by default, or `-p` processes) and every `--interval` exports
//! that interval's profile as one OTLP request.
//!
//! Two threads besides the exporter's: the main one drains the perf rings without pause and
//! cuts an interval at each deadline ([`Periodic::cut`]: no naming); the naming thread names
//! each cut interval, encodes it and queues it for export. Neither waits for the other: one
//! interval waits for the namer at most, and a newer one takes its place (the older dropped
//! whole, counted and said), so memory holds the interval being sampled, the one being named,
//! one waiting and the export queue. The export queue is never waited on either: a Collector
//! that is down or slow costs queued, retried, at worst dropped (oldest first) profiles,
//! counted and said, never a pause in sampling.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::output::otlp;
use crate::output::otlp_export::{self, Exporter, Stats};
use crate::record::interval::{Interval, Namer, Periodic, Raw};

/// How long, once stopped, the agent keeps sending what is queued (the last interval
/// included): within Kubernetes' default 30 s termination grace.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

pub struct Options {
    /// What to sample and how (`all` or `pids`, `--off-cpu`; no command, no duration, no
    /// output file).
    pub record: crate::record::Options,
    pub interval: Duration,
    pub otlp: otlp_export::Config,
}

/// Runs until stopped; the exit code (0: stopped by a signal or every `-p` target exited,
/// the last interval exported or counted as dropped).
pub fn run(opts: Options, stop: Arc<AtomicBool>) -> Result<i32> {
    let rate = opts.record.rate;
    // No probe of the Collector: to an agent, one that is not there yet is a warning and a
    // retry (it may start after us), not a reason to refuse to start.
    let exporter = Arc::new(Exporter::new(opts.otlp, otlp_export::DEFAULT_QUEUE)?);
    let mut p = Periodic::start(opts.record, stop)?;
    say!(
        "perfpy: agent sampling {} at {rate} Hz, exporting every {} to {} (stop with SIGTERM or Ctrl-C)",
        p.sampled(),
        seconds(opts.interval),
        exporter.url()
    );
    let handoff = Arc::new(Handoff::default());
    let naming = p.naming();
    let worker = {
        let (handoff, exporter) = (handoff.clone(), exporter.clone());
        std::thread::Builder::new()
            .name("perfpy-namer".into())
            .spawn(move || name_and_export(Namer::new(naming), &handoff, &exporter))?
    };
    let mut cut = 0u64;
    let mut deadline = Instant::now() + opts.interval;
    let end = loop {
        let raw = p.cut(deadline);
        cut += 1;
        deadline += opts.interval;
        // Draining took longer than an interval (a machine too busy to run us): the next one
        // starts now rather than at once.
        if deadline <= Instant::now() {
            deadline = Instant::now() + opts.interval;
        }
        let end = raw.end;
        if let Some((index, samples)) = handoff.put(raw) {
            say!(
                "perfpy: warning: interval {index} not exported ({samples} samples): naming is more than an interval behind sampling; a longer --interval or more CPU for perfpy keeps up"
            );
        }
        if let Some(end) = end {
            break end;
        }
        if worker.is_finished() {
            bail!("the naming thread ended unexpectedly (see above)");
        }
    };
    handoff.close();
    let health = worker
        .join()
        .map_err(|_| anyhow!("the naming thread panicked (see above)"))?;
    // The last interval is named (its perf maps read): trampolines we turned on go off.
    p.release_trampolines();
    drop(p);
    let exporter = Arc::try_unwrap(exporter)
        .map_err(|_| anyhow!("the exporter is still in use after the naming thread ended"))?;
    let url = exporter.url().to_string();
    let st = exporter.close(CLOSE_GRACE);
    say!(
        "perfpy: agent stopped ({end}) after {cut} interval{}: {} export{} sent to {url}, {} dropped{}",
        plural(cut),
        st.sent,
        plural(st.sent),
        st.dropped(),
        match (&st.last_error, st.dropped()) {
            (Some(e), d) if d > 0 => format!(" (last error: {e})"),
            _ => String::new(),
        }
    );
    let behind = handoff.dropped();
    if behind > 0 {
        say!(
            "perfpy: agent: {behind} interval{} not exported: naming fell more than an interval behind sampling (the newer interval kept)",
            plural(behind)
        );
    }
    debug_assert!(health.intervals + behind == cut);
    Ok(0)
}

/// The naming thread: each interval handed over is named, encoded and queued for export,
/// until the hand-over is closed and empty.
fn name_and_export(mut namer: Namer, handoff: &Handoff, exporter: &Exporter) -> Health {
    let mut health = Health::default();
    while let Some(raw) = handoff.take() {
        let iv = namer.name(raw);
        // What became of the earlier exports, before this one is queued.
        let before = exporter.stats();
        let profiles = if iv.report.samples.is_empty() {
            0
        } else {
            let (body, n) = otlp::request(&iv.report);
            exporter.submit(body);
            n
        };
        health.interval(&iv, profiles, &before, handoff.dropped());
    }
    health
}

/// The draining thread's hand-over to the naming thread: one interval waits at most; a newer
/// one takes its place, the older dropped whole (counted).
#[derive(Default)]
struct Handoff {
    slot: Mutex<Slot>,
    ready: Condvar,
}

#[derive(Default)]
struct Slot {
    waiting: Option<Raw>,
    closed: bool,
    dropped: u64,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `raw` over without waiting; returns (index, samples) of the interval it replaced,
    /// if one was still waiting.
    fn put(&self, mut raw: Raw) -> Option<(u64, u64)> {
        let mut s = self.lock();
        let gone = s.waiting.take().map(|older| {
            let gone = (older.index, older.samples);
            raw.replaces(older);
            gone
        });
        s.dropped += u64::from(gone.is_some());
        s.waiting = Some(raw);
        self.ready.notify_one();
        gone
    }

    /// The next interval; None once closed and empty.
    fn take(&self) -> Option<Raw> {
        let mut s = self.lock();
        loop {
            if let Some(raw) = s.waiting.take() {
                return Some(raw);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// No more intervals: the naming thread ends once the waiting one is named.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

/// What the log said of the exports so far: a line is said for the first interval, for every
/// interval while exports fail (an earlier export still waiting, retried or dropped), and when
/// they recover; every interval is logged at `info` (RUST_LOG=info).
#[derive(Default)]
struct Health {
    intervals: u64,
    last: Stats,
    failing: bool,
}

impl Health {
    /// `st`: the exporter's stats before this interval's export was queued; `behind`: the
    /// intervals dropped so far because naming fell behind.
    fn interval(&mut self, iv: &Interval, profiles: usize, st: &Stats, behind: u64) {
        self.intervals += 1;
        let new_drops = st.dropped() - self.last.dropped();
        let failing = st.retries > self.last.retries || new_drops > 0 || st.pending > 0;
        tracing::info!(
            interval = iv.index,
            samples = iv.samples,
            lost = iv.lost,
            processes = iv.processes,
            profiles,
            naming_ms = iv.naming.as_millis() as u64,
            dropped_intervals = behind,
            named = iv.names.named,
            from_cache = iv.names.cached,
            sent = st.sent,
            pending = st.pending,
            retries = st.retries,
            dropped = st.dropped(),
            "interval exported"
        );
        let recovered = self.failing && !failing;
        if iv.index == 1 || failing || recovered {
            let waiting = st.pending + u64::from(profiles > 0);
            let export = if failing {
                format!(
                    "export failing: {} sent, {waiting} queued, {} dropped (last error: {})",
                    st.sent,
                    st.dropped(),
                    st.last_error.as_deref().unwrap_or("none yet")
                )
            } else if recovered {
                format!(
                    "export recovered: {} sent, {waiting} queued, {} dropped",
                    st.sent,
                    st.dropped()
                )
            } else {
                "export queued (a line follows only when exports fail or recover; every interval: RUST_LOG=info)".to_string()
            };
            say!(
                "perfpy: interval {}: {} samples ({} lost), {} profile{}; {export}",
                iv.index,
                iv.samples,
                iv.lost,
                profiles,
                plural(profiles as u64)
            );
        }
        self.failing = failing;
        self.last = st.clone();
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::interval::tests::raw;

    #[test]
    fn a_newer_interval_replaces_the_waiting_one_and_the_drain_never_waits() {
        let h = Arc::new(Handoff::default());
        assert_eq!(h.put(raw(1, 0, 10, Vec::new())), None);
        // The namer is busy: interval 2 replaces interval 1, dropped whole.
        assert_eq!(h.put(raw(2, 0, 20, Vec::new())), Some((1, 10)));
        assert_eq!(h.dropped(), 1);
        assert_eq!(h.take().map(|r| r.index), Some(2));
        // The namer waits for the next interval, and ends once closed and empty.
        let namer = {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(r) = h.take() {
                    got.push(r.index);
                }
                got
            })
        };
        assert_eq!(h.put(raw(3, 0, 30, Vec::new())), None);
        // Closed with interval 3 still waiting or being named: it is named first.
        h.close();
        assert_eq!(namer.join().unwrap(), [3]);
        assert_eq!(h.dropped(), 1);
    }
}
