//! `perfpy agent`: continuous profiling into an OpenTelemetry Collector. Samples until SIGTERM
//! or SIGINT (the whole machine by default, or `-p` processes) and every `--interval` exports
//! that interval's profile as one OTLP request. The export queue is never waited on: a
//! Collector that is down or slow costs queued, retried, at worst dropped (oldest first)
//! profiles, counted and said, never a pause in sampling.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::output::otlp;
use crate::output::otlp_export::{self, Exporter, Stats};
use crate::record::interval::{Interval, Periodic};

/// How long, once stopped, the agent keeps sending what is queued (the last interval
/// included): within Kubernetes' default 30 s termination grace.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

pub struct Options {
    /// What to sample and how (`all` or `pids`; no command, no duration, no output file).
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
    let exporter = Exporter::new(opts.otlp, otlp_export::DEFAULT_QUEUE)?;
    let mut p = Periodic::start(opts.record, stop)?;
    say!(
        "perfpy: agent sampling {} at {rate} Hz, exporting every {} to {} (stop with SIGTERM or Ctrl-C)",
        p.sampled(),
        seconds(opts.interval),
        exporter.url()
    );
    let mut health = Health::default();
    let mut deadline = Instant::now() + opts.interval;
    let end = loop {
        let iv = p.next(deadline);
        deadline += opts.interval;
        // Naming took longer than an interval (a first interval of a whole machine): the
        // next one starts now rather than at once.
        if deadline <= Instant::now() {
            deadline = Instant::now() + opts.interval;
        }
        // What became of the earlier exports, before this one is queued.
        let before = exporter.stats();
        let profiles = if iv.report.samples.is_empty() {
            0
        } else {
            let (body, n) = otlp::request(&iv.report);
            exporter.submit(body);
            n
        };
        health.interval(&iv, profiles, &before);
        if let Some(end) = iv.end {
            break end;
        }
    };
    let url = exporter.url().to_string();
    let st = exporter.close(CLOSE_GRACE);
    say!(
        "perfpy: agent stopped ({end}) after {} interval{}: {} export{} sent to {url}, {} dropped{}",
        health.intervals,
        plural(health.intervals),
        st.sent,
        plural(st.sent),
        st.dropped(),
        match (&st.last_error, st.dropped()) {
            (Some(e), d) if d > 0 => format!(" (last error: {e})"),
            _ => String::new(),
        }
    );
    Ok(0)
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
    /// `st`: the exporter's stats before this interval's export was queued.
    fn interval(&mut self, iv: &Interval, profiles: usize, st: &Stats) {
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
