//! Opening what samples: the eBPF walker (with or without its per-CPU sample filter) and the
//! errors of `perf_event_open` turned into what to do.

use super::Options;

/// The eBPF walker, and whether the events sample every CPU with the walker keeping only the
/// targets' samples: -p and launched commands, so that threads and processes that live less
/// than a period are sampled in proportion to their CPU time (inherited per-thread events
/// count the period per thread). Falls back to per-thread events, saying so.
pub(super) fn load_walker(opts: &Options) -> (Option<perfpy_bpf::Walker>, bool) {
    if !opts.ebpf {
        return (None, false);
    }
    if !opts.all {
        let filtered =
            perfpy_bpf::Walker::load_with(opts.max_python_frames, true).and_then(|mut w| {
                w.follow_forks()?;
                Ok(w)
            });
        match filtered {
            Ok(w) => return (Some(w), true),
            Err(e) => tracing::debug!("eBPF sample filter: {:#}", anyhow::Error::from(e)),
        }
    }
    match perfpy_bpf::Walker::load(opts.max_python_frames) {
        Ok(w) => {
            if !opts.all {
                say!("perfpy: warning: cannot follow the targets' processes in the kernel (RUST_LOG=debug says why): each thread is sampled per period of its own CPU time, so short-lived threads and processes are undercounted");
            }
            (Some(w), false)
        }
        Err(e) => {
            let e = anyhow::Error::from(e);
            say!("perfpy: warning: {e:#}; Python frames only from perf trampolines");
            (None, false)
        }
    }
}

pub(super) fn perm_error(e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            if nix::unistd::geteuid().is_root() {
                return anyhow::anyhow!(
                    "permission denied opening perf events ({e}) although perfpy runs as root: it lacks CAP_PERFMON (or CAP_SYS_ADMIN); in Docker add --cap-add PERFMON --cap-add SYS_PTRACE --cap-add BPF, in Kubernetes add them to the container's securityContext capabilities"
                );
            }
            // Debian and Android patch levels 3 and 4: no perf events at all without
            // CAP_PERFMON, whatever is asked.
            let extra = if paranoid.parse::<i32>().is_ok_and(|p| p >= 3) {
                " (levels 3 and above forbid perf events to unprivileged users entirely)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "permission denied opening perf events ({e}): run perfpy as root (sudo), or give it CAP_PERFMON (and CAP_SYS_PTRACE), or lower kernel.perf_event_paranoid (now {paranoid}{extra}) with `sysctl kernel.perf_event_paranoid=1`; in Docker add --cap-add PERFMON --cap-add SYS_PTRACE"
            )
        }
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => anyhow::anyhow!(
            "this kernel does not support cpu-clock sampling with perf_event_open ({e}): perfpy needs CONFIG_PERF_EVENTS"
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) => anyhow::anyhow!(
            "perf_event_open failed: {e}: perfpy opens one event per thread and CPU; raise the limit of open files (`ulimit -n 65536`) or profile fewer threads"
        ),
        _ => anyhow::anyhow!("perf_event_open failed: {e}"),
    }
}

/// One event per (thread, CPU), each with a descriptor of its own for the eBPF walker too: a
/// busy server on a big machine needs thousands. The soft limit goes up to the hard one.
pub(super) fn raise_nofile_limit() {
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) == 0
            && nofile.rlim_cur < nofile.rlim_max
        {
            nofile.rlim_cur = nofile.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &nofile);
        }
    }
}
