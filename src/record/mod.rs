//! The record session: open events, drain rings, unwind and aggregate each sample, stop on the
//! duration, a signal or the targets' exit, then symbolize and write.

use crate::ids::ProcessKey;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::output::Format;
use crate::process::Process;
use crate::targets;

mod capture;
mod collect;
mod events;
mod inject;
pub mod interval;
pub mod live;
mod merge;
mod offcpu;
pub mod replay;
mod session;
mod summary;

use collect::Collector;
use inject::Deactivator;
use session::Session;

pub struct Options {
    pub pids: Vec<i32>,
    pub all: bool,
    pub command: Vec<String>,
    pub duration: Option<Duration>,
    pub rate: u64,
    pub output: Option<PathBuf>,
    pub format: Format,
    /// None: chosen by whether the eBPF walker runs.
    pub stack_size: Option<u32>,
    pub max_frames: usize,
    /// The eBPF walker's limit of Python frames per sample.
    pub max_python_frames: u32,
    pub keep_interpreter: bool,
    /// PYTHONPERFSUPPORT=1 for a launched command: None sets it only without the eBPF walker.
    pub python_perf_env: Option<bool>,
    pub inject_python: bool,
    pub ebpf: bool,
    /// `--otlp-endpoint`: also send the profile to an OpenTelemetry Collector.
    pub otlp: Option<crate::output::otlp_export::Config>,
    /// -p: follow the targets' child processes too.
    pub subprocesses: bool,
    /// `--function` / `--nolineno`: what Python frames carry as line.
    pub lines: crate::report::Lines,
    /// `--off-cpu`: the `--min-block` threshold in nanoseconds.
    pub off_cpu: Option<u64>,
    /// `--sample`: what collapsed, flamegraph and speedscope show (None: wall with --off-cpu).
    pub sample: Option<crate::report::SampleView>,
}

pub struct Outcome {
    /// Exit status of a launched command, if it exited during the recording.
    pub child_status: Option<i32>,
}

/// A recording, step by step: plan (every check without side effects) → start the session
/// (open events, inject, release a launched command) → collect until done → finish (targets
/// left as found) → name frames → write → summary.
pub fn run(opts: Options, stop: Arc<AtomicBool>) -> Result<Outcome> {
    let Plan {
        tgids,
        target_name,
        dest,
        otlp,
        to_inject,
    } = plan(&opts)?;
    if opts.subprocesses && opts.pids.is_empty() {
        say!("perfpy: note: --subprocesses is for -p: a launched command's child processes are always profiled, and -a profiles every process");
    }
    let mut s = Session::start(&opts, tgids, &to_inject, &stop)?;
    // Said once sampling runs (scripts wait for this line before starting their work).
    say!(
        "perfpy: sampling {} at {} Hz {}",
        sampled(&opts, &s),
        opts.rate,
        match opts.duration {
            Some(d) => format!("for {}s", d.as_secs_f64()),
            None => "until Ctrl-C".to_string(),
        }
    );
    let end = loop {
        if let Some(end) = s.collect_until(&opts, &stop, None) {
            break end;
        }
    };
    let fin = s.finish(&opts, end);

    // Symbolize and write. (Tests wait for this debug line to signal perfpy while it names.)
    tracing::debug!("sampling ended; naming frames");
    let t_sym = Instant::now();
    let Named {
        report,
        refused_perf_maps,
        cut_short,
    } = name_frames(
        &s.c,
        &opts,
        &mut s.injection.deactivator,
        s.capture.period_ns,
        s.start_wall,
        fin.duration,
    );
    let dest_name = dest.display();
    // Collapsed, flamegraph, speedscope: one value, chosen by --sample.
    let text = (opts.format != Format::Pprof).then(|| {
        let mut t = report.clone();
        t.select(opts.sample.unwrap_or(if opts.off_cpu.is_some() {
            crate::report::SampleView::Wall
        } else {
            crate::report::SampleView::Cpu
        }));
        t
    });
    dest.write_with(|w| {
        write(
            text.as_ref().unwrap_or(&report),
            opts.format,
            &target_name,
            w,
        )
    })?;
    // Exported after the file is written; a failed export is reported after the summary.
    let exported =
        otlp.map(|exporter| crate::output::otlp::send_recording(exporter, &report, &dest_name));
    summary::print(&summary::Ending {
        end_reason: end.reason,
        duration: fin.duration,
        sym_time: t_sym.elapsed(),
        walker_stats: fin.walker_stats,
        child_status: fin.child_status,
        refused_perf_maps: &refused_perf_maps,
        cut_short,
        coverage: fin.coverage.as_ref(),
        report: &report,
        collector: &s.c,
        inject_notes: &s.injection.notes(),
        launched: s.launched().map(|p| p as u32),
        perf_env_set: s.capture.perf_env_set,
        ebpf: opts.ebpf,
        walker_ran: fin.walker_ran,
    });
    offcpu::print_summary(&s.c, &report, fin.duration);
    match opts.format {
        Format::Pprof if dest_name != "stdout" => {
            say!("perfpy: wrote {dest_name}; open it with: go tool pprof -http=:8080 {dest_name}")
        }
        _ => say!("perfpy: wrote {dest_name}"),
    }
    if let Some(Err(e)) = exported {
        return Err(e);
    }
    Ok(Outcome {
        child_status: fin.child_status,
    })
}

/// What the "sampling …" line names.
fn sampled(opts: &Options, s: &Session) -> String {
    if opts.all {
        "every process".to_string()
    } else if let Some(pid) = s.launched() {
        format!("the command (pid {pid})")
    } else {
        let pids: Vec<String> = s.tgids.iter().map(|p| p.to_string()).collect();
        format!("pid {}", pids.join(", "))
    }
}

/// Writes the report in the format asked.
fn write(
    report: &crate::report::Report,
    format: Format,
    target_name: &str,
    w: &mut dyn std::io::Write,
) -> Result<()> {
    match format {
        Format::Pprof => Ok(crate::output::pprof::write(report, w)?),
        Format::Collapsed => Ok(crate::output::collapsed::write(report, w)?),
        Format::Flamegraph => {
            crate::output::flamegraph::write(report, &format!("perfpy {target_name}"), w)
        }
        Format::Speedscope => Ok(crate::output::speedscope::write(
            report,
            &format!("perfpy {target_name}"),
            w,
        )?),
    }
}

/// The profile as users read it, and what naming its frames met.
struct Named {
    report: crate::report::Report,
    /// Perf maps not read (pid, why).
    refused_perf_maps: Vec<(u32, String)>,
    /// A signal cut naming short.
    cut_short: bool,
}

/// Names every location once, releases the trampolines (the perf maps are read then), and
/// builds the report the writers take.
fn name_frames(
    c: &Collector,
    opts: &Options,
    deactivator: &mut Deactivator,
    period_ns: u64,
    start: SystemTime,
    duration: Duration,
) -> Named {
    let procs: HashMap<ProcessKey, &Process> = c.procs.iter().map(|p| (p.key, p)).collect();
    let symbolized = crate::symbols::resolve(&c.profile, &c.files, &procs, opts.keep_interpreter);
    // The perf maps are read: now the trampolines we turned on go off again.
    deactivator.finish();
    let report = build_report(
        (&c.profile, &c.files),
        &procs,
        symbolized.resolved,
        ReportOptions::of(opts),
        (period_ns, start, duration),
    );
    Named {
        report,
        refused_perf_maps: symbolized.refused_perf_maps,
        cut_short: symbolized.cut_short,
    }
}

/// What a report keeps of the options: what Python frames carry as line, the interpreter's
/// frames, off-CPU sample types.
#[derive(Clone, Copy)]
pub(super) struct ReportOptions {
    lines: crate::report::Lines,
    keep_interpreter: bool,
    offcpu: bool,
}

impl ReportOptions {
    pub(super) fn of(opts: &Options) -> Self {
        Self {
            lines: opts.lines,
            keep_interpreter: opts.keep_interpreter,
            offcpu: opts.off_cpu.is_some(),
        }
    }
}

/// The report of what `profile` holds (its files in `files`), its locations named by
/// `resolved`; `span`: the sampling period, when the profile started, how long it covers.
fn build_report(
    (profile, files): (&crate::profile::Profile, &crate::files::Files),
    procs: &HashMap<ProcessKey, &Process>,
    mut resolved: Vec<crate::symbols::Resolved>,
    how: ReportOptions,
    span: (u64, SystemTime, Duration),
) -> crate::report::Report {
    let (period_ns, start, duration) = span;
    crate::report::set_lines(&mut resolved, profile, how.lines);
    let (samples, resolved) =
        crate::report::build(profile, resolved, procs, files, how.keep_interpreter);
    crate::report::Report {
        locations: profile.locations.clone(),
        resolved,
        samples,
        period_ns,
        start,
        duration,
        files: report_files(files),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        offcpu: how.offcpu,
    }
}

/// The files of a recording as a report names them: path and build id, by file id.
fn report_files(files: &crate::files::Files) -> Vec<(String, Option<Vec<u8>>)> {
    files
        .list
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                f.elf.as_ref().and_then(|e| e.build_id.clone()),
            )
        })
        .collect()
}

/// What a recording works on, checked before anything is done: the targets (pids as
/// processes), the output (created now, so an unwritable path fails first), the Collector
/// (reached now), the processes to inject (each checked).
struct Plan {
    tgids: Vec<u32>,
    target_name: String,
    dest: crate::output::dest::Dest,
    otlp: Option<crate::output::otlp_export::Exporter>,
    to_inject: Vec<perfpy_inject::PythonProcess>,
}

/// The first step of a recording: every check that needs no side effect on a target.
fn plan(opts: &Options) -> Result<Plan> {
    // Targets first (no side effects), then the output file, then events.
    let tgids = check_targets(opts)?;
    let target_name = if !opts.command.is_empty() {
        std::path::Path::new(&opts.command[0])
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cmd".into())
    } else if opts.all {
        "all".to_string()
    } else {
        tgids
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("-")
    };
    let out_path = opts.output.clone().unwrap_or_else(|| {
        let ts = chrono_like_now();
        PathBuf::from(format!(
            "perfpy-{target_name}-{ts}.{}",
            opts.format.extension()
        ))
    });
    let dest = crate::output::dest::Dest::prepare(&out_path)?;
    // A wrong or unreachable Collector is found now, before anything is done to a target.
    let otlp = opts
        .otlp
        .clone()
        .map(crate::output::otlp_export::Exporter::connect)
        .transpose()?;
    if opts.inject_python && !opts.command.is_empty() {
        say!("perfpy: note: --inject-python is for -p and -a; a launched command is named by the eBPF walker from its start, or gets PYTHONPERFSUPPORT=1 where the walker cannot run (--python-perf-env: always)");
    }
    let to_inject = injectable(opts, &tgids)?;
    Ok(Plan {
        tgids,
        target_name,
        dest,
        otlp,
        to_inject,
    })
}

/// The options' limits, and the `-p` targets as processes (thread ids given are taken to
/// their process): checks without side effects.
fn check_targets(opts: &Options) -> Result<Vec<u32>> {
    if opts.rate == 0 || opts.rate > 100_000 {
        bail!(
            "invalid rate {}: give samples per second between 1 and 100000 (e.g. -r 100)",
            opts.rate
        );
    }
    if let Some(n) = opts.stack_size.filter(|n| !(512..=65000).contains(n)) {
        bail!("invalid --stack-size {n}: give bytes between 512 and 65000");
    }
    let mut tgids = Vec::new();
    for &pid in &opts.pids {
        let t = targets::check_pid(pid)?;
        if !tgids.contains(&t) {
            tgids.push(t);
        }
    }
    Ok(tgids)
}

/// `--inject-python` with `-p`, strict: every target must be injectable, checked before any
/// event is opened or anything is done to a target.
fn injectable(opts: &Options, tgids: &[u32]) -> Result<Vec<perfpy_inject::PythonProcess>> {
    let mut to_inject = Vec::new();
    if opts.inject_python && !opts.all && opts.command.is_empty() {
        for &pid in tgids {
            let p = perfpy_inject::discover(pid as i32)
                .with_context(|| format!("--inject-python: pid {pid}"))?;
            perfpy_inject::check_injectable(&p)
                .with_context(|| format!("--inject-python: pid {pid}"))?;
            to_inject.push(p);
        }
    }
    Ok(to_inject)
}

/// Local time as YYYYmmdd-HHMMSS, for default file names.
fn chrono_like_now() -> String {
    let t = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes into our zeroed struct; `t` is a valid time_t.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        tm
    };
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}
