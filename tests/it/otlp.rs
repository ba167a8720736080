//! `perfpy record --otlp-endpoint` against a real OpenTelemetry Collector (built by
//! scripts/deps.sh from Debian's packaged source): what arrives, what the Collector printed
//! (debug exporter, detailed) and what it forwarded (its OTLP/HTTP exporter, to a sink of the
//! test: the debug exporter does not print which stack a sample has); a Collector that is down,
//! killed or stalled.

use perfpy_test_support as common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::otelcol::{free_port, Collector, Printed, Sink};
use common::*;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost14::Message;

const PARTS: [(&str, f64); 4] = [
    ("hot_function", 0.40),
    ("Shape.area", 0.20),
    ("make_closure.<locals>.inner", 0.20),
    ("hash_work", 0.20),
];

/// Per resource (its `process.pid`): the CPU samples as (function names leaf first, value).
fn stacks(req: &ExportProfilesServiceRequest) -> HashMap<i64, Vec<(Vec<String>, i64)>> {
    of_type(req, "cpu")
        .into_iter()
        .map(|(pid, s)| {
            let s = s.into_iter().map(|x| (x.names, x.value)).collect();
            (pid, s)
        })
        .collect()
}

/// A sample as a test reads it: function names and lines (leaf first), its value, its
/// attributes as text.
#[derive(Debug)]
struct Read {
    names: Vec<String>,
    lines: Vec<(String, i64)>,
    value: i64,
    attrs: HashMap<String, String>,
}

/// Per resource (its `process.pid`): the samples of its profiles of sample type `ty`
/// (`cpu`, `off_cpu`; unit nanoseconds); every profile is of one of these types.
fn of_type(req: &ExportProfilesServiceRequest, ty: &str) -> HashMap<i64, Vec<Read>> {
    let d = req.dictionary.as_ref().expect("dictionary");
    let s = |i: i32| d.string_table[i as usize].clone();
    let mut out: HashMap<i64, Vec<Read>> = HashMap::new();
    for rp in &req.resource_profiles {
        let pid = rp
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "process.pid"))
            .and_then(|a| match a.value.clone()?.value? {
                any_value::Value::IntValue(v) => Some(v),
                _ => None,
            })
            .expect("process.pid");
        for p in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
            let st = p.sample_type.unwrap();
            let (t, unit) = (s(st.type_strindex), s(st.unit_strindex));
            assert!(
                (t == "cpu" || t == "off_cpu") && unit == "nanoseconds",
                "sample type {t}/{unit}"
            );
            if t != ty {
                continue;
            }
            for smp in &p.samples {
                let lines: Vec<(String, i64)> = d.stack_table[smp.stack_index as usize]
                    .location_indices
                    .iter()
                    .flat_map(|l| &d.location_table[*l as usize].lines)
                    .map(|ln| {
                        let f = &d.function_table[ln.function_index as usize];
                        (s(f.name_strindex), ln.line)
                    })
                    .collect();
                let attrs = smp
                    .attribute_indices
                    .iter()
                    .map(|i| &d.attribute_table[*i as usize])
                    .map(|a| {
                        let v = match a.value.clone().and_then(|v| v.value) {
                            Some(any_value::Value::StringValue(v)) => v,
                            Some(any_value::Value::IntValue(v)) => v.to_string(),
                            other => format!("{other:?}"),
                        };
                        (s(a.key_strindex), v)
                    })
                    .collect();
                out.entry(pid).or_default().push(Read {
                    names: lines.iter().map(|(n, _)| n.clone()).collect(),
                    lines,
                    value: smp.values[0],
                    attrs,
                });
            }
        }
    }
    out
}

/// perfpy with its stderr read line by line (to wait for "sampling").
fn spawn_perfpy(args: &[&str], env: &[(&str, &str)]) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(perfpy());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run perfpy");
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("perfpy: {l}");
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> bool {
    wait_said(rx, &mut Vec::new(), needle, limit)
}

fn rest(rx: &mpsc::Receiver<String>) -> String {
    rx.try_iter().collect::<Vec<_>>().join("\n")
}

fn split_workload(name: &str) -> Option<(Workload, std::path::PathBuf)> {
    let py = python("3.12")?;
    let rep = split_report(name);
    let w = Workload::start(
        Command::new(py)
            .arg(testdata("split.py"))
            .arg("60")
            .env("SPLIT_REPORT", &rep)
            .env("OTEL_SERVICE_NAME", "checkout-test"),
    );
    Some((w, rep))
}

#[test]
fn record_exports_the_profile_to_a_real_collector() {
    let sink = Sink::start();
    let Some(col) = Collector::start(Some(&sink.url), true) else {
        return;
    };
    let Some((w, rep)) = split_workload("otlp-record") else {
        return;
    };
    let out = tmp("otlp-record.pb.gz");
    let pid = w.pid().to_string();
    let url = col.url();
    let o = run_perfpy(&[
        "record",
        "-p",
        &pid,
        "-d",
        "5",
        "-r",
        "500",
        "-o",
        out.to_str().unwrap(),
        "--otlp-endpoint",
        &url,
    ]);
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!(
            "sent 1 profile (OTLP) to {url}/v1development/profiles"
        )),
        "{stderr}"
    );
    // The file is written as well.
    let file = decode(&out);
    assert!(file.total() > 300);

    check_printed(&col, &pid, &file);
    let samples = forwarded_with_the_split(&sink, w.pid() as i64, &rep);
    let total = |f: &dyn Fn(&Vec<String>) -> bool| -> i64 {
        samples.iter().filter(|(n, _)| f(n)).map(|(_, v)| v).sum()
    };
    // Compressed (OTEL_EXPORTER_OTLP_COMPRESSION=gzip), as the Collector takes it too.
    let o = run_perfpy_env(
        &[
            "record",
            "-p",
            &pid,
            "-d",
            "1",
            "-o",
            out.to_str().unwrap(),
            "--otlp-endpoint",
            &url,
        ],
        &[(
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            std::path::Path::new("gzip"),
        )],
    );
    assert!(o.status.success());
    assert!(
        sink.wait(2, Duration::from_secs(10)),
        "the gzip'd export did not arrive"
    );
    assert_eq!(col.output().matches("ResourceProfiles #0").count(), 2);
    // The chain below the hot function is whole.
    let chain = ["spin", "hot_function", "round_"];
    let spin = total(&|n| n.first().is_some_and(|x| x == "spin"));
    let whole =
        total(&|n| n.first().is_some_and(|x| x == "spin") && n.windows(3).any(|w| w == chain));
    assert!(whole as f64 >= 0.9 * spin as f64, "{whole} of {spin}");
}

/// The resource attributes of split.py's process (`pid`, run with OTEL_SERVICE_NAME set) as the
/// Collector printed them.
fn check_resource(resource: &[(String, String)], pid: &str, what: &str) {
    let res: HashMap<&str, &str> = resource
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for (k, v) in [
        ("service.name", "Str(checkout-test)".to_string()),
        ("process.pid", format!("Int({pid})")),
        ("process.executable.name", "Str(python3.12)".into()),
        ("process.runtime.name", "Str(CPython)".into()),
        ("host.name", format!("Str({})", host.trim())),
    ] {
        assert_eq!(
            res.get(k).copied(),
            Some(v.as_str()),
            "{what}: resource attribute {k}: {res:?}"
        );
    }
    assert!(
        res["process.runtime.version"].starts_with("Str(3.12."),
        "{what}: {res:?}"
    );
}

/// What the Collector printed for `record --otlp-endpoint` of split.py (`pid`): one resource with
/// its attributes, Python frames with files and lines, the C extension's native frames, and the
/// file's CPU time in all.
fn check_printed(col: &Collector, pid: &str, file: &Decoded) {
    assert!(
        col.wait_for("ResourceProfiles #0", Duration::from_secs(10)),
        "{}",
        col.output()
    );
    let printed = Printed::parse(&col.output());
    assert_eq!(printed.resources.len(), 1, "one process, one resource");
    check_resource(&printed.resources[0], pid, "record");
    // Python frames carry their file and the lines that ran.
    for (f, needle) in [
        ("spin", "s += i * i % 7"),
        ("Shape.area", "s += i * i % 7"),
        ("hash_work", "h.update(DATA)"),
    ] {
        let (file, lines) = printed
            .function(f)
            .unwrap_or_else(|| panic!("function {f} not printed"));
        assert!(file.ends_with("testdata/split.py"), "{f}: file {file}");
        assert!(
            !lines.is_empty() && lines.iter().all(|l| *l > 0),
            "{f}: lines {lines:?}"
        );
        if f != "Shape.area" {
            assert!(
                lines.contains(&line_of("split.py", needle)),
                "{f}: lines {lines:?}"
            );
        }
    }
    // Native frames of the C extension, named.
    assert!(
        printed.functions.iter().any(|(n, _)| n.contains("SHA256")),
        "no SHA256 function printed"
    );
    // Every sample's CPU time: the printed values add up to the file's.
    let file_ns: i64 = file.samples.iter().map(|s| s.nanos).sum();
    assert_eq!(printed.sample_values.iter().sum::<i64>(), file_ns);
}

/// What the Collector forwarded (the first request): `pid`'s stacks, whose split is the one the
/// workload measured (its report `rep`) within ±5 points.
fn forwarded_with_the_split(
    sink: &Sink,
    pid: i64,
    rep: &std::path::Path,
) -> Vec<(Vec<String>, i64)> {
    assert!(
        sink.wait(1, Duration::from_secs(10)),
        "the Collector forwarded nothing"
    );
    let got = sink.received.lock().unwrap();
    assert_eq!(got[0].path, "/v1development/profiles");
    let req = ExportProfilesServiceRequest::decode(&got[0].body[..]).expect("OTLP protobuf");
    let mut by_pid = stacks(&req);
    let samples = by_pid.remove(&pid).unwrap_or_default();
    let total = |f: &dyn Fn(&Vec<String>) -> bool| -> i64 {
        samples.iter().filter(|(n, _)| f(n)).map(|(_, v)| v).sum()
    };
    let rounds = total(&|n| n.iter().any(|x| x == "round_"));
    assert!(rounds > 0);
    let measured = measured_split(rep);
    for (f, nominal) in PARTS {
        let want = measured[f];
        assert!(
            (want - nominal).abs() < 0.15,
            "the workload's own split is off: {f} {want}"
        );
        let share = total(&|n| n.iter().any(|x| x == f)) as f64 / rounds as f64;
        eprintln!(
            "OTLP: {f}: {:.1}% (want {:.0}%)",
            share * 100.0,
            want * 100.0
        );
        assert!(
            (share - want).abs() <= 0.05,
            "{f}: {:.1}% of the CPU, want {:.0}% ± 5",
            share * 100.0,
            want * 100.0
        );
    }
    samples
}

#[test]
fn collector_down_or_without_profiles_fails_before_sampling() {
    let Some((w, _)) = split_workload("otlp-down") else {
        return;
    };
    let pid = w.pid().to_string();
    // Nothing listens.
    let out = tmp("otlp-down.pb.gz");
    let url = format!("http://127.0.0.1:{}", free_port());
    let t = Instant::now();
    let o = run_perfpy(&[
        "record",
        "-p",
        &pid,
        "-d",
        "5",
        "-o",
        out.to_str().unwrap(),
        "--otlp-endpoint",
        &url,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!(
            "OTLP endpoint {url}/v1development/profiles does not answer: cannot connect"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("sampling"), "sampled anyway: {stderr}");
    assert!(!out.exists(), "a file was written");
    // A Collector without a profiles pipeline: 404, and the message says what to configure.
    let Some(col) = Collector::start(None, false) else {
        return;
    };
    let o = run_perfpy(&[
        "record",
        "-p",
        &pid,
        "-d",
        "5",
        "-o",
        out.to_str().unwrap(),
        "--otlp-endpoint",
        &col.url(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("HTTP 404") && stderr.contains("service.profilesSupport"),
        "{stderr}"
    );
    assert!(!stderr.contains("sampling"));
    // `--otlp-endpoint` without a URL: the SDKs' variable names it.
    let o = run_perfpy_env(
        &["record", "-p", &pid, "-d", "5", "--otlp-endpoint"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", std::path::Path::new(&url))],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!(
        "OTLP endpoint {url}/v1development/profiles does not answer"
    )));
    // Not even the address of a URL.
    let o = run_perfpy(&[
        "record",
        "-p",
        &pid,
        "-d",
        "1",
        "--otlp-endpoint",
        "collector:4318",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not an http:// or https:// URL"));
}

/// The Collector killed, or stopped (it then takes the connection and never answers), while
/// perfpy records: the export is retried, then reported as dropped; perfpy ends within its bound
/// and the file is written.
#[test]
fn collector_killed_or_stalled_mid_recording_retries_then_reports_the_drop() {
    let Some((w, _)) = split_workload("otlp-killed") else {
        return;
    };
    let pid = w.pid().to_string();
    for stall in [false, true] {
        let Some(mut col) = Collector::start(None, true) else {
            return;
        };
        let out = tmp(&format!("otlp-killed-{stall}.pb.gz"));
        let url = col.url();
        let t = Instant::now();
        let (mut child, rx) = spawn_perfpy(
            &[
                "record",
                "-p",
                &pid,
                "-d",
                "2",
                "-o",
                out.to_str().unwrap(),
                "--otlp-endpoint",
                &url,
            ],
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")],
        );
        assert!(
            wait_line(&rx, "sampling pid", Duration::from_secs(20)),
            "perfpy did not start sampling"
        );
        if stall {
            col.signal(libc::SIGSTOP);
        } else {
            col.kill();
        }
        // 2 s of sampling, naming, then at most 15 s of retries (each attempt 2 s at most).
        let status = wait_exit(&mut child, Duration::from_secs(40));
        let elapsed = t.elapsed();
        let Some(status) = status else {
            let _ = child.kill();
            panic!(
                "perfpy hung with the Collector {}",
                if stall { "stalled" } else { "killed" }
            );
        };
        std::thread::sleep(Duration::from_millis(100));
        let stderr = rest(&rx);
        eprintln!("stall={stall}: {elapsed:?}");
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
        assert!(
            stderr.contains(&format!(
                "OTLP export to {url}/v1development/profiles failed after"
            )) && stderr.contains("1 profile request dropped"),
            "{stderr}"
        );
        let why = if stall { "timed out" } else { "cannot connect" };
        assert!(stderr.contains(why), "{stderr}");
        assert!(decode(&out).total() > 0, "the file must be written");
    }
}

// ---- perfpy agent: an interval's profile per export, continuously -------------------------

/// A process's CPU time (user + system) so far, in nanoseconds.
fn cpu_ns(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // After the ')' come fields 3 (state) on: utime and stime are fields 14 and 15.
    let field = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(14) + field(15)) * 1_000_000_000 / hz
}

/// Waits for a line containing `needle`, keeping every line read in `said`.
fn wait_said(
    rx: &mpsc::Receiver<String>,
    said: &mut Vec<String>,
    needle: &str,
    limit: Duration,
) -> bool {
    if said.iter().any(|l| l.contains(needle)) {
        return true;
    }
    let t = Instant::now();
    while let Some(left) = limit.checked_sub(t.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                said.push(l);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// What the Collector printed, cut per export (each starts with the debug exporter's
/// "Profiles {...}" log line).
fn printed_exports(out: &str) -> Vec<Printed> {
    let mut chunks: Vec<String> = Vec::new();
    for line in out.lines() {
        if line.contains("\tProfiles\t") && line.contains("resource profiles") {
            chunks.push(String::new());
        } else if let Some(c) = chunks.last_mut() {
            c.push_str(line);
            c.push('\n');
        }
    }
    chunks.iter().map(|c| Printed::parse(c)).collect()
}

/// The profiles of a forwarded request: (start, duration, sum of values), nanoseconds.
fn spans(req: &ExportProfilesServiceRequest) -> Vec<(u64, u64, i64)> {
    req.resource_profiles
        .iter()
        .flat_map(|rp| &rp.scope_profiles)
        .flat_map(|sp| &sp.profiles)
        .map(|p| {
            (
                p.time_unix_nano,
                p.duration_nano,
                p.samples.iter().map(|s| s.values[0]).sum(),
            )
        })
        .collect()
}

/// `perfpy agent -p PID --interval I --otlp-endpoint URL [more]`, its stderr read line by line.
fn spawn_agent(
    pid: &str,
    interval: &str,
    url: &str,
    more: &[&str],
    env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>) {
    let mut args = vec![
        "agent",
        "-p",
        pid,
        "--interval",
        interval,
        "--otlp-endpoint",
        url,
    ];
    args.extend_from_slice(more);
    spawn_perfpy(&args, env)
}

/// SIGTERM to the agent, its exit (within 40 s, else killed: `None`) and its final line; returns
/// the exit code and every line it said.
fn stop_agent(
    mut child: Child,
    rx: &mpsc::Receiver<String>,
    mut said: Vec<String>,
) -> (Option<i32>, String) {
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(40));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    wait_said(rx, &mut said, "agent stopped", Duration::from_secs(5));
    (status.and_then(|s| s.code()), said.join("\n"))
}

/// The lines an agent said until it started sampling (30 s at most).
fn agent_started(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let mut said = Vec::new();
    assert!(
        wait_said(rx, &mut said, "agent sampling pid", Duration::from_secs(30)),
        "perfpy did not start: {said:?}"
    );
    said
}

/// From an agent's final line (stopped by SIGTERM): the exports it sent; none may be dropped.
fn sent_none_dropped(said: &str) -> usize {
    let stopped = said
        .lines()
        .find(|l| l.contains("agent stopped (interrupted) after "))
        .unwrap_or_else(|| panic!("no final line: {said}"));
    assert!(stopped.ends_with(", 0 dropped"), "{stopped}");
    stopped
        .split(": ")
        .nth(2)
        .and_then(|x| x.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stopped}"))
}

/// The issue's check: `perfpy agent -p PID --interval 2s` on the known split for ~10 s. At least
/// 4 exports arrive; each holds only its interval's samples; what the Collector printed has the
/// resource attributes and Python functions with files and lines; the split read from what it
/// forwarded agrees with the workload's own; SIGTERM: exit 0, the last interval exported.
#[test]
fn agent_exports_each_interval_to_a_real_collector() {
    let sink = Sink::start();
    let Some(col) = Collector::start(Some(&sink.url), true) else {
        return;
    };
    let Some((w, rep)) = split_workload("agent") else {
        return;
    };
    let pid = w.pid().to_string();
    let url = col.url();
    let cpu_before = cpu_ns(w.pid());
    let (child, rx) = spawn_agent(&pid, "2s", &url, &["-r", "250"], &[]);
    let said = agent_started(&rx);
    // Five intervals of 2 s (CPU time permitting: the workload is CPU-bound), then stop.
    let arrived = sink.wait(5, Duration::from_secs(90));
    // And until the workload has had 2 s of CPU (~500 samples): a busy machine gives it less
    // than a CPU, and the split needs samples, not seconds.
    let t = Instant::now();
    while cpu_ns(w.pid()) - cpu_before < 2_000_000_000 && t.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let at_stop = sink.received.lock().unwrap().len();
    let cpu_at_stop = cpu_ns(w.pid());
    let (code, said) = stop_agent(child, &rx, said);
    assert!(arrived, "fewer than 5 exports in 90 s: {said}");
    assert_eq!(code, Some(0), "{said}");
    // The last interval (cut short by SIGTERM) is exported too.
    let sent = sent_none_dropped(&said);
    assert!(sent > at_stop, "{sent} sent, {at_stop} before SIGTERM");
    assert!(
        sink.wait(sent, Duration::from_secs(10)),
        "the Collector forwarded fewer than the {sent} exports"
    );
    assert!(said.contains("perfpy: interval 1: "), "{said}");

    // What the Collector printed, export by export.
    let exports = printed_exports(&col.output());
    assert_eq!(exports.len(), sent, "exports printed by the Collector");
    for (i, printed) in exports.iter().enumerate() {
        assert_eq!(printed.resources.len(), 1, "export {i}: one process");
        check_resource(&printed.resources[0], &pid, &format!("export {i}"));
        // Every full interval runs every part of the workload (rounds of ~0.1 s).
        if i + 1 < exports.len() {
            let (file, lines) = printed
                .function("hot_function")
                .unwrap_or_else(|| panic!("export {i}: hot_function not printed"));
            assert!(file.ends_with("testdata/split.py"), "export {i}: {file}");
            assert!(
                lines.contains(&line_of("split.py", "return spin(n)")),
                "export {i}: hot_function lines {lines:?}"
            );
        }
    }

    check_forwarded_intervals(
        &sink,
        w.pid() as i64,
        (cpu_at_stop - cpu_before) as i64,
        &rep,
    );
}

/// What the Collector forwarded of the agent's intervals: each export holds its interval only
/// (together they account for the `used_ns` of CPU the workload used while sampled, not a
/// multiple of it), and `pid`'s split is the one it measured (its report `rep`).
fn check_forwarded_intervals(sink: &Sink, pid: i64, used_ns: i64, rep: &std::path::Path) {
    let got = sink.received.lock().unwrap();
    let reqs: Vec<ExportProfilesServiceRequest> = got
        .iter()
        .map(|r| ExportProfilesServiceRequest::decode(&r.body[..]).expect("OTLP protobuf"))
        .collect();
    let exported_ns: i64 = reqs.iter().flat_map(spans).map(|s| s.2).sum();
    let used = used_ns as f64;
    eprintln!(
        "agent: {} exports, {:.2} s of CPU exported, {:.2} s used by the workload",
        reqs.len(),
        exported_ns as f64 / 1e9,
        used / 1e9
    );
    assert!(
        (exported_ns as f64) < 1.1 * used + 0.3e9,
        "exports hold more CPU than was used: intervals overlap"
    );
    assert!(
        (exported_ns as f64) > 0.7 * used - 0.3e9,
        "exports miss CPU that was used"
    );
    let mut samples: Vec<(Vec<String>, i64)> = Vec::new();
    for r in &reqs {
        samples.extend(stacks(r).remove(&pid).unwrap_or_default());
    }
    let period = reqs[0].resource_profiles[0].scope_profiles[0].profiles[0].period as f64;
    let total = |f: &dyn Fn(&Vec<String>) -> bool| -> i64 {
        samples.iter().filter(|(n, _)| f(n)).map(|(_, v)| v).sum()
    };
    let rounds = total(&|n| n.iter().any(|x| x == "round_"));
    let n = rounds as f64 / period;
    assert!(n > 200.0, "{n} samples of round_");
    let measured = measured_split(rep);
    for (f, _) in PARTS {
        let want = measured[f];
        let share = total(&|n| n.iter().any(|x| x == f)) as f64 / rounds as f64;
        // ±5 points, or 3 standard errors where the samples are few (a busy machine).
        let tol = share_tolerance(want, n, 0.05);
        eprintln!(
            "agent: {f}: {:.1}% (want {:.1}% ± {:.1})",
            share * 100.0,
            want * 100.0,
            tol * 100.0
        );
        assert!(
            (share - want).abs() <= tol,
            "{f}: {:.1}%, want {:.1}% ± {:.1}",
            share * 100.0,
            want * 100.0,
            tol * 100.0
        );
    }
}

/// A Collector that is not there when the agent starts: not an error; the agent samples, says
/// its exports fail and why, and on SIGTERM exits 0 saying what it dropped.
#[test]
fn agent_without_a_collector_warns_and_retries() {
    let Some((w, _)) = split_workload("agent-nocol") else {
        return;
    };
    let pid = w.pid().to_string();
    let url = format!("http://127.0.0.1:{}", free_port());
    let (child, rx) = spawn_agent(
        &pid,
        "1s",
        &url,
        &[],
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")],
    );
    let mut said = Vec::new();
    let failing = wait_said(&rx, &mut said, "export failing", Duration::from_secs(30));
    let t = Instant::now();
    let (code, said) = stop_agent(child, &rx, said);
    assert!(failing, "{said}");
    assert_eq!(code, Some(0), "{said}");
    // Stopping waits for the queue a bounded while only.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let line = said.lines().find(|l| l.contains("export failing")).unwrap();
    assert!(
        line.contains("cannot connect") && line.contains("queued"),
        "{line}"
    );
    assert!(
        said.contains(&format!("exports sent to {url}/v1development/profiles"))
            && said.contains("agent stopped (interrupted) after "),
        "{said}"
    );
    let stopped = said.lines().find(|l| l.contains("agent stopped")).unwrap();
    assert!(
        stopped.contains(": 0 exports sent") && !stopped.contains(", 0 dropped"),
        "{stopped}"
    );
}

/// The issue's check: the Collector killed for 5 s and restarted during a run. The agent keeps
/// sampling, says its exports are waiting, and once the Collector is back the intervals of the
/// outage arrive (queued, not lost), then the later ones.
#[test]
fn agent_rides_out_a_collector_restart() {
    let sink = Sink::start();
    let Some(mut col) = Collector::start(Some(&sink.url), true) else {
        return;
    };
    let Some((w, _)) = split_workload("agent-restart") else {
        return;
    };
    let pid = w.pid().to_string();
    let url = col.url();
    let (child, rx) = spawn_agent(
        &pid,
        "1s",
        &url,
        &[],
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")],
    );
    let mut said = Vec::new();
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    assert!(
        sink.wait(2, Duration::from_secs(60)),
        "no exports before the restart"
    );
    col.kill();
    let killed = Instant::now();
    let down_ns = now_ns();
    let noticed = wait_said(&rx, &mut said, "export failing", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed()));
    let up_ns = now_ns();
    let Some(_col2) = Collector::start_at(col.port, Some(&sink.url), true) else {
        return;
    };
    let recovered = wait_said(&rx, &mut said, "export recovered", Duration::from_secs(60));
    let after = sink.received.lock().unwrap().len();
    let more = sink.wait(after + 2, Duration::from_secs(30));
    let (code, said) = stop_agent(child, &rx, said);
    assert!(noticed, "the failing exports were not said: {said}");
    assert!(recovered, "no recovery said: {said}");
    assert!(more, "exports after the restart did not go on arriving");
    assert_eq!(code, Some(0), "{said}");
    let failing = said.lines().find(|l| l.contains("export failing")).unwrap();
    assert!(
        failing.contains("queued") && failing.contains("cannot connect"),
        "{failing}"
    );
    // Nothing dropped: the outage's intervals were queued and sent after the restart.
    let stopped = said.lines().find(|l| l.contains("agent stopped")).unwrap();
    assert!(stopped.ends_with(", 0 dropped"), "{stopped}");
    let got = sink.received.lock().unwrap();
    let during: Vec<(u64, u64, i64)> = got
        .iter()
        .map(|r| ExportProfilesServiceRequest::decode(&r.body[..]).unwrap())
        .flat_map(|r| spans(&r))
        .filter(|(start, _, _)| *start >= down_ns && *start < up_ns)
        .collect();
    eprintln!("intervals sampled while the Collector was down: {during:?}");
    assert!(
        during.len() >= 3 && during.iter().all(|s| s.2 > 0),
        "intervals of the outage missing: {during:?}"
    );
}

/// `perfpy agent` with neither `-p` nor `-a`: the whole machine (here a private PID namespace),
/// every interval exported with each process as a resource, its Python functions named.
#[test]
fn agent_profiles_the_whole_machine_by_default() {
    let Some(col) = Collector::start(None, true) else {
        return;
    };
    let Some(py) = python("3.12") else {
        return;
    };
    let dir = tmp("agent-all");
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("stop"));
    // The agent gets SIGTERM once the test has seen 3 exports and made the file `stop` (60 s
    // at most).
    let script = format!(
        r#"cd {dir}
OTEL_SERVICE_NAME=ns-split {py} {split} 60 > w &
for i in $(seq 1 300); do grep -q ready w 2>/dev/null && break; sleep 0.1; done
{perfpy} agent --interval 1s --otlp-endpoint {url} &
agent=$!
for i in $(seq 1 600); do [ -e stop ] && break; sleep 0.1; done
kill -TERM $agent
wait $agent
echo "rc $?"
echo "pid $(awk '{{print $2}}' w | head -1)"
kill $(jobs -p) 2>/dev/null || true
wait || true
"#,
        dir = dir.display(),
        py = py.display(),
        split = testdata("split.py").display(),
        perfpy = perfpy().display(),
        url = col.url(),
    );
    let ns = std::thread::spawn(move || {
        output_within(
            Command::new("unshare").args([
                "--pid",
                "--fork",
                "--mount-proc",
                "bash",
                "-c",
                &script,
            ]),
            Duration::from_secs(120),
        )
    });
    let exported = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        col.output().matches("ResourceProfiles #0").count() >= 3
    });
    std::fs::write(dir.join("stop"), "").unwrap();
    let o = ns.join().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(exported, "fewer than 3 exports in 60 s");
    assert!(stdout.contains("rc 0"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("perfpy: agent sampling every process at 100 Hz"),
        "{stderr}"
    );
    let pid: i64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
        .expect("the workload's pid");
    assert!(col.wait_for("ResourceProfiles #0", Duration::from_secs(10)));
    let exports = printed_exports(&col.output());
    assert!(exports.len() >= 3, "{} exports", exports.len());
    // The workload is a resource of its own, its frames named, in every export but the first
    // (the walker learns of a process already running at its first samples) and the last (cut
    // short by SIGTERM). Naming runs on a thread of its own: the seconds the first interval of
    // a whole machine takes to name (kallsyms, every library; a debug build, a busy machine)
    // lose no samples; intervals it delays by more than one are dropped, not exported.
    let with_it = exports
        .iter()
        .filter(|p| {
            p.resources.iter().any(|r| {
                r.contains(&("process.pid".into(), format!("Int({pid})")))
                    && r.contains(&("service.name".into(), "Str(ns-split)".into()))
            }) && p.function("hot_function").is_some()
        })
        .count();
    assert!(
        with_it >= 2 && with_it + 2 >= exports.len(),
        "the workload in {with_it} of {} exports",
        exports.len()
    );
}

/// The run's wall time as the exports tell it: per request, the duration of `pid`'s profiles.
fn wall_of(reqs: &[ExportProfilesServiceRequest], pid: i64) -> u64 {
    reqs.iter()
        .filter_map(|r| {
            let rp = r.resource_profiles.iter().find(|rp| {
                rp.resource.as_ref().is_some_and(|res| {
                    res.attributes.iter().any(|a| {
                        a.key == "process.pid"
                            && a.value.clone().and_then(|v| v.value)
                                == Some(any_value::Value::IntValue(pid))
                    })
                })
            })?;
            Some(rp.scope_profiles[0].profiles[0].duration_nano)
        })
        .sum()
}

/// The sleeping thread of testdata/offcpu_threads.py in exported requests: its thread id (the
/// one whose off-CPU stacks hold `nap` at the sleep's line), its off-CPU time, the part of it
/// in `sleep` under that line, and its CPU time.
fn nap_thread(reqs: &[ExportProfilesServiceRequest], pid: i64) -> (String, i64, i64, i64) {
    let at = (
        "nap".to_string(),
        line_of("offcpu_threads.py", "line: nap-sleep"),
    );
    let off: Vec<Read> = reqs
        .iter()
        .flat_map(|r| of_type(r, "off_cpu").remove(&pid).unwrap_or_default())
        .collect();
    let tid = off
        .iter()
        .find(|s| s.lines.contains(&at))
        .map(|s| s.attrs["thread.id"].clone())
        .unwrap_or_else(|| panic!("no off-CPU stack through nap at line {}", at.1));
    let of_nap = |s: &&Read| s.attrs.get("thread.id") == Some(&tid);
    let total = off.iter().filter(of_nap).map(|s| s.value).sum();
    let sleep = off
        .iter()
        .filter(of_nap)
        .filter(|s| {
            s.lines.contains(&at) && s.attrs.get("thread.wait").map(String::as_str) == Some("sleep")
        })
        .map(|s| s.value)
        .sum();
    let cpu = reqs
        .iter()
        .flat_map(|r| of_type(r, "cpu").remove(&pid).unwrap_or_default())
        .filter(|s| s.attrs.get("thread.id") == Some(&tid))
        .map(|s| s.value)
        .sum();
    (tid, total, sleep, cpu)
}

/// The nap thread's time in `reqs` against their wall time: CPU + off-CPU all of it (within
/// 10%, and not more: each wait counted once), the sleep at its line a fifth at least (each
/// wake-up then waits for the GIL the busy threads hold: a third of the time here, more on a
/// busy machine; as in tests/it/offcpu.rs). Returns the wall time (ns) and the thread's id.
fn check_nap_thread(reqs: &[ExportProfilesServiceRequest], pid: i64, what: &str) -> (f64, String) {
    let wall = wall_of(reqs, pid) as f64;
    let (tid, off, sleep, cpu) = nap_thread(reqs, pid);
    let total = (off + cpu) as f64 / wall;
    eprintln!(
        "{what}: {} exports over {:.2} s; nap thread {tid}: off-CPU {:.2} s (sleep at its line {:.2} s), CPU {:.2} s",
        reqs.len(),
        wall / 1e9,
        off as f64 / 1e9,
        sleep as f64 / 1e9,
        cpu as f64 / 1e9
    );
    assert!(
        (0.9..=1.05).contains(&total),
        "{what}: the nap thread's CPU + off-CPU time is {:.0}% of the wall time",
        total * 100.0
    );
    assert!(
        sleep as f64 >= 0.2 * wall,
        "{what}: sleep under nap at its line: {:.0}% of the wall time",
        sleep as f64 * 100.0 / wall
    );
    (wall, tid)
}

/// A thread's off-CPU time in a request, all of it and the part under `--min-block`; its CPU.
fn thread_times(req: &ExportProfilesServiceRequest, pid: i64, tid: &str) -> (i64, i64, i64) {
    let of = |ty| {
        of_type(req, ty)
            .remove(&pid)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.attrs.get("thread.id").map(String::as_str) == Some(tid))
    };
    let short = of("off_cpu")
        .filter(|s| s.attrs.get("thread.wait").map(String::as_str) == Some("under --min-block"))
        .map(|s| s.value)
        .sum();
    let off = of("off_cpu").map(|s| s.value).sum();
    (off, short, of("cpu").map(|s| s.value).sum())
}

/// `--off-cpu` in OTLP: each process gets an `off_cpu` profile beside its `cpu` one. The thread
/// of testdata/offcpu_threads.py that sleeps in `nap` (0.02 s at a time) shows its wall time off
/// the CPU, the sleep under `nap` at the sleep's line and file: in what `perfpy agent --off-cpu`
/// exports interval by interval (each wait in one interval only: together the intervals add up
/// to the run's wall time, not more) and in what `record --off-cpu --otlp-endpoint` sends.
#[test]
fn off_cpu_time_is_exported_under_the_sleeping_function() {
    let sink = Sink::start();
    let Some(col) = Collector::start(Some(&sink.url), true) else {
        return;
    };
    let Some(py) = python("3.12") else {
        return;
    };
    let w = Workload::start(Command::new(py).arg(testdata("offcpu_threads.py")));
    let pid = w.pid().to_string();
    let url = col.url();
    let nap_line = line_of("offcpu_threads.py", "line: nap-sleep");
    let (child, rx) = spawn_agent(&pid, "2s", &url, &["--off-cpu"], &[]);
    let said = agent_started(&rx);
    let arrived = sink.wait(4, Duration::from_secs(90));
    let (code, said) = stop_agent(child, &rx, said);
    assert!(arrived, "fewer than 4 exports in 90 s: {said}");
    assert_eq!(code, Some(0), "{said}");
    let sent = sent_none_dropped(&said);
    assert!(sink.wait(sent, Duration::from_secs(10)), "{sent} exports");
    // Two profiles per export: "interval 1: N samples (0 lost), 2 profiles".
    assert!(said.contains(", 2 profiles;"), "{said}");
    let reqs: Vec<ExportProfilesServiceRequest> = sink
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| ExportProfilesServiceRequest::decode(&r.body[..]).expect("OTLP protobuf"))
        .collect();
    let me = w.pid() as i64;
    let (wall, tid) = check_nap_thread(&reqs, me, "agent --off-cpu");
    // The busy threads are in the CPU profiles.
    let spin: i64 = reqs
        .iter()
        .flat_map(|r| of_type(r, "cpu").remove(&me).unwrap_or_default())
        .filter(|s| s.names.iter().any(|n| n == "spin"))
        .map(|s| s.value)
        .sum();
    assert!(spin as f64 > 0.1 * wall, "spin: {spin} ns of CPU");
    // What the Collector printed: the sample type, `nap` with its file and the sleep's line.
    let printed = printed_exports(&col.output());
    assert!(
        printed
            .iter()
            .any(|p| p.strings.iter().any(|s| s == "off_cpu")),
        "no off_cpu sample type printed"
    );
    assert!(
        printed
            .iter()
            .any(|p| p.function("nap").is_some_and(|(file, lines)| {
                file.ends_with("testdata/offcpu_threads.py") && lines.contains(&nap_line)
            })),
        "nap not printed with its file and line"
    );

    // `record --off-cpu --otlp-endpoint`: the recording's two profiles.
    let out = tmp("otlp-offcpu.pb.gz");
    let before = sink.received.lock().unwrap().len();
    let o = run_perfpy(&[
        "record",
        "-p",
        &pid,
        "-d",
        "2",
        "--off-cpu",
        "-o",
        out.to_str().unwrap(),
        "--otlp-endpoint",
        &url,
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "sent 2 profiles (OTLP) to {url}/v1development/profiles"
        )),
        "{stderr}"
    );
    assert!(sink.wait(before + 1, Duration::from_secs(10)));
    let last =
        ExportProfilesServiceRequest::decode(&sink.received.lock().unwrap()[before].body[..])
            .expect("OTLP protobuf");
    check_nap_thread(std::slice::from_ref(&last), me, "record --off-cpu");
    short_waits_in_every_interval(&sink, &url, &pid, &tid);
}

/// `agent --off-cpu --min-block 50ms` on testdata/offcpu_threads.py (`pid`), whose nap thread
/// (`tid`) sleeps 20 ms at a time: its waits are not stacked but counted per thread by the
/// kernel; each interval gets those of its own time, not the last interval all of the run's,
/// and none twice.
fn short_waits_in_every_interval(sink: &Sink, url: &str, pid: &str, tid: &str) {
    let me: i64 = pid.parse().unwrap();
    let before = sink.received.lock().unwrap().len();
    let (child, rx) = spawn_agent(pid, "2s", url, &["--off-cpu", "--min-block", "50ms"], &[]);
    let said = agent_started(&rx);
    let arrived = sink.wait(before + 3, Duration::from_secs(60));
    let (code, said) = stop_agent(child, &rx, said);
    assert!(arrived, "fewer than 3 exports in 60 s: {said}");
    assert_eq!(code, Some(0), "{said}");
    let sent = sent_none_dropped(&said);
    assert!(sink.wait(before + sent, Duration::from_secs(10)));
    let reqs: Vec<ExportProfilesServiceRequest> = sink.received.lock().unwrap()[before..]
        .iter()
        .map(|r| ExportProfilesServiceRequest::decode(&r.body[..]).expect("OTLP protobuf"))
        .collect();
    let (mut all, mut wall) = (0, 0.0);
    for (i, r) in reqs.iter().enumerate() {
        let w = wall_of(std::slice::from_ref(r), me) as f64;
        let (off, short, cpu) = thread_times(r, me, tid);
        eprintln!(
            "--min-block 50ms, export {i}: {:.2} s; nap thread off-CPU {:.2} s ({:.2} s under --min-block), CPU {:.2} s",
            w / 1e9,
            off as f64 / 1e9,
            short as f64 / 1e9,
            cpu as f64 / 1e9
        );
        if i + 1 < reqs.len() {
            assert!(
                short as f64 >= 0.5 * w,
                "export {i}: short waits {:.0}% of its time",
                short as f64 * 100.0 / w
            );
        }
        all += off + cpu;
        wall += w;
    }
    let total = all as f64 / wall;
    assert!(
        (0.9..=1.05).contains(&total),
        "--min-block 50ms: the nap thread's time is {:.0}% of the wall time",
        total * 100.0
    );
}
