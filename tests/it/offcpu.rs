//! `perfpy record --off-cpu`: each wait of a thread stacked with its kind, CPU and off-CPU time
//! adding up to each thread's wall time, on every installed CPython and on a native program.

use perfpy_test_support as common;

use std::collections::HashMap;
use std::process::Command;

use common::*;

/// One sample of a thread: its wait kind (off-CPU), CPU ns, off-CPU ns, the frames of the
/// target's file as `function:line`, and whether it has a kernel frame; the functions of all
/// its frames.
struct Part {
    kind: Option<String>,
    cpu: i64,
    off: i64,
    at: Vec<String>,
    kernel: bool,
    functions: Vec<String>,
}

/// The samples of each thread, from the pprof's four values.
fn per_thread(d: &Decoded) -> HashMap<i64, Vec<Part>> {
    let types: Vec<String> = d
        .profile
        .sample_type
        .iter()
        .map(|t| format!("{}/{}", d.string(t.ty), d.string(t.unit)))
        .collect();
    assert_eq!(
        types,
        [
            "samples/count",
            "cpu/nanoseconds",
            "off-cpu/nanoseconds",
            "wall/nanoseconds"
        ]
    );
    let mut m: HashMap<i64, Vec<Part>> = HashMap::new();
    for (s, raw) in d.samples.iter().zip(&d.profile.sample) {
        assert_eq!(
            raw.value[3],
            raw.value[1] + raw.value[2],
            "wall = cpu + off-cpu"
        );
        let kind = (raw.value[2] > 0).then(|| {
            let kind = s.str_labels.get("wait").cloned().expect("wait label");
            assert!(
                s.frames
                    .last()
                    .is_some_and(|f| f.function == format!("[off-CPU: {kind}]")),
                "root frame names the kind {kind}: {:?}",
                s.names()
            );
            kind
        });
        m.entry(s.num_labels["tid"]).or_default().push(Part {
            kind,
            cpu: raw.value[1],
            off: raw.value[2],
            at: s
                .frames
                .iter()
                .filter(|f| f.file.ends_with("offcpu_target.py"))
                .map(|f| format!("{}:{}", f.function, f.line))
                .collect(),
            kernel: s.frames.iter().any(|f| f.mapping.contains("kernel")),
            functions: s.frames.iter().map(|f| f.function.clone()).collect(),
        });
    }
    m
}

/// What a thread of `offcpu_target.py` measured itself (ns): its life (from just before its
/// creation to its end) and, over the run of its function, the wall time, its CPU time, its
/// time runnable but not running (the kernel's run_delay), and the time its phase's cause (its
/// sleeps, the helper's pace) held it. The rest it waited for the GIL: nothing else blocks it.
#[derive(Debug, Default)]
struct Known {
    role: String,
    life: f64,
    wall: f64,
    cpu: f64,
    runq: f64,
    cause: f64,
}

fn read_report(path: &std::path::Path) -> HashMap<i64, Known> {
    let text = std::fs::read_to_string(path).expect("the target's report");
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| f[i].parse::<f64>().unwrap();
            let k = Known {
                role: f[1].to_string(),
                life: num(2),
                wall: num(3),
                cpu: num(4),
                runq: num(5),
                cause: num(6),
            };
            (f[0].parse().unwrap(), k)
        })
        .collect()
}

/// perfpy's shares of the wall time of one thread's function by kind — CPU, preempted
/// (runnable: the kernel's run_delay), the phase's cause, GIL — at the line of its phase,
/// beside those the thread measured: each within ±5 points; other kinds under 5 points; CPU
/// and off-CPU in its function its wall time within 5%. CPython 2.7 hands the GIL over every 100
/// bytecodes, wherever they are: there its GIL waits (and the preemptions of the thread holding
/// it) are anywhere in the function.
fn compare_thread(what: &str, tid: i64, k: &Known, parts: &[Part], errors: &mut Vec<String>) {
    let (func, marker, cause) = match k.role.as_str() {
        "compute" => ("compute", "line: compute", None),
        "gil_wait" => ("gil_wait", "line: gil-wait", None),
        "nap" => ("nap", "line: nap-sleep", Some("sleep")),
        _ => ("wait_pipe", "line: pipe-read", Some("I/O read")),
    };
    let line = format!("{func}:{}", line_of("offcpu_target.py", marker));
    let function = format!("{func}:");
    let anywhere = what == "2.7";
    let wall = k.wall;
    // ns of `kind` (None: CPU) in stacks through `at` (a line, or a function's prefix).
    let at = |kind: Option<&str>, at: &str| {
        parts
            .iter()
            .filter(|p| {
                p.at.iter()
                    .any(|a| a == at || (at.ends_with(':') && a.starts_with(at)))
            })
            .map(|p| match kind {
                None => p.cpu,
                Some(kind) if p.kind.as_deref() == Some(kind) => p.off,
                _ => 0,
            })
            .sum::<i64>() as f64
            / wall
    };
    let gil_at = if anywhere { &function } else { &line };
    let mut rows = vec![
        ("CPU", at(None, &line), k.cpu / wall, &line),
        (
            "preempted",
            at(Some("preempted"), gil_at),
            k.runq / wall,
            gil_at,
        ),
        (
            "GIL",
            at(Some("GIL"), gil_at),
            (wall - k.cpu - k.runq - k.cause) / wall,
            gil_at,
        ),
    ];
    if let Some(c) = cause {
        rows.push((c, at(Some(c), &line), k.cause / wall, &line));
    }
    let other: f64 = parts
        .iter()
        .filter(|p| {
            p.kind
                .as_deref()
                .is_some_and(|w| !["GIL", "preempted"].contains(&w) && Some(w) != cause)
        })
        .map(|p| p.off)
        .sum::<i64>() as f64
        / wall;
    // The thread's function: perfpy sees neither the new thread's first wait for a CPU (it has
    // not left one yet) nor what follows its last measurement (it may be preempted there).
    let total = parts
        .iter()
        .filter(|p| p.at.iter().any(|a| a.starts_with(&function)))
        .map(|p| p.cpu + p.off)
        .sum::<i64>() as f64
        / wall;
    let whole = parts.iter().map(|p| p.cpu + p.off).sum::<i64>() as f64 / k.life;
    eprintln!(
        "{what}: {} (tid {tid}): {}; other kinds {other:.3}; all of its function {total:.3}, all of the thread {whole:.3} of its life",
        k.role,
        rows.iter()
            .map(|(n, got, known, at)| format!("{n} at {at} {got:.3} (known {known:.3})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let before = errors.len();
    for (name, got, known, at) in rows {
        if (got - known).abs() > 0.05 {
            errors.push(format!(
                "{what}: {}: {name} at {at} {got:.3} of its function's wall time, known {known:.3}",
                k.role
            ));
        }
    }
    if other > 0.05 {
        errors.push(format!("{what}: {}: other kinds {other:.3}", k.role));
    }
    if (total - 1.0).abs() > 0.05 {
        errors.push(format!(
            "{what}: {}: CPU + off-CPU in {func} = {total:.3} of its wall time",
            k.role
        ));
    }
    if errors.len() > before {
        errors.push(format!("  {}: {}", k.role, elsewhere(parts, &line, wall)));
    }
}

/// Where the time of a thread's samples not through `line` went (shares of `wall`), to tell a
/// misattribution from a mismeasurement.
fn elsewhere(parts: &[Part], line: &str, wall: f64) -> String {
    let mut m: HashMap<(String, Vec<String>), f64> = HashMap::new();
    for p in parts.iter().filter(|p| !p.at.iter().any(|a| a == line)) {
        let key = (p.kind.clone().unwrap_or("CPU".into()), p.at.clone());
        *m.entry(key).or_default() += (p.cpu + p.off) as f64 / wall;
    }
    format!("not at {line}: {m:.3?}")
}

/// One recording of `offcpu_target.py` under `py`, compared with what it measured itself.
fn check_python(py: &std::path::Path, what: &str, errors: &mut Vec<String>) {
    let out = tmp(&format!("offcpu-{what}.pb.gz"));
    let report = tmp(&format!("offcpu-{what}.report"));
    let _ = std::fs::remove_file(&report);
    let o = output_within(
        Command::new(perfpy())
            // Every wait stacked carries up to 16 KiB of stack: room for a second of them, so
            // that a reader kept off the CPU by the machine's load loses none.
            .env("PERFPY_TEST_OFFCPU_RING", (32 << 20).to_string())
            .args([
                "record",
                "--off-cpu",
                "--min-block",
                MIN_BLOCK,
                "-r",
                "1000",
                "-o",
            ])
            .arg(&out)
            .arg("--")
            .arg(py)
            .arg(testdata("offcpu_target.py"))
            .arg("3")
            .arg(&report),
        std::time::Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        errors.push(format!("{what}: perfpy failed: {stderr}"));
        return;
    }
    eprintln!("{what}: {}", stderr.trim_end().replace('\n', "\n  "));
    if stderr.contains("waits lost") {
        errors.push(format!(
            "{what}: off-CPU records lost, the figures are incomplete: {stderr}"
        ));
    }
    let known = read_report(&report);
    let d = decode(&out);
    let threads = per_thread(&d);
    let mut roles: Vec<&str> = known.values().map(|k| k.role.as_str()).collect();
    roles.sort();
    if roles != ["compute", "gil_wait", "nap", "wait_pipe"] {
        errors.push(format!("{what}: the target's report: {roles:?}"));
    }
    for (tid, k) in &known {
        match threads.get(tid) {
            Some(parts) => compare_thread(what, *tid, k, parts, errors),
            None => errors.push(format!("{what}: no sample of {} (tid {tid})", k.role)),
        }
    }
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

/// Every wait stacked, none only counted under the threshold (and so at no line): the
/// threshold's own accounting is checked by `lost_waits_are_counted_and_reported` and the
/// summary's figures.
const MIN_BLOCK: &str = "0";

/// Every installed CPython in one test (the suite stays short): 3 s each. `OFFCPU_ONLY=3.12`
/// runs one of them.
#[test]
fn waits_are_attributed_on_every_cpython() {
    let mut errors = Vec::new();
    let only = std::env::var("OFFCPU_ONLY").ok();
    for v in [
        "2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13",
    ] {
        if only.as_deref().is_some_and(|o| o != v) {
            continue;
        }
        if let Some(py) = python(v) {
            check_python(&py, v, &mut errors);
        }
    }
    if only.is_none() {
        check_python(
            std::path::Path::new("/usr/bin/python3.11"),
            "debian-3.11",
            &mut errors,
        );
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The same check on a native program (`offcpu_native.c`): kernel and native frames only, each
/// thread's function blocked on one thing (a mutex, a sleep, a pipe), its shares by kind in
/// stacks through that function within ±5 points of what it measured itself.
#[test]
fn a_native_program_waits_where_it_says() {
    let exe = tmp("offcpu_native");
    let cc = output_within(
        Command::new("cc")
            .args(["-O1", "-pthread", "-o"])
            .arg(&exe)
            .arg(testdata("offcpu_native.c")),
        std::time::Duration::from_secs(120),
    );
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = tmp("offcpu-native.pb.gz");
    let report = tmp("offcpu-native.report");
    let o = run_perfpy(&[
        "record",
        "--off-cpu",
        "--min-block",
        "0",
        "-r",
        "1000",
        "-o",
        out.to_str().unwrap(),
        "--",
        exe.to_str().unwrap(),
        "3",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let threads = per_thread(&decode(&out));
    let mut errors = Vec::new();
    let text = std::fs::read_to_string(&report).expect("the program's report");
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (tid, role) = (f[0].parse::<i64>().unwrap(), f[1]);
        let [wall, cpu, runq] = [2, 3, 4].map(|i| f[i].parse::<f64>().unwrap());
        let kind = match role {
            "nap" => "sleep",
            "read_pipe" => "I/O read",
            _ => "lock",
        };
        let parts = threads.get(&tid).map(Vec::as_slice).unwrap_or_default();
        let through: Vec<&Part> = parts
            .iter()
            .filter(|p| p.functions.iter().any(|f| f == role))
            .collect();
        let off = |k: &str| {
            through
                .iter()
                .filter(|p| p.kind.as_deref() == Some(k))
                .map(|p| p.off)
                .sum::<i64>() as f64
                / wall
        };
        let got_cpu = through.iter().map(|p| p.cpu).sum::<i64>() as f64 / wall;
        // In its function (after its last measurement a thread may be preempted on its way out).
        let total = through.iter().map(|p| p.cpu + p.off).sum::<i64>() as f64 / wall;
        let rows = [
            ("CPU", got_cpu, cpu / wall),
            ("preempted", off("preempted"), runq / wall),
            (kind, off(kind), (wall - cpu - runq) / wall),
        ];
        eprintln!("native: {role} (tid {tid}): {rows:.3?}; all of its function {total:.3}");
        for (name, got, known) in rows {
            if (got - known).abs() > 0.05 {
                errors.push(format!("{role}: {name} {got:.3}, known {known:.3}"));
            }
        }
        if (total - 1.0).abs() > 0.05 {
            errors.push(format!(
                "{role}: CPU + off-CPU in it = {total:.3} of its wall time"
            ));
        }
        // Its waits have their kernel frames.
        if !through
            .iter()
            .any(|p| p.kind.as_deref() == Some(kind) && p.kernel)
        {
            errors.push(format!("{role}: no {kind} wait with kernel frames"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn sample_choice_needs_off_cpu_and_text_formats_follow_it() {
    let o = run_perfpy(&["record", "--sample", "wall", "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("need --off-cpu"));
    let out = tmp("offcpu-native.txt");
    let o = run_perfpy(&[
        "record",
        "--off-cpu",
        "--sample",
        "off-cpu",
        "-f",
        "collapsed",
        "-o",
        out.to_str().unwrap(),
        "--",
        "sleep",
        "0.5",
    ]);
    assert!(o.status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    // µs: the sleep's 0.5 s, rooted at its kind.
    let us: u64 = text
        .lines()
        .filter(|l| l.starts_with("[off-CPU: sleep]"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        (450_000..700_000).contains(&us),
        "{us} µs of sleep:\n{text}"
    );
}

/// `-a` in a private PID namespace: a Python process's sleeps, named, beside perfpy's own waits.
#[test]
fn whole_machine_in_a_pid_namespace() {
    let py = python("3.12").expect("CPython 3.12");
    let out = tmp("offcpu-all.txt");
    let script = format!(
        "{py} -c 'import time\ndef napper():\n    for _ in range(500): time.sleep(0.01)\nnapper()' & {perfpy} record -a --off-cpu -d 2 --sample off-cpu -f collapsed -o {out}; wait",
        py = py.display(),
        perfpy = perfpy().display(),
        out = out.display()
    );
    let o = output_within(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "sh", "-c"])
            .arg(&script),
        std::time::Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    let us: u64 = text
        .lines()
        .filter(|l| l.contains("[off-CPU: sleep]") && l.contains(";napper (<string>:3);"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(us >= 1_500_000, "{us} µs of napper's sleep in 2 s:\n{text}");
}

/// Waits the kernel cannot record are counted and said, and the run goes on: a context-switch
/// storm (one byte at a time through a pipe) stacked at `--min-block 0` into an off-CPU ring
/// shrunk to 64 KiB (the test hook `PERFPY_TEST_OFFCPU_RING`) overflows it.
#[test]
fn lost_waits_are_counted_and_reported() {
    let out = tmp("offcpu-lost.pb.gz");
    let o = run_perfpy_env(
        &[
            "record",
            "--off-cpu",
            "--min-block",
            "0",
            "-o",
            out.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero bs=1 count=100000 status=none | cat >/dev/null",
        ],
        &[("PERFPY_TEST_OFFCPU_RING", std::path::Path::new("65536"))],
    );
    assert!(o.status.success(), "the run goes on and exits 0");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lost: u64 = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("perfpy: warning: off-CPU: ")?
                .strip_suffix(
                    " waits lost (the ring was full): raise --min-block, or profile fewer threads",
                )?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the lost waits are said:\n{stderr}"));
    let stacked: u64 = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("perfpy: off-CPU: ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("the waits stacked are said");
    assert!(lost > 0 && stacked > 0, "{lost} lost, {stacked} stacked");
    // A valid profile with the waits that were recorded.
    let d = decode(&out);
    let off: i64 = d.profile.sample.iter().map(|s| s.value[2]).sum();
    assert!(off > 0, "off-CPU time in the profile");
    check_go_pprof(&out);
}

/// Threads blocked since before the recording (a sleep, a read of a pipe nobody writes):
/// no switch of theirs happens while perfpy records, yet each wait is stacked under the Python
/// function and line that waits, with its kind, for the whole recording.
#[test]
fn waits_begun_before_the_recording_have_their_stacks() {
    for minor in ["2.7", "3.9", "3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let w = Workload::start(Command::new(&py).arg(testdata("blocked.py")));
        let what = format!("blocked {minor}");
        let (d, _) = Record::new(&format!("blocked-{minor}.pb.gz"))
            .pid(w.pid())
            .duration("1")
            .arg("--off-cpu")
            .profile_read_by_go();
        let waited = |function: &str, needle: &str, kind: &str| -> i64 {
            let line = line_of("blocked.py", needle);
            d.profile
                .sample
                .iter()
                .zip(&d.samples)
                .filter(|(_, s)| {
                    s.str_labels.get("wait").map(String::as_str) == Some(kind)
                        && s.frames
                            .iter()
                            .any(|f| f.function == function && f.line == line)
                })
                .map(|(raw, _)| raw.value[2])
                .sum()
        };
        let nap = waited("nap", "time.sleep(600)", "sleep");
        let read = waited("read_forever", "os.read(fd, 1)", "I/O read");
        eprintln!("{what}: nap {nap} ns, read_forever {read} ns");
        // The whole recording (1 s), give or take its start and end.
        for (f, ns) in [("nap", nap), ("read_forever", read)] {
            assert!(
                (0.8e9..1.3e9).contains(&(ns as f64)),
                "{what}: {f} waited {ns} ns at its line, want ~1 s"
            );
        }
    }
}
