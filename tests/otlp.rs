//! `perfpy record --otlp-endpoint` against a real OpenTelemetry Collector (built by
//! scripts/deps.sh from Debian's packaged source): what arrives, what the Collector printed
//! (debug exporter, detailed) and what it forwarded (its OTLP/HTTP exporter, to a sink of the
//! test: the debug exporter does not print which stack a sample has); a Collector that is down,
//! killed or stalled.

mod common;

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

/// Per resource (its `process.pid`): the samples as (function names leaf first, value).
fn stacks(req: &ExportProfilesServiceRequest) -> HashMap<i64, Vec<(Vec<String>, i64)>> {
    let d = req.dictionary.as_ref().expect("dictionary");
    let s = |i: i32| d.string_table[i as usize].clone();
    let mut out: HashMap<i64, Vec<(Vec<String>, i64)>> = HashMap::new();
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
            assert_eq!(
                (s(st.type_strindex), s(st.unit_strindex)),
                ("cpu".into(), "nanoseconds".into())
            );
            for smp in &p.samples {
                let names = d.stack_table[smp.stack_index as usize]
                    .location_indices
                    .iter()
                    .flat_map(|l| &d.location_table[*l as usize].lines)
                    .map(|ln| s(d.function_table[ln.function_index as usize].name_strindex))
                    .collect();
                out.entry(pid).or_default().push((names, smp.values[0]));
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
    let t = Instant::now();
    while let Some(left) = limit.checked_sub(t.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
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

    // What the Collector printed.
    assert!(
        col.wait_for("ResourceProfiles #0", Duration::from_secs(10)),
        "{}",
        col.output()
    );
    let printed = Printed::parse(&col.output());
    assert_eq!(printed.resources.len(), 1, "one process, one resource");
    let res: HashMap<&str, &str> = printed.resources[0]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let want = [
        ("service.name", "Str(checkout-test)".to_string()),
        ("process.pid", format!("Int({pid})")),
        ("process.executable.name", "Str(python3.12)".into()),
        ("process.runtime.name", "Str(CPython)".into()),
        ("host.name", format!("Str({})", host.trim())),
    ];
    for (k, v) in &want {
        assert_eq!(
            res.get(k).copied(),
            Some(v.as_str()),
            "resource attribute {k}: {res:?}"
        );
    }
    assert!(
        res["process.runtime.version"].starts_with("Str(3.12."),
        "{res:?}"
    );
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

    // What the Collector forwarded: the stacks, and the split the workload measured.
    assert!(
        sink.wait(1, Duration::from_secs(10)),
        "the Collector forwarded nothing"
    );
    let got = sink.received.lock().unwrap();
    assert_eq!(got[0].path, "/v1development/profiles");
    let req = ExportProfilesServiceRequest::decode(&got[0].body[..]).expect("OTLP protobuf");
    let by_pid = stacks(&req);
    let samples = &by_pid[&(w.pid() as i64)];
    let total = |f: &dyn Fn(&Vec<String>) -> bool| -> i64 {
        samples.iter().filter(|(n, _)| f(n)).map(|(_, v)| v).sum()
    };
    let rounds = total(&|n| n.iter().any(|x| x == "round_"));
    assert!(rounds > 0);
    let measured = measured_split(&rep);
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
    drop(got);
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
