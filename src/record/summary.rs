//! The summary printed at the end of a recording.

use std::collections::{HashMap, HashSet};

use perfpy_process::Version;

use super::collect::{Collector, Stats};
use crate::profile::{Cut, Profile};

/// The summary's part on stacks cut short: how many, by which limit, and the option that
/// raises it; and stacks deeper than the native copy that the walker completed.
fn truncation_summary(st: &Stats) -> String {
    let mut s = String::new();
    for cut in Cut::ALL {
        let n = st.truncated[cut as usize];
        if n > 0 {
            s += &format!(", {n} truncated {}", cut.summary());
        }
    }
    if st.py_beyond_copy > 0 {
        s += &format!(
            ", {} deeper than the native stack copy (Python frames complete; C code calling back into Python between the outer ones not shown: raise --stack-size, max 65000)",
            st.py_beyond_copy
        );
    }
    s
}

/// Whether the eBPF walker names the Python frames of this CPython minor version.
pub(super) fn walker_names(version: perfpy_process::Version) -> bool {
    // 3.13+: from the target's own debug offsets (a table that fails is refused per process).
    version.at_least(3, 13) || perfpy_bpf::Offsets::for_version(version).is_some()
}

fn procs_with_samples(p: &Profile, key: crate::ids::ProcessKey) -> bool {
    p.counts.keys().any(|k| k.proc == key)
}

/// What the end-of-run summary is made of.
pub(super) struct Ending<'a> {
    pub end_reason: &'a str,
    pub duration: std::time::Duration,
    pub sym_time: std::time::Duration,
    /// The eBPF walker's (runs, ns) when the kernel counted them.
    pub walker_stats: Option<(u64, u64)>,
    pub child_status: Option<i32>,
    pub refused_perf_maps: &'a [(u32, String)],
    pub cut_short: bool,
    pub coverage: Option<&'a crate::coverage::Coverage>,
    pub report: &'a crate::report::Report,
    pub collector: &'a Collector,
    /// How `--inject-python` went, per pid.
    pub inject_notes: &'a HashMap<u32, String>,
    /// The launched command's pid.
    pub launched: Option<u32>,
    /// PYTHONPERFSUPPORT=1 was set for the launched command.
    pub perf_env_set: bool,
    /// The walker was asked for (no `--no-ebpf`), and it ran.
    pub ebpf: bool,
    pub walker_ran: bool,
}

/// Prints the summary: what ended the run, counts, warnings, coverage, and a line per process
/// (the 15 with most samples) saying how its Python frames were named, or why not.
pub(super) fn print(e: &Ending) {
    let c = e.collector;
    if let Some((runs, ns)) = e.walker_stats {
        if runs > 0 && ns > 0 {
            say!(
                "perfpy: eBPF walker: {runs} runs, {:.2} µs per run",
                ns as f64 / runs as f64 / 1000.0
            );
        }
    }
    let nprocs = c
        .procs
        .iter()
        .filter(|p| procs_with_samples(&c.profile, p.key))
        .count();
    say!(
        "perfpy: {} after {:.1}s: {} samples, {} lost, {} process{}, {} stacks incomplete ({:.1}%){}, symbolized in {:.2}s",
        e.end_reason,
        e.duration.as_secs_f64(),
        c.stats.samples,
        c.stats.lost,
        nprocs,
        if nprocs == 1 { "" } else { "es" },
        c.stats.unwind_incomplete,
        100.0 * c.stats.unwind_incomplete as f64 / c.stats.samples.max(1) as f64,
        truncation_summary(&c.stats),
        e.sym_time.as_secs_f64(),
    );
    if let Some(code) = e.child_status {
        say!("perfpy: command exited with status {code}");
    }
    for (pid, why) in e.refused_perf_maps {
        say!("perfpy: warning: pid {pid}: perf map not read: {why}; frames in its generated code are left as addresses");
    }
    if e.cut_short {
        say!("perfpy: naming of frames cut short by a signal: some frames are left as addresses");
    }
    if let Some(cv) = e.coverage {
        cv.print();
    }
    process_rows(e);
}

/// Per process: samples and how its Python frames were named (or why not).
fn process_rows(e: &Ending) {
    // (samples, samples with Python frames, any named by the walker)
    let mut per: HashMap<u32, (u64, u64, bool)> = HashMap::new();
    let mut tramp_pids = HashSet::new();
    for s in &e.report.samples {
        let x = per.entry(s.pid).or_default();
        x.0 += s.count;
        if s.frames_from.python() {
            x.1 += s.count;
        }
        x.2 |= s.frames_from.ebpf();
        if s.frames_from.trampoline() {
            tramp_pids.insert(s.pid);
        }
    }
    let mut rows: Vec<(u32, u64, u64, bool)> = per
        .into_iter()
        .map(|(pid, (n, py, eb))| (pid, n, py, eb))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    const SHOWN: usize = 15;
    for &(pid, n, py_samples, by_ebpf) in rows.iter().take(SHOWN) {
        let p = e.collector.procs.iter().rev().find(|p| p.pid == pid);
        let comm = p.map(|p| p.comm.as_str()).unwrap_or("?");
        let how = match p.and_then(|p| p.python_version) {
            Some(v) => python_row(
                e,
                pid,
                v,
                n,
                py_samples,
                by_ebpf,
                tramp_pids.contains(&pid) || p.is_some_and(|p| p.trampoline_seen),
            ),
            None => "native".to_string(),
        };
        say!("perfpy:   {pid:>8} {comm:<16} {n:>7} samples  {how}");
    }
    if rows.len() > SHOWN {
        say!("perfpy:   … and {} more processes", rows.len() - SHOWN);
    }
}

/// How a CPython process's frames were named, from its samples: never more than they show.
fn python_row(
    e: &Ending,
    pid: u32,
    v: Version,
    n: u64,
    py_samples: u64,
    by_ebpf: bool,
    trampoline_seen: bool,
) -> String {
    let py_named = py_samples > 0;
    // A source that named only some of them (a trampoline turned off by someone else
    // mid-run) is said with its share.
    // (Below 99.5%: "in 3137 of its samples (100%)" would say nothing.)
    let share = if py_named && (py_samples as f64) < 0.995 * n as f64 {
        format!(
            " in {} of its samples ({:.0}%)",
            py_samples,
            100.0 * py_samples as f64 / n as f64
        )
    } else {
        String::new()
    };
    let note = e.inject_notes.get(&pid).cloned().or_else(|| {
        (e.launched == Some(pid) && e.perf_env_set && v.at_least(3, 12))
            .then(|| "trampoline (PYTHONPERFSUPPORT=1)".to_string())
    });
    match (py_named, note) {
        (true, Some(n)) if by_ebpf => format!(
            "CPython {v}: Python frames from the eBPF walker; the {n} was on too, not needed, and slows Python calls down"
        ),
        (true, _) if by_ebpf && trampoline_seen => format!(
            "CPython {v}: Python frames from the eBPF walker; its perf trampoline was on too (-X perf or PYTHONPERFSUPPORT), not needed, and slows Python calls down"
        ),
        (true, _) if by_ebpf => {
            format!("CPython {v}: Python frames from the eBPF walker, no trampoline{share}")
        }
        (true, Some(n)) => format!("CPython {v}: Python frames from the {n}{share}"),
        (true, None) => {
            format!("CPython {v}: Python frames from its perf trampoline (-X perf){share}")
        }
        // Nothing to name: the process did not run on a CPU while it was sampled.
        (false, _) if n == 0 => format!(
            "CPython {v}: not on a CPU during the recording (idle or blocked: `perfpy dump -p {pid}` shows where it waits)"
        ),
        (false, Some(n)) => format!("CPython {v}: native frames only ({n})"),
        (false, None) => {
            let why = why_unnamed(e, pid, v);
            // The trampoline is advice only where it would name what the walker could not.
            let ran_python = !e.collector.walked.contains(&pid)
                || e.collector.walk_refused.get(&pid).is_some_and(|r| !r.is_empty());
            if v.at_least(3, 12) && ran_python {
                format!("CPython {v}: native frames only ({why}; start it with -X perf or use --inject-python)")
            } else {
                format!("CPython {v}: native frames only ({why})")
            }
        }
    }
}

/// Why the walker named no frame of a CPython process.
fn why_unnamed(e: &Ending, pid: u32, v: Version) -> String {
    // 3.13+ beyond the layouts perfpy holds: the walker's refusal (next) names the version.
    let supported = walker_names(v);
    let c = e.collector;
    if !e.ebpf {
        "eBPF walker off (--no-ebpf)".into()
    } else if !e.walker_ran {
        "eBPF walker not loaded, see the warning above".into()
    } else if !supported {
        "the eBPF walker does not know this version".into()
    } else if let Some(r) = c.walk_refused.get(&pid).filter(|r| !r.is_empty()) {
        r.clone()
    } else if c.walked.contains(&pid) {
        "no Python code ran while it was sampled".into()
    } else {
        "its interpreter could not be read: it exited first, or its symbols are stripped".into()
    }
}
