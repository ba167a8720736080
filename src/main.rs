//! perfpy: a sampling CPU profiler for Python on Linux.

#[macro_use]
mod say;

mod agent;
mod coverage;
mod dump;
mod dump_locals;
mod files;
mod ids;
mod info;
mod output;
mod process;
mod profile;
mod record;
mod records;
mod report;
mod signals;
mod symbols;
mod sys;
mod targets;
mod top;
mod unwind;
mod wait;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use output::Format;

#[derive(Parser)]
#[command(
    name = "perfpy",
    version,
    about = "Sampling CPU profiler for Python on Linux: mixed kernel, native and Python stacks, written as pprof"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sample running processes (-p) or a command (after --) and write a profile.
    #[command(
        after_help = "Examples:\n  perfpy record -p 1234 -d 30s -o app.pb.gz\n  perfpy record -r 1000 -- python3 -X perf app.py\n  go tool pprof -http=:8080 app.pb.gz"
    )]
    Record(RecordArgs),
    /// Turn CPython 3.12+'s perf trampoline on (or off) inside a running process, alone: to
    /// try it, or to repair a target after perfpy was killed (SIGKILL) during a recording.
    Inject {
        #[arg(short = 'p', long = "pid", value_name = "PID")]
        pid: i32,
        /// Turn it off instead.
        #[arg(long, conflicts_with = "status")]
        deactivate: bool,
        /// With --deactivate: turn it off even while other perfpy sessions use it.
        #[arg(long, requires = "deactivate")]
        force: bool,
        /// Only say whether it is on (asked inside the target; changes nothing).
        #[arg(long)]
        status: bool,
    },
    /// Replay a capture (`PERFPY_CAPTURE=DIR perfpy record …`) into a profile, without
    /// privileges: for tests (see testdata/replay/README.md).
    #[command(hide = true)]
    Replay {
        dir: std::path::PathBuf,
        #[arg(short = 'f', long = "format", value_enum, default_value = "collapsed")]
        format: Format,
    },
    /// Every thread's stack right now (Python frames, state, the system call it waits in,
    /// kernel frames), read without stopping the process.
    Dump {
        /// Process to dump. Repeatable.
        #[arg(
            short = 'p',
            long = "pid",
            value_name = "PID",
            required_unless_present = "all"
        )]
        pids: Vec<i32>,
        /// Every Python process (those mapping a python executable or libpython); one that
        /// cannot be read is reported and skipped.
        #[arg(short = 'a', long = "all", conflicts_with = "pids")]
        all: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also each Python frame's local variables (arguments first): names, types, a bounded
        /// repr of ints, floats, strings, bytes, None and bools, the length of containers; read
        /// from memory, no code run in the target.
        #[arg(long)]
        locals: bool,
    },
    /// A live view: functions by own and total share, over the last interval and since the
    /// start, refreshed every interval (keys: o own, t total, n name, s last/all, Tab thread,
    /// k native and kernel frames, space pause, q quit). Without a terminal on stdout, a plain
    /// table per interval.
    Top(TopArgs),
    /// Continuous profiling: sample until SIGTERM/Ctrl-C (the whole machine, or -p) and export
    /// each interval's profile to an OpenTelemetry Collector (OTLP profiles).
    #[command(
        after_help = "Examples:\n  perfpy agent --otlp-endpoint http://collector:4318\n  perfpy agent -p 1234 --interval 30s\n  OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 perfpy agent"
    )]
    Agent(AgentArgs),
    /// What this machine supports and, per Python process, its version, interpreter and how
    /// perfpy names its frames.
    Info {
        /// Only these processes (default: every process).
        #[arg(short = 'p', long = "pid", value_name = "PID")]
        pids: Vec<i32>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// What to sample and how often: the options `record`, `top` and `agent` share.
#[derive(clap::Args)]
struct Sampling {
    /// Process to profile, with all its threads (present and future). Repeatable.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pids: Vec<i32>,
    /// Every process on every CPU (whole machine), leniently: nothing a process does stops the run.
    #[arg(short = 'a', long = "all-cpus", visible_alias = "all")]
    all: bool,
    /// Samples per second per thread (cpu-clock). -F/--freq is perf's spelling.
    #[arg(short = 'r', long = "rate", visible_alias = "freq", short_alias = 'F', default_value_t = 100, value_parser = parse_rate, value_name = "HZ")]
    rate: u64,
    /// Turn on CPython 3.12+'s perf trampoline inside the targets for the run (ptrace), and off
    /// again at the end. Strict with -p (a target that cannot be injected stops the run before
    /// sampling), lenient with -a. Needed only where the eBPF walker cannot run (no BPF,
    /// --no-ebpf): the walker names every frame without it, and the trampoline slows the
    /// targets down.
    #[arg(long)]
    inject_python: bool,
    /// Do not load the eBPF frame walker: Python frames then come from perf trampolines only
    /// (and each thread is sampled per period of its own CPU time: short-lived threads and
    /// processes are undercounted).
    #[arg(long)]
    no_ebpf: bool,
}

impl Sampling {
    /// `record::Options` for these targets, every other option at its default.
    fn options(self) -> record::Options {
        record::Options {
            pids: self.pids,
            all: self.all,
            command: Vec::new(),
            duration: None,
            rate: self.rate,
            output: None,
            format: Format::Pprof,
            stack_size: None,
            max_frames: 512,
            max_python_frames: perfpy_bpf::DEFAULT_PY_FRAMES,
            keep_interpreter: false,
            python_perf_env: None,
            inject_python: self.inject_python,
            ebpf: !self.no_ebpf,
            otlp: None,
            subprocesses: false,
            lines: report::Lines::Current,
            off_cpu: None,
            sample: None,
        }
    }
}

/// A run with an end and a profile: the options `record` and `top` share.
#[derive(clap::Args)]
struct Run {
    /// How long to run: 30, 30s, 500ms, 2m, 1h. Default: until Ctrl-C (q in top) or the
    /// targets exit.
    #[arg(short = 'd', long, value_parser = parse_duration, value_name = "DURATION")]
    duration: Option<Duration>,
    /// Output file (top: written at the end, if given). Default for record:
    /// perfpy-<target>-<time>.<ext> in the current directory.
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Output format [default: from the output's extension (.svg: flamegraph; .txt, .folded,
    /// .collapsed: collapsed; .json: speedscope), else pprof].
    #[arg(short = 'f', long, value_enum)]
    format: Option<Format>,
    /// With -p: also profile the targets' child processes, those running now and those they
    /// start during the run (and theirs). A launched command's children always are.
    #[arg(long)]
    subprocesses: bool,
    /// Aggregate Python frames by function: each carries its function's first line instead of
    /// the line running (one box per function in a flamegraph), as py-spy's --function.
    #[arg(long, conflicts_with = "nolineno")]
    function: bool,
    /// No line numbers in Python frames at all.
    #[arg(long)]
    nolineno: bool,
    /// Command to launch and profile until it exits (after --).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

impl Run {
    /// `sampling`'s options for this run.
    fn options(self, sampling: Sampling) -> Result<record::Options> {
        one_target(&sampling.pids, &self.command, sampling.all)?;
        Ok(record::Options {
            command: self.command,
            duration: self.duration,
            format: self
                .format
                .unwrap_or_else(|| format_from_extension(self.output.as_deref())),
            output: self.output,
            subprocesses: self.subprocesses,
            lines: lines(self.function, self.nolineno),
            ..sampling.options()
        })
    }
}

#[derive(clap::Args)]
struct RecordArgs {
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    run: Run,
    /// Bytes of user stack copied per sample (max 65000). Default: 16384 when the eBPF walker
    /// runs (it reads Python frames itself; the copy is only for native frames), else 49152
    /// (~500 bytes per Python call under the perf trampoline: ~90 levels). Deeper stacks keep
    /// their inner frames and end in [truncated: ...] (with the walker, its Python frames the
    /// copy did not reach are added at the root instead).
    #[arg(long, value_name = "BYTES")]
    stack_size: Option<u32>,
    /// Most frames kept per stack.
    #[arg(long, default_value_t = 512, value_name = "N")]
    max_frames: usize,
    /// Most Python frames the eBPF walker reads per sample (1 – 16384); more: the outer ones
    /// are cut and the stack ends in [truncated: ...]. Covers CPython's default recursion limit
    /// (1000); the walker's cost grows with the frames it reads, not with this limit.
    #[arg(long, default_value_t = perfpy_bpf::DEFAULT_PY_FRAMES, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=perfpy_bpf::MAX_PY_FRAMES_CAP as i64))]
    max_python_frames: u32,
    /// Keep CPython's own native frames (eval loop, call machinery) between Python frames.
    #[arg(long)]
    keep_interpreter_frames: bool,
    /// Set PYTHONPERFSUPPORT=1 for a launched command even when the eBPF walker names its
    /// Python frames: CPython 3.12+ then runs under its perf trampoline, which costs the program
    /// time (generator resumption ~2x). Default: set only when the walker cannot run (no BPF,
    /// --no-ebpf).
    #[arg(long, conflicts_with = "no_python_perf_env")]
    python_perf_env: bool,
    /// Never set PYTHONPERFSUPPORT=1 for a launched command, not even without the eBPF walker.
    #[arg(long)]
    no_python_perf_env: bool,
    /// Also send the profile to an OpenTelemetry Collector (OTLP/HTTP profiles), e.g.
    /// http://localhost:4318; the file is written as well. Without URL: from
    /// OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT (headers, timeout,
    /// compression, certificate: the OTEL_EXPORTER_OTLP_* variables). Checked before sampling.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    otlp_endpoint: Option<String>,
    /// Also profile the time threads spend off the CPU (blocked, sleeping, waiting for the GIL,
    /// a lock, I/O, or preempted), each wait with its stack and kind; the pprof gets off-cpu
    /// and wall sample types. --idle is py-spy's name for it.
    #[arg(long, visible_alias = "idle")]
    off_cpu: bool,
    /// With --off-cpu: waits shorter than this are counted per thread, not stacked (e.g. 1ms,
    /// 500us, 0 for all).
    #[arg(long, value_name = "TIME", default_value = "1ms", value_parser = parse_min_block, requires = "off_cpu")]
    min_block: Duration,
    /// What collapsed, flamegraph and speedscope show: cpu (samples), off-cpu or wall (time
    /// in µs; off-cpu and wall need --off-cpu). Default: wall with --off-cpu, else cpu.
    #[arg(long, value_enum)]
    sample: Option<report::SampleView>,
}

fn parse_min_block(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid time {s:?}: give e.g. 1ms, 500us, 0"))?;
    let ns = match unit {
        "" if n == 0.0 => 0.0,
        "ns" => n,
        "us" | "µs" => n * 1e3,
        "ms" => n * 1e6,
        "s" => n * 1e9,
        _ => return Err(format!("invalid time {s:?}: give e.g. 1ms, 500us, 0")),
    };
    if !(0.0..=60e9).contains(&ns) {
        return Err(format!("invalid time {s:?}: give 0 to 60s"));
    }
    Ok(Duration::from_nanos(ns as u64))
}

#[derive(clap::Args)]
struct TopArgs {
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    run: Run,
    /// How often the view is refreshed: the length of "last interval".
    #[arg(short = 'i', long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    interval: Duration,
    /// Show only this thread at first (Tab cycles threads).
    #[arg(long, value_name = "TID", conflicts_with = "thread")]
    tid: Option<u32>,
    /// Show only the thread of this name at first (once it is seen).
    #[arg(long, value_name = "NAME")]
    thread: Option<String>,
    /// Rows per table without a terminal.
    #[arg(long, default_value_t = 20, value_name = "N")]
    rows: usize,
}

/// `record`'s options for `top` (the same sampling; top's own options apart).
fn top_options(a: TopArgs) -> Result<(record::Options, record::live::TopOptions)> {
    let opts = a.run.options(a.sampling)?;
    let top = record::live::TopOptions {
        interval: a.interval,
        tid: a.tid,
        thread: a.thread,
        rows: a.rows,
    };
    Ok((opts, top))
}

/// `--function` / `--nolineno`.
fn lines(function: bool, nolineno: bool) -> report::Lines {
    if function {
        report::Lines::Function
    } else if nolineno {
        report::Lines::None
    } else {
        report::Lines::Current
    }
}

/// One of -p, -a or a command.
fn one_target(pids: &[i32], command: &[String], all: bool) -> Result<()> {
    let modes = [!pids.is_empty(), !command.is_empty(), all];
    match modes.iter().filter(|m| **m).count() {
        0 => bail!("nothing to profile: give -p PID, -a (whole machine) or a command after --"),
        1 => Ok(()),
        _ => bail!("give one of -p PID, -a or a command after --, not several"),
    }
}

#[derive(clap::Args)]
#[command(after_help = "Without -p, the agent profiles every process (-a).")]
struct AgentArgs {
    #[command(flatten)]
    sampling: Sampling,
    /// How often a profile is exported: each holds the samples of its interval.
    #[arg(long, default_value = "10s", value_parser = parse_interval, value_name = "DURATION")]
    interval: Duration,
    /// The Collector's OTLP/HTTP address, e.g. http://collector:4318. Default: from
    /// OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, else
    /// http://localhost:4318 (headers, timeout, compression, certificate: the
    /// OTEL_EXPORTER_OTLP_* variables). Not checked at start: an absent Collector is retried.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Also profile the time threads spend off the CPU (as record --off-cpu): each process
    /// gets an off_cpu profile beside its cpu one, each wait (ended in the interval) with its
    /// stack and kind. --idle is py-spy's name for it.
    #[arg(long, visible_alias = "idle")]
    off_cpu: bool,
    /// With --off-cpu: waits shorter than this are counted per thread, not stacked (e.g. 1ms,
    /// 500us, 0 for all).
    #[arg(long, value_name = "TIME", default_value = "1ms", value_parser = parse_min_block, requires = "off_cpu")]
    min_block: Duration,
}

/// `--interval`: a duration of at least one second.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("interval '{s}' is too short: give 1s or more"));
    }
    Ok(d)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let err = || format!("invalid duration '{s}': use e.g. 30, 30s, 500ms, 2m or 1h");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "sec" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    if secs.is_nan() || secs <= 0.0 || !secs.is_finite() || secs > 366.0 * 86400.0 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid rate '{s}': give samples per second between 1 and 100000 (e.g. 100)"
        )),
    }
}

fn main() {
    // SIGPIPE stays ignored (Rust's default): a closed stderr or stdout must not kill perfpy
    // before it has written the profile and turned off what it turned on. Lines are written
    // with `say!`/`out!`, which ignore such errors.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            say!("perfpy: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Info { pids, json } => info::run(&pids, json),
        Cmd::Replay { dir, format } => {
            record::replay::run(&dir, format, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        Cmd::Dump {
            pids,
            all,
            json,
            locals,
        } => dump::run(&pids, all, json, locals),
        Cmd::Inject {
            pid,
            deactivate,
            force,
            status,
        } => inject(pid, deactivate, force, status),
        Cmd::Top(a) => {
            let (opts, top) = top_options(a)?;
            let stop = signals::install()?;
            record::live::run(opts, top, stop)?;
            Ok(0)
        }
        Cmd::Agent(a) => agent(a),
        Cmd::Record(a) => record(a),
    }
}

/// `perfpy inject`: turn a process's perf trampoline on or off, or say whether it is on.
fn inject(pid: i32, deactivate: bool, force: bool, status: bool) -> Result<i32> {
    let t = Duration::from_secs(10);
    targets::check_pid(pid)?;
    let p = perfpy_inject::discover(pid)?;
    perfpy_inject::check_injectable(&p)?;
    if status {
        let on = perfpy_inject::trampoline_active(&p, t)?;
        out!(
            "pid {pid}: perf trampoline {} (CPython {}){}",
            if on { "on" } else { "off" },
            p.version,
            if on {
                format!("; turn it off with: perfpy inject -p {pid} --deactivate")
            } else {
                String::new()
            }
        );
    } else if deactivate {
        let (users, _) = perfpy_inject::sessions::users(pid, p.start_time);
        if !users.is_empty() && !force {
            let list: Vec<String> = users.iter().map(|u| u.to_string()).collect();
            bail!(
                "pid {pid}: {} perfpy session{} (pid {}) still use{} its perf trampoline; the last one turns it off when it ends. Turn it off now anyway with --force (those sessions then lose Python names)",
                users.len(),
                if users.len() > 1 { "s" } else { "" },
                list.join(", "),
                if users.len() > 1 { "" } else { "s" }
            );
        }
        perfpy_inject::deactivate(&p, t)?;
        perfpy_inject::sessions::clear_mark(pid, p.start_time);
        out!("pid {pid}: perf trampoline off (CPython {})", p.version);
    } else {
        match perfpy_inject::activate(&p, t)? {
            perfpy_inject::ActivateOutcome::Activated => out!(
                "pid {pid}: perf trampoline on (CPython {}); turn it off with: perfpy inject -p {pid} --deactivate",
                p.version
            ),
            perfpy_inject::ActivateOutcome::AlreadyActive => {
                out!("pid {pid}: perf trampoline was already on (CPython {})", p.version)
            }
        }
    }
    Ok(0)
}

/// `perfpy agent`: sample until stopped, exporting every interval.
fn agent(a: AgentArgs) -> Result<i32> {
    if a.sampling.all && !a.sampling.pids.is_empty() {
        bail!("give -p PID or -a, not both (without -p the agent profiles every process)");
    }
    let stop = signals::install()?;
    let otlp = output::otlp_export::Config::resolve(a.otlp_endpoint.as_deref(), &|k| {
        std::env::var(k).ok()
    })?;
    let mut record = a.sampling.options();
    record.all = record.pids.is_empty();
    record.off_cpu = a.off_cpu.then_some(a.min_block.as_nanos() as u64);
    agent::run(
        agent::Options {
            record,
            interval: a.interval,
            otlp,
        },
        stop,
    )
}

/// `perfpy record`.
fn record(a: RecordArgs) -> Result<i32> {
    let opts = a.run.options(a.sampling)?;
    if !a.off_cpu
        && matches!(
            a.sample,
            Some(report::SampleView::OffCpu | report::SampleView::Wall)
        )
    {
        bail!("--sample off-cpu and --sample wall need --off-cpu");
    }
    let otlp = a
        .otlp_endpoint
        .map(|e| output::otlp_export::Config::resolve(Some(&e), &|k| std::env::var(k).ok()))
        .transpose()?;
    let stop = signals::install()?;
    let outcome = record::run(
        record::Options {
            stack_size: a.stack_size,
            max_frames: a.max_frames,
            max_python_frames: a.max_python_frames,
            keep_interpreter: a.keep_interpreter_frames,
            python_perf_env: match (a.python_perf_env, a.no_python_perf_env) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            otlp,
            off_cpu: a.off_cpu.then_some(a.min_block.as_nanos() as u64),
            sample: a.sample,
            ..opts
        },
        stop,
    )?;
    tracing::debug!(child_status = ?outcome.child_status, "recording done");
    Ok(0)
}

/// The format an output file's name asks for: users write `-o flame.svg` and expect an SVG.
fn format_from_extension(path: Option<&std::path::Path>) -> Format {
    match path.and_then(|p| p.extension()).and_then(|e| e.to_str()) {
        Some("svg") => Format::Flamegraph,
        Some("txt" | "folded" | "collapsed") => Format::Collapsed,
        Some("json") => Format::Speedscope,
        _ => Format::Pprof,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "0", "-1", "abc", "10x", "1e99", "NaN"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100").unwrap(), 100);
        for bad in ["0", "-5", "1000001", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_accepts_perf_spelling() {
        let c =
            Cli::try_parse_from(["perfpy", "record", "-F", "1000", "-p", "1", "-p", "2"]).unwrap();
        let Cmd::Record(a) = c.cmd else { panic!() };
        assert_eq!(a.sampling.rate, 1000);
        assert_eq!(a.sampling.pids, vec![1, 2]);
        let c = Cli::try_parse_from([
            "perfpy", "record", "--freq", "99", "--", "python3", "-c", "pass",
        ])
        .unwrap();
        let Cmd::Record(a) = c.cmd else { panic!() };
        assert_eq!(a.sampling.rate, 99);
        assert_eq!(a.run.command, vec!["python3", "-c", "pass"]);
    }
}
