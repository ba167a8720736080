//! Threads and processes that live less than a sampling period are sampled in proportion to
//! their CPU time (-p and launched commands sample every CPU; the eBPF program keeps the
//! targets' samples): a thread-per-request server, a program forking short-lived children.
//! What the samples represent is checked against the CPU time the kernel accounted.

use perfpy_test_support as common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The server's rate: 2.5 ms between samples, longer than the CPU time of one request's thread
/// (~2 ms with its start and end): per-thread periods would miss most of them.
const RATE: &str = "400";
/// The forking workload's: 10 ms, longer than one child's ~5 … 6 ms.
const FORK_RATE: &str = "100";

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime (+ cutime + cstime with `children`) of `pid`, in seconds.
fn cpu_of(pid: i32, children: bool) -> f64 {
    let s = perfpy_process::proc::stat(pid as u32).unwrap();
    let n = |v: Option<u64>| v.unwrap_or(0) as f64;
    let t = n(s.utime)
        + n(s.stime)
        + if children {
            n(s.cutime) + n(s.cstime)
        } else {
            0.0
        };
    t / clk_tck()
}

/// perfpy started in the background; `wait_sampling` returns once it says it samples.
struct Recording {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Vec<String>,
}

impl Recording {
    fn start(args: &[&str]) -> Recording {
        let mut child = Command::new(perfpy())
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("perfpy");
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut r = Recording {
            child,
            lines,
            stderr: Vec::new(),
        };
        loop {
            let l = r
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("perfpy did not start sampling");
            let go = l.starts_with("perfpy: sampling");
            r.stderr.push(l);
            if go {
                break;
            }
        }
        r
    }

    /// Waits for the end; returns everything perfpy wrote on stderr.
    fn finish(mut self) -> String {
        let st = wait_exit(&mut self.child, Duration::from_secs(60)).expect("perfpy ended");
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push(l);
        }
        let all = self.stderr.join("\n");
        eprintln!("perfpy -> {st:?}\n{all}");
        assert!(st.success());
        all
    }
}

/// Seconds of CPU the samples represent.
fn sampled(d: &Decoded) -> f64 {
    d.total() as f64 * d.profile.period as f64 / 1e9
}

/// perfpy's own coverage figure ("samples cover N% of …").
fn said_coverage(stderr: &str) -> f64 {
    let l = stderr
        .lines()
        .find(|l| l.contains("samples cover"))
        .expect("a coverage line");
    let pct = l.split("cover ").nth(1).unwrap().split('%').next().unwrap();
    pct.trim().parse().unwrap()
}

/// perfpy's coverage figure within 10% of 100%, or three standard errors of `samples` (see
/// [`assert_close`]).
fn assert_said(said: f64, samples: i64) {
    let tolerance = 100.0 * (3.0 / (samples.max(1) as f64).sqrt()).max(0.10);
    assert!(
        (said - 100.0).abs() <= tolerance,
        "perfpy said {said}% of {samples} samples (want 100 ± {tolerance:.0})"
    );
}

/// `sampled` within `tolerance` of `kernel`, or within three standard errors of a count of
/// `samples` where the machine is so busy that samples fall on the targets at random (other
/// processes share the CPUs: each sample is then a coin toss, ~1/sqrt(n) relative error).
fn assert_close(what: &str, sampled: f64, kernel: f64, tolerance: f64, samples: i64) {
    let tolerance = tolerance.max(3.0 / (samples.max(1) as f64).sqrt());
    let ratio = sampled / kernel;
    eprintln!(
        "{what}: samples represent {sampled:.3} s, the kernel accounted {kernel:.3} s ({:.1}%)",
        100.0 * ratio
    );
    assert!(
        (ratio - 1.0).abs() <= tolerance,
        "{what}: samples represent {sampled:.3} s of CPU, the kernel accounted {kernel:.3} s ({:.0}%), want within {:.0}%",
        100.0 * ratio,
        100.0 * tolerance
    );
}

#[test]
fn thread_per_request_server_attached_with_p() {
    let Some(py) = python("3.12") else { return };
    let script = testdata("http_server.py");
    let portfile = tmp("http.port");
    let _ = std::fs::remove_file(&portfile);
    let server = Workload::start(Command::new(&py).arg(&script).arg("serve").arg(&portfile));
    let port = std::fs::read_to_string(&portfile).unwrap();
    let out = tmp("http.pb.gz");
    let before = cpu_of(server.pid(), false);
    let rec = Recording::start(&[
        "record",
        "-p",
        &server.pid().to_string(),
        "-d",
        "5",
        "-r",
        RATE,
        "-o",
        out.to_str().unwrap(),
    ]);
    // Bounded load, over before the recording ends: the server is idle outside it.
    let load = Command::new(&py)
        .arg(&script)
        .args(["load", port.trim(), "4000", "3.5"])
        .output()
        .unwrap();
    assert!(load.status.success());
    eprintln!("client: {}", String::from_utf8_lossy(&load.stdout).trim());
    let stderr = rec.finish();
    let kernel = cpu_of(server.pid(), false) - before;
    assert!(kernel > 0.5, "the server used {kernel:.2} s of CPU only");
    let d = decode(&out);
    assert_close(
        "thread-per-request server",
        sampled(&d),
        kernel,
        0.10,
        d.total(),
    );
    let said = said_coverage(&stderr);
    assert_said(said, d.total());

    // The request handler, named to the line.
    let handler = d.count_where(|s| s.has("Handler.do_GET"));
    let share = handler as f64 / d.total() as f64;
    eprintln!("{handler} of {} samples under Handler.do_GET", d.total());
    assert!(
        share >= 0.70,
        "{:.0}% of the samples under the handler, want >= 70%",
        100.0 * share
    );
    let call_line = line_of("http_server.py", "render(25000)");
    let loop_first = line_of("http_server.py", "for i in range(n):");
    let in_render = d.count_where(|s| {
        let f: Vec<&Frame> = s.frames.iter().collect();
        let r = f.iter().position(|x| x.function == "render");
        let h = f.iter().position(|x| x.function == "Handler.do_GET");
        matches!((r, h), (Some(r), Some(h)) if r < h
            && f[h].line == call_line
            && (loop_first..=loop_first + 1).contains(&f[r].line)
            && f[r].file.ends_with("http_server.py"))
    });
    assert!(
        in_render as f64 >= 0.5 * handler as f64,
        "{in_render} of {handler} handler samples in render's loop (line {loop_first}) called from do_GET line {call_line}"
    );
    check_go_pprof(&out);
}

/// The share of `child_work` the workload measured: (its CPU time, the whole's).
fn measured(report: &std::path::Path) -> (f64, f64, u64) {
    let text = std::fs::read_to_string(report).expect("forking.py report");
    let get = |k: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
            .unwrap()
    };
    (get("child_work "), get("total "), get("children ") as u64)
}

fn check_children_share(d: &Decoded, expected: f64) {
    let child = d.count_where(|s| s.has("child_work")) as f64 / d.total() as f64;
    eprintln!(
        "child_work: {:.1}% of the samples, {:.1}% measured",
        100.0 * child,
        100.0 * expected
    );
    // ±8 points, or three standard errors of a share of this many samples where the machine
    // was so busy that the workload got few samples' worth of CPU.
    let n = d.total() as f64;
    let tolerance = share_tolerance(expected, n, 0.08);
    assert!(
        (child - expected).abs() <= tolerance,
        "child_work in {:.1}% of {n} samples, the workload measured {:.1}% (±{:.1} points)",
        100.0 * child,
        100.0 * expected,
        100.0 * tolerance
    );
    // Named as Python code, in its file.
    assert!(d.samples.iter().any(|s| s
        .frames
        .iter()
        .any(|f| f.function == "child_work" && f.file.ends_with("forking.py"))));
}

#[test]
fn short_lived_children_launched() {
    let Some(py) = python("3.12") else { return };
    let report = tmp("fork-launched.report");
    let out = tmp("fork-launched.pb.gz");
    let o = Record::to(&out)
        .args(["-r", FORK_RATE])
        .command([
            py.to_str().unwrap(),
            testdata("forking.py").to_str().unwrap(),
            "5",
            report.to_str().unwrap(),
        ])
        .run();
    assert!(o.status.success());
    let (child_work, total, n) = measured(&report);
    assert!(n >= 50, "only {n} children");
    let d = decode(&out);
    assert_close("launched, forking", sampled(&d), total, 0.10, d.total());
    let said = said_coverage(&String::from_utf8_lossy(&o.stderr));
    assert_said(said, d.total());
    check_children_share(&d, child_work / total);
}

#[test]
fn short_lived_children_attached_with_subprocesses() {
    let Some(py) = python("3.12") else { return };
    // Without --subprocesses the children are not profiled, and the summary says so.
    let w = Workload::start(Command::new(&py).arg(testdata("forking.py")).arg("30"));
    let pid = w.pid().to_string();
    let out = tmp("fork-attached-parent.pb.gz");
    let o = Record::to(&out)
        .args(["-p", &pid])
        .duration("2")
        .args(["-r", FORK_RATE])
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    assert_eq!(
        d.count_where(|s| s.has("child_work")),
        0,
        "children profiled without --subprocesses"
    );
    assert!(d.count_where(|s| s.has("parent_work")) > 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("add --subprocesses"));
    drop(w);

    // The workload starts forking once perfpy samples, and exits after 5 s: its report has
    // the CPU the kernel accounted to it and its children over that time.
    let report = tmp("fork-attached.report");
    let mut w = Workload::start(
        Command::new(&py)
            .arg(testdata("forking.py"))
            .arg("5")
            .arg(&report)
            .arg("--on-stdin")
            .stdin(Stdio::piped()),
    );
    let pid = w.pid().to_string();
    let out = tmp("fork-attached.pb.gz");
    let rec = Recording::start(&[
        "record",
        "-p",
        &pid,
        "--subprocesses",
        "-d",
        "20",
        "-r",
        FORK_RATE,
        "-o",
        out.to_str().unwrap(),
    ]);
    use std::io::Write;
    w.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let stderr = rec.finish();
    assert!(stderr.contains("target exited"));
    let st = wait_exit(&mut w.child, Duration::from_secs(30)).expect("workload ends");
    assert!(st.success());
    let (child_work, total, n) = measured(&report);
    assert!(n >= 50, "only {n} children");
    let d = decode(&out);
    assert_close(
        "attached --subprocesses, forking",
        sampled(&d),
        total,
        0.10,
        d.total(),
    );
    let said = said_coverage(&stderr);
    assert_said(said, d.total());
    check_children_share(&d, child_work / total);
}

#[test]
fn short_lived_children_in_a_pid_namespace() {
    // perfpy in a private PID namespace: pids as it sees them, children followed there too.
    let Some(py) = python("3.12") else { return };
    let report = tmp("fork-ns.report");
    let out = tmp("fork-ns.pb.gz");
    let o = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(perfpy())
        .args(["record", "-r", FORK_RATE, "-o", out.to_str().unwrap(), "--"])
        .arg(&py)
        .arg(testdata("forking.py"))
        .arg("5")
        .arg(&report)
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("{stderr}");
    assert!(o.status.success());
    let (child_work, total, _) = measured(&report);
    let d = decode(&out);
    assert_close(
        "launched in a PID namespace, forking",
        sampled(&d),
        total,
        0.10,
        d.total(),
    );
    check_children_share(&d, child_work / total);
}

/// A target that waits for its children and exits while perfpy, attached with --subprocesses,
/// still records: the CPU its children used is in the coverage figure although the target,
/// which held it once they were reaped, is gone (2.4 s of CPU in all, 1.8 s of it children's).
#[test]
fn coverage_of_a_target_that_exits_after_its_children() {
    let Some(py) = python("3.12") else { return };
    let mut w = Workload::start(
        Command::new(&py)
            .arg(testdata("family.py"))
            .stdin(Stdio::piped()),
    );
    let pid = w.pid().to_string();
    let mut stdin = w.child.stdin.take().unwrap();
    let out = tmp("family.pb.gz");
    let _ = std::fs::remove_file(&out);
    // The family starts working once perfpy says it samples.
    let rec = Recording::start(&[
        "record",
        "-p",
        &pid,
        "--subprocesses",
        "-d",
        "60",
        "-o",
        out.to_str().unwrap(),
    ]);
    use std::io::Write;
    writeln!(stdin, "go").unwrap();
    let stderr = rec.finish();
    let d = decode(&out);
    for f in ["parent_work", "forked_work", "child_work"] {
        assert!(d.count_where(|s| s.has(f)) > 0, "no sample of {f}");
    }
    assert_said(said_coverage(&stderr), d.total());
}
