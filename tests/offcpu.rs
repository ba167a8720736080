//! `perfpy record --off-cpu`: each wait of a thread stacked with its kind, CPU and off-CPU time
//! adding up to each thread's wall time, on every installed CPython and on a native program.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::*;

/// Per thread: (CPU ns, off-CPU ns per wait kind, off-CPU ns per kind with `func` at `line` in
/// the stack) from the pprof's four values.
struct ThreadTimes {
    cpu: i64,
    off: HashMap<String, i64>,
    funcs: Vec<String>,
}

fn per_thread(d: &Decoded) -> HashMap<i64, ThreadTimes> {
    let types: Vec<String> = d
        .profile
        .sample_type
        .iter()
        .map(|t| format!("{}/{}", d.string(t.ty), d.string(t.unit)))
        .collect();
    assert_eq!(
        types,
        ["samples/count", "cpu/nanoseconds", "off-cpu/nanoseconds", "wall/nanoseconds"]
    );
    let mut m: HashMap<i64, ThreadTimes> = HashMap::new();
    for (s, raw) in d.samples.iter().zip(&d.profile.sample) {
        let t = m.entry(s.num_labels["tid"]).or_insert(ThreadTimes {
            cpu: 0,
            off: HashMap::new(),
            funcs: Vec::new(),
        });
        assert_eq!(raw.value[3], raw.value[1] + raw.value[2], "wall = cpu + off-cpu");
        t.cpu += raw.value[1];
        if raw.value[2] > 0 {
            let kind = s.str_labels.get("wait").cloned().expect("wait label");
            assert!(
                s.frames.last().is_some_and(|f| f.function == format!("[off-CPU: {kind}]")),
                "root frame names the kind {kind}: {:?}",
                s.names()
            );
            *t.off.entry(kind).or_default() += raw.value[2];
        }
        for f in &s.frames {
            if f.file.ends_with("offcpu_target.py") {
                t.funcs.push(format!("{}:{}", f.function, f.line));
            }
        }
    }
    m
}

fn check_python(py: &std::path::Path, what: &str) {
    let w = Workload::start(Command::new(py).arg(testdata("offcpu_target.py")));
    let out = tmp(&format!("offcpu-{what}.pb.gz"));
    let pid = w.pid().to_string();
    let o = run_perfpy(&[
        "record", "-p", &pid, "--off-cpu", "-r", "1000", "-d", "2", "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{what}: perfpy failed");
    let d = decode(&out);
    let wall = d.profile.duration_nanos as f64;
    let threads = per_thread(&d);
    let nap_line = line_of("offcpu_target.py", "line: nap-sleep");
    let pipe_line = line_of("offcpu_target.py", "line: pipe-read");
    let share = |t: &ThreadTimes, kinds: &[&str]| {
        kinds.iter().map(|k| t.off.get(*k).copied().unwrap_or(0)).sum::<i64>() as f64 / wall
    };
    let mut seen = HashMap::new();
    for (tid, t) in &threads {
        let role = if t.funcs.iter().any(|f| f == &format!("nap:{nap_line}")) {
            "nap"
        } else if t.funcs.iter().any(|f| f == &format!("wait_pipe:{pipe_line}")) {
            "pipe"
        } else if t.funcs.iter().any(|f| f.starts_with("spin:")) {
            "spin"
        } else {
            continue;
        };
        *seen.entry(role).or_insert(0) += 1;
        let total = (t.cpu + t.off.values().sum::<i64>()) as f64 / wall;
        eprintln!("{what}: thread {tid} ({role}): cpu {:.3} off {:?} total {total:.3}", t.cpu as f64 / wall, t.off);
        assert!(
            (total - 1.0).abs() <= 0.05,
            "{what}: thread {tid} ({role}): CPU + off-CPU = {total:.3} of the wall time"
        );
        match role {
            "nap" => {
                // Each wake-up waits for the GIL the spinners hold: sleep, then the GIL.
                assert!(share(t, &["sleep"]) >= 0.5, "{what}: nap sleeps");
                assert!(share(t, &["sleep", "GIL", "preempted", "under --min-block"]) >= 0.9);
            }
            "pipe" => {
                assert!(share(t, &["I/O read"]) >= 0.5, "{what}: wait_pipe reads");
                assert!(share(t, &["I/O read", "GIL", "preempted", "under --min-block"]) >= 0.9);
            }
            _ => {
                // Two busy threads share one GIL.
                assert!(share(t, &["GIL"]) >= 0.2, "{what}: spin waits for the GIL");
            }
        }
    }
    assert_eq!(
        (seen.get("nap"), seen.get("pipe"), seen.get("spin")),
        (Some(&1), Some(&1), Some(&2)),
        "{what}: every thread found"
    );
    check_go_pprof(&out);
    for ix in ["cpu", "off-cpu", "wall"] {
        let o = Command::new("go")
            .args(["tool", "pprof", "-top", &format!("-sample_index={ix}")])
            .arg(&out)
            .output()
            .expect("go tool pprof");
        assert!(o.status.success(), "-sample_index={ix} reads alone");
    }
}

/// Every installed CPython in one test (the suite stays short): 2 s each.
#[test]
fn waits_are_attributed_on_every_cpython() {
    for v in ["2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"] {
        if let Some(py) = python(v) {
            check_python(&py, v);
        }
    }
    check_python(std::path::Path::new("/usr/bin/python3.11"), "debian-3.11");
}

#[test]
fn a_native_program_waits_in_sleep() {
    let out = tmp("offcpu-native.pb.gz");
    let o = run_perfpy(&[
        "record", "--off-cpu", "-o", out.to_str().unwrap(), "--", "sleep", "1.5",
    ]);
    assert!(o.status.success());
    let d = decode(&out);
    let threads = per_thread(&d);
    assert_eq!(threads.len(), 1, "one thread");
    let t = threads.values().next().unwrap();
    let sleep = t.off.get("sleep").copied().unwrap_or(0) as f64;
    assert!(
        (1.4e9..1.7e9).contains(&sleep),
        "sleep 1.5 waits 1.5 s in the kernel: {sleep}"
    );
    // Kernel and native frames: the libc call under main.
    let s = d
        .samples
        .iter()
        .find(|s| s.str_labels.get("wait").is_some_and(|w| w == "sleep"))
        .unwrap();
    assert!(s.frames.iter().any(|f| f.function.contains("nanosleep") && f.mapping.contains("libc")), "{:?}", s.names());
    assert!(s.frames.iter().any(|f| f.mapping.contains("kernel")), "kernel frames");
}

#[test]
fn sample_choice_needs_off_cpu_and_text_formats_follow_it() {
    let o = run_perfpy(&["record", "--sample", "wall", "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("need --off-cpu"));
    let out = tmp("offcpu-native.txt");
    let o = run_perfpy(&[
        "record", "--off-cpu", "--sample", "off-cpu", "-f", "collapsed", "-o",
        out.to_str().unwrap(), "--", "sleep", "0.5",
    ]);
    assert!(o.status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    // µs: the sleep's 0.5 s, rooted at its kind.
    let us: u64 = text
        .lines()
        .filter(|l| l.starts_with("[off-CPU: sleep]"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!((450_000..700_000).contains(&us), "{us} µs of sleep:\n{text}");
}
