//! Ctrl-C, SIGTERM and SIGHUP: the first ends sampling (the profile is then named and written);
//! one that arrives after sampling has ended cuts short what is still being read or named, so
//! that the profile collected so far is written promptly, frames not yet named left as
//! addresses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by a signal that arrives once sampling has ended: reads of the targets' files and
/// symbolization stop at their next step.
pub static ABORT_READS: AtomicBool = AtomicBool::new(false);
static SAMPLING_DONE: AtomicBool = AtomicBool::new(false);

/// Installs the handlers; the flag returned is set by the first signal.
pub fn install() -> std::io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        let stop = stop.clone();
        // SAFETY: the handler only loads and stores atomics, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                if SAMPLING_DONE.load(Ordering::Relaxed) {
                    ABORT_READS.store(true, Ordering::Relaxed);
                }
                stop.store(true, Ordering::Relaxed);
            })?;
        }
    }
    Ok(stop)
}

/// Sampling has ended: from now on a signal aborts reads and symbolization. If one ended
/// sampling itself, it does not count: it asked for the profile, not for less of it.
pub fn sampling_done() {
    SAMPLING_DONE.store(true, Ordering::Relaxed);
}

pub fn aborted() -> bool {
    ABORT_READS.load(Ordering::Relaxed)
}
