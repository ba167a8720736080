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

/// `--inject-python` for a recording: the trampolines turned on (strictly for `-p`, by a
/// scanner thread for `-a`), what happened per process for the summary, and the guard that
/// turns them off again however the recording ends.
pub(super) struct Injection {
    pub(super) deactivator: Deactivator,
    /// Per pid, how its Python frames are named by injection (for the summary).
    pub(super) notes: Arc<std::sync::Mutex<HashMap<u32, String>>>,
}

impl Injection {
    /// Notes where the walker makes injection needless, and starts the `-a` scanner. The `-p`
    /// targets are turned on by [`Injection::activate`], once the walker knows them.
    pub(super) fn start(
        opts: &super::Options,
        to_inject: &[perfpy_inject::PythonProcess],
        walker_loaded: bool,
        stop: &Arc<AtomicBool>,
    ) -> Injection {
        if walker_loaded && opts.inject_python {
            let named: Vec<String> = to_inject
                .iter()
                .filter(|p| super::summary::walker_names(p.version))
                .map(|p| p.pid.to_string())
                .collect();
            if opts.all {
                say!("perfpy: note: --inject-python is not needed where the eBPF walker names Python frames (it does here); the trampolines it turns on slow the targets' Python calls down");
            } else if !named.is_empty() {
                say!("perfpy: note: --inject-python is not needed for pid {}: the eBPF walker names its Python frames; the trampoline turned on as asked slows its Python calls down (generator resumption ~2x)", named.join(", "));
            }
        }
        let notes: Arc<std::sync::Mutex<HashMap<u32, String>>> = Arc::default();
        for p in to_inject {
            notes
                .lock()
                .unwrap()
                .insert(p.pid as u32, "trampoline (--inject-python)".into());
        }
        let halt = Arc::new(AtomicBool::new(false));
        // -a --inject-python: a thread looks for Python processes every second, new ones
        // included, so that injecting (up to a few hundred ms per busy process) never holds up
        // the rings.
        let scanner = (opts.all && opts.inject_python)
            .then(|| scan(notes.clone(), halt.clone(), stop.clone()));
        Injection {
            deactivator: Deactivator {
                done: false,
                halt,
                scanner,
            },
            notes,
        }
    }

    /// Turns on the trampolines of the `-p` targets (all checked injectable by the plan).
    pub(super) fn activate(
        &self,
        to_inject: &[perfpy_inject::PythonProcess],
    ) -> anyhow::Result<()> {
        for p in to_inject {
            match perfpy_inject::registry().activate(p, INJECT_TIMEOUT) {
                Ok(perfpy_inject::ActivateOutcome::Activated) => say!(
                    "perfpy: pid {}: perf trampoline turned on (CPython {}); Python functions entered from now on are named",
                    p.pid,
                    p.version
                ),
                Ok(perfpy_inject::ActivateOutcome::AlreadyActive) => say!(
                    "perfpy: pid {}: perf trampoline already on (CPython {}); left as it is",
                    p.pid,
                    p.version
                ),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("--inject-python: pid {}", p.pid)))
                }
            }
        }
        Ok(())
    }

    /// Stops the `-a` scanner: no activation may start after this, so that the deactivation
    /// sees them all.
    pub(super) fn stop_scanning(&mut self) {
        self.deactivator.halt.store(true, Ordering::Relaxed);
        if let Some(t) = self.deactivator.scanner.take() {
            let _ = t.join();
        }
    }

    pub(super) fn notes(&self) -> HashMap<u32, String> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The `-a --inject-python` scanner thread: every second, every process not seen yet.
fn scan(
    notes: Arc<std::sync::Mutex<HashMap<u32, String>>>,
    halt: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let ended = || halt.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed);
        let mut seen: HashSet<(u32, u64)> = HashSet::new();
        while !ended() {
            let pids: Vec<u32> = std::fs::read_dir("/proc")
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            for pid in pids {
                if ended() {
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
                if ended() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
}
