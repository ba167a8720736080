//! `--inject-python` during a recording: turning trampolines on (strict for `-p`, lenient for
//! `-a` through a scanner thread) and releasing them however the recording ends.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) const INJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns off every trampoline we turned on, however the recording ends: explicitly after the
/// perf maps were read ([`Deactivator::finish`]), or from `Drop` on an error or a panic.
pub(super) struct Deactivator {
    pub(super) done: bool,
    /// The `-a` scanner that activates new processes: stopped and joined first, so that no
    /// activation can start after the deactivation.
    pub(super) halt: Arc<AtomicBool>,
    pub(super) scanner: Option<std::thread::JoinHandle<()>>,
}

impl Deactivator {
    pub(super) fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.halt.store(true, Ordering::Relaxed);
        if let Some(t) = self.scanner.take() {
            let _ = t.join();
        }
        for (pid, r) in perfpy_inject::registry().deactivate_all(INJECT_TIMEOUT) {
            match r {
                Ok(perfpy_inject::Released::TurnedOff) => {
                    say!("perfpy: pid {pid}: perf trampoline turned off again")
                }
                Ok(perfpy_inject::Released::LeftAsFound) => {
                    tracing::debug!(pid, "trampoline was on when found: left on")
                }
                Ok(perfpy_inject::Released::StillUsed(others)) => say!(
                    "perfpy: pid {pid}: perf trampoline left on: {} other perfpy session{} ({}) still use{} it; the last one turns it off",
                    others.len().max(1),
                    if others.len() > 1 { "s" } else { "" },
                    if others.is_empty() {
                        "pid unknown".to_string()
                    } else {
                        others.iter().map(|p| format!("pid {p}")).collect::<Vec<_>>().join(", ")
                    },
                    if others.len() > 1 { "" } else { "s" }
                ),
                Err(e) if e.reason() == Some(perfpy_inject::Reason::ProcessGone) => {
                    tracing::debug!(pid, "exited before deactivation")
                }
                Err(e) => say!("perfpy: warning: pid {pid}: could not turn the perf trampoline off: {e}; run `perfpy inject -p {pid} --deactivate`"),
            }
        }
    }
}

impl Drop for Deactivator {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Lenient activation for `-a`: every CPython 3.12+ process gets its trampoline; others are
/// reported once with the reason.
pub(super) fn inject_lenient(
    pid: u32,
    seen: &mut HashSet<(u32, u64)>,
    notes: &mut HashMap<u32, String>,
) {
    let start = perfpy_process::proc::start_time(pid).unwrap_or(0);
    if !seen.insert((pid, start)) || pid == std::process::id() {
        return;
    }
    // What happened to each process is said, but not without end: with many short-lived
    // processes a line each would flood the terminal (or fill a pipe nobody reads until the
    // end, and block us). The summary at the end has the processes that were sampled.
    static SAID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    const SAY_AT_MOST: usize = 20;
    let say = |line: String| {
        let n = SAID.fetch_add(1, Ordering::Relaxed);
        if n < SAY_AT_MOST {
            say!("{line}");
        } else if n == SAY_AT_MOST {
            say!("perfpy: (further --inject-python messages in the debug log: RUST_LOG=debug)");
        }
        tracing::debug!("{line}");
    };
    // Expected with -a, and not worth a line: processes that exit while we look.
    let quiet =
        |e: &perfpy_inject::InjectError| e.reason() == Some(perfpy_inject::Reason::ProcessGone);
    let p = match perfpy_inject::discover(pid as i32) {
        Ok(p) => p,
        Err(e) if e.reason() == Some(perfpy_inject::Reason::NotPython) => return,
        Err(e) => {
            if quiet(&e) {
                tracing::debug!("pid {pid}: skipped: {e}");
            } else {
                say(format!("perfpy: pid {pid}: skipped: {e}"));
            }
            notes.insert(
                pid,
                format!(
                    "skipped: {}",
                    e.reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string())
                ),
            );
            return;
        }
    };
    match perfpy_inject::registry().activate(&p, INJECT_TIMEOUT) {
        Ok(perfpy_inject::ActivateOutcome::Activated) => {
            say(format!(
                "perfpy: pid {pid}: perf trampoline turned on (CPython {})",
                p.version
            ));
            notes.insert(pid, "trampoline turned on by perfpy".into());
        }
        Ok(perfpy_inject::ActivateOutcome::AlreadyActive) => {
            say(format!(
                "perfpy: pid {pid}: perf trampoline already on (CPython {}); left as it is",
                p.version
            ));
            notes.insert(pid, "trampoline already on".into());
        }
        Err(e) => {
            if quiet(&e) {
                tracing::debug!("pid {pid}: no trampoline: {e}");
            } else {
                say(format!("perfpy: pid {pid}: no trampoline: {e}"));
            }
            notes.insert(
                pid,
                format!(
                    "no trampoline: {}",
                    e.reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string())
                ),
            );
        }
    }
}
