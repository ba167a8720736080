//! End-to-end tests of `perfpy record`: real processes, real perf events, the real binary, the
//! profile decoded and checked as a user would check it.

use perfpy_test_support as common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const PARTS: [(&str, f64); 4] = [
    ("hot_function", 0.40),
    ("Shape.area", 0.20),
    ("make_closure.<locals>.inner", 0.20),
    ("hash_work", 0.20),
];
const CHAIN: [&str; 6] = SPLIT_CHAIN;

/// Checks the split the workload measured itself, the complete chain and the C extension's
/// native frames.
fn check_split(d: &Decoded, what: &str, measured: &std::collections::HashMap<String, f64>) {
    let rounds = d.count_where(|s| s.has("round_"));
    assert!(rounds >= 300, "{what}: too few samples in round_: {rounds}");
    for (f, nominal) in PARTS {
        let want = measured[f];
        assert!(
            (want - nominal).abs() < 0.15,
            "{what}: the workload's own split is off: {f} {want}"
        );
    }
    let parts: Vec<&str> = PARTS.iter().map(|(f, _)| *f).collect();
    assert_split(d, what, "round_", &parts, measured, 0.05);
    // ≥ 90% of the hot function's samples carry the whole chain from <module>.
    let spin = d.count_where(|s| s.has("spin"));
    let full = d.count_where(|s| s.has("spin") && s.has_chain(&CHAIN));
    assert!(spin > 0);
    assert!(
        full as f64 >= 0.9 * spin as f64,
        "{what}: only {full} of {spin} samples of spin have the chain {CHAIN:?}"
    );
    // Python frames carry their file.
    let f = d
        .samples
        .iter()
        .flat_map(|s| &s.frames)
        .find(|f| f.function == "Shape.area")
        .unwrap();
    assert!(
        f.file.ends_with("testdata/split.py"),
        "{what}: file of Shape.area: {}",
        f.file
    );
    // The C extension: native frames below hash_work (leaf-ward), from libcrypto or _hashlib.
    let hashing = d.count_where(|s| s.has("hash_work"));
    let native_under = d.count_where(|s| {
        let i = s.frames.iter().position(|f| f.function == "hash_work");
        i.is_some_and(|i| {
            s.frames[..i]
                .iter()
                .any(|f| f.mapping.contains("libcrypto") || f.mapping.contains("_hashlib"))
        })
    });
    assert!(native_under as f64 >= 0.8 * hashing as f64, "{what}: only {native_under} of {hashing} hash_work samples have C-extension frames under it");
    // Labels.
    let s = &d.samples[0];
    for k in ["comm", "thread_name", "frames_from"] {
        assert!(s.str_labels.contains_key(k), "{what}: label {k} missing");
    }
    for k in ["pid", "tid"] {
        assert!(
            s.num_labels.get(k).is_some_and(|v| *v > 0),
            "{what}: label {k} missing"
        );
    }
    assert!(d
        .samples
        .iter()
        .any(|s| s.str_labels["frames_from"] != "native"));
}

#[test]
fn perf_trampoline_split_spawned_and_attached() {
    for minor in ["3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        // Spawned.
        let out = tmp(&format!("spawned-{minor}.pb.gz"));
        let rep = split_report(&format!("spawned-{minor}"));
        // ~500 Hz: enough samples that ±5 points is far outside sampling noise. The workload
        // ends the recording after 3 s of CPU, however busy the machine is.
        let o = run_perfpy_env(
            &[
                "record",
                "-r",
                "497",
                "-o",
                out.to_str().unwrap(),
                "--",
                py.to_str().unwrap(),
                "-X",
                "perf",
                testdata("split.py").to_str().unwrap(),
                "3",
            ],
            &[("SPLIT_REPORT", &rep)],
        );
        assert!(o.status.success());
        let d = decode(&out);
        check_split(&d, &format!("{minor} spawned"), &measured_split(&rep));
        let pids: std::collections::HashSet<i64> =
            d.samples.iter().map(|s| s.num_labels["pid"]).collect();
        assert_eq!(pids.len(), 1);
        check_go_pprof(&out);

        // The trampoline path alone (no eBPF walker): the same, named by the perf map.
        let out = tmp(&format!("spawned-map-{minor}.pb.gz"));
        let rep = split_report(&format!("spawned-map-{minor}"));
        let o = run_perfpy_env(
            &[
                "record",
                "-d",
                "4",
                "-r",
                "497",
                "--no-ebpf",
                "-o",
                out.to_str().unwrap(),
                "--",
                py.to_str().unwrap(),
                "-X",
                "perf",
                testdata("split.py").to_str().unwrap(),
                "3",
            ],
            &[("SPLIT_REPORT", &rep)],
        );
        assert!(o.status.success());
        let d = decode(&out);
        check_split(
            &d,
            &format!("{minor} spawned, trampolines only"),
            &measured_split(&rep),
        );
        assert_eq!(
            d.count_where(|s| s.has("round_") && s.str_labels["frames_from"] != "trampoline"),
            0
        );

        // Attached, at 1 kHz.
        let rep = split_report(&format!("attached-{minor}"));
        let w = Workload::start(
            Command::new(&py)
                .args(["-X", "perf"])
                .arg(testdata("split.py"))
                .arg("30")
                .env("SPLIT_REPORT", &rep),
        );
        let out = tmp(&format!("attached-{minor}.pb.gz"));
        let o = Record::to(&out).pid(w.pid()).duration("3").rate(1000).run();
        assert!(o.status.success());
        let d = decode(&out);
        check_split(&d, &format!("{minor} attached"), &measured_split(&rep));
        assert!(d
            .samples
            .iter()
            .all(|s| s.num_labels["pid"] == w.pid() as i64));
        // 3000 when the workload has a CPU to itself; other tests may share the machine.
        assert!(
            d.total() > 400,
            "1 kHz for 3 s gave only {} samples",
            d.total()
        );
        check_go_pprof(&out);
        assert!(
            matches!(w.state(), 'R' | 'S'),
            "target left in state {}",
            w.state()
        );
    }
}

#[test]
fn threads_created_during_the_run_are_followed() {
    let Some(py) = python("3.12") else { return };
    let out = tmp("threads.pb.gz");
    let o = Record::to(&out)
        .duration("3")
        .command([
            py.to_str().unwrap(),
            "-X",
            "perf",
            testdata("split.py").to_str().unwrap(),
            "4",
            "threads",
        ])
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    let tids: std::collections::HashSet<i64> = d
        .samples
        .iter()
        .filter(|s| s.has("round_"))
        .map(|s| s.num_labels["tid"])
        .collect();
    assert!(
        tids.len() >= 2,
        "samples of round_ from {} threads, want 2",
        tids.len()
    );
    // Before 3.14 Python does not name OS threads: the label is there, with the process name.
    assert!(d
        .samples
        .iter()
        .all(|s| !s.str_labels["thread_name"].is_empty()));
    assert!(d.count_where(|s| s.has_chain(&["main.<locals>.loop", "round_", "hot_function"])) > 0);
}

#[test]
fn syscall_heavy_workload_shows_kernel_frames() {
    let Some(py) = python("3.12") else { return };
    let out = tmp("sys.pb.gz");
    let o = Record::to(&out)
        .duration("20")
        .rate(499)
        .command([
            py.to_str().unwrap(),
            "-X",
            "perf",
            testdata("syscalls.py").to_str().unwrap(),
            "2",
        ])
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    let total = d.total();
    let kernel = d.count_where(|s| s.frames.iter().any(|f| f.mapping == "[kernel.kallsyms]"));
    // The workload's own measure of its time in the kernel (system time), printed at its end.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let measured: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("kernel_share "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no kernel_share in {stdout}"));
    let share = kernel as f64 / total.max(1) as f64;
    assert!(
        measured > 0.15 && (share - measured).abs() < 0.15,
        "{kernel} of {total} samples have kernel frames ({:.0}%); the workload measured {:.0}% system time",
        100.0 * share,
        100.0 * measured
    );
    // Kernel frames sit below the Python caller, and the syscall entry is named.
    let named = d.count_where(|s| {
        s.frames.iter().any(|f| {
            f.function.contains("entry_SYSCALL")
                || f.function.starts_with("__x64_sys_")
                || f.function.starts_with("do_syscall")
        }) && s.has("<module>")
    });
    assert!(
        named > 0,
        "no sample has a named syscall entry under <module>"
    );
}

#[test]
fn c_program_with_and_without_frame_pointers() {
    let variants: [(&str, &[&str]); 2] = [
        (
            "fp",
            &[
                "-fno-omit-frame-pointer",
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
            ],
        ),
        ("cfi", &["-fomit-frame-pointer"]),
    ];
    for (name, flags) in variants {
        let exe = tmp(&format!("native-{name}"));
        let st = Command::new("cc")
            .args(["-O2", "-g"])
            .args(flags)
            .arg(testdata("native.c"))
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("cc");
        assert!(st.success());
        if name == "fp" {
            // -g adds .debug_frame when there are no unwind tables: remove it, keep the lines.
            let st = Command::new("objcopy")
                .args(["--remove-section", ".debug_frame"])
                .arg(&exe)
                .status()
                .expect("objcopy");
            assert!(st.success());
            // Our functions must have no CFI in this build, or the test would not test frame pointers.
            let out = Command::new("readelf")
                .arg("--debug-dump=frames")
                .arg(&exe)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let sym = Command::new("nm").arg(&exe).output().unwrap();
            let syms = String::from_utf8_lossy(&sym.stdout);
            let leaf = syms.lines().find(|l| l.ends_with(" leaf_busy")).unwrap();
            let addr = u64::from_str_radix(leaf.split_whitespace().next().unwrap(), 16).unwrap();
            assert!(
                !text.contains(&format!("pc={:016x}", addr)),
                "fp build still has an FDE for leaf_busy"
            );
        }
        let out = tmp(&format!("native-{name}.pb.gz"));
        let o = Record::to(&out)
            .duration("2")
            .rate(497)
            .command([exe.to_str().unwrap(), "3"])
            .run();
        assert!(o.status.success());
        let d = decode(&out);
        let leaf = d.count_where(|s| s.frames.first().is_some_and(|f| f.function == "leaf_busy"));
        let chain = d.count_where(|s| {
            s.frames.first().is_some_and(|f| f.function == "leaf_busy")
                && s.has_chain(&["main", "level1", "level2", "leaf_busy"])
        });
        assert!(leaf > 50, "{name}: {leaf} samples in leaf_busy");
        assert!(
            chain as f64 >= 0.9 * leaf as f64,
            "{name}: {chain} of {leaf} samples unwound to main"
        );
        // file:line from DWARF.
        let f = d
            .samples
            .iter()
            .flat_map(|s| &s.frames)
            .find(|f| f.function == "leaf_busy")
            .unwrap();
        assert!(f.file.ends_with("native.c") && f.line > 0, "{name}: {f:?}");
        check_go_pprof(&out);
    }
}

#[test]
fn collapsed_and_flamegraph_formats() {
    let Some(py) = python("3.12") else { return };
    let coll = tmp("c.txt");
    let o = Record::to(&coll)
        .duration("2")
        .args(["-f", "collapsed"])
        .command([
            py.to_str().unwrap(),
            "-X",
            "perf",
            testdata("split.py").to_str().unwrap(),
            "3",
        ])
        .run();
    assert!(o.status.success());
    let text = std::fs::read_to_string(&coll).unwrap();
    let mut total = 0u64;
    for line in text.lines() {
        let (stack, n) = line.rsplit_once(' ').expect("stack count");
        total += n.parse::<u64>().expect("count");
        assert!(!stack.is_empty());
    }
    // 2 s at 100 Hz: 200 samples of a whole CPU; a quarter of one on a busy machine.
    assert!(total > 40, "{total} samples");
    assert!(text.contains("<module> ("));
    assert!(text.contains(";hot_function ("));
    let svg = tmp("f.svg");
    let o = Record::to(&svg)
        .duration("2")
        .args(["-f", "flamegraph"])
        .command([
            py.to_str().unwrap(),
            "-X",
            "perf",
            testdata("split.py").to_str().unwrap(),
            "3",
        ])
        .run();
    assert!(o.status.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("hot_function"));
}

#[test]
fn bad_input_gives_one_clear_line_and_leaves_the_target_alone() {
    let o = run_perfpy(&[
        "record",
        "-p",
        "999999999",
        "-d",
        "1",
        "-o",
        tmp("x.pb.gz").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no process with pid 999999999"));

    let o = run_perfpy(&[
        "record",
        "-p",
        "2",
        "-d",
        "1",
        "-o",
        tmp("x.pb.gz").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("kernel thread"));

    for (args, msg) in [
        (vec!["record", "-p", "1", "-d", "abc"], "invalid duration"),
        (vec!["record", "-p", "1", "-d", "0"], "invalid duration"),
        (vec!["record", "-p", "1", "-r", "0"], "invalid rate"),
        (vec!["record", "-p", "1", "-r", "fast"], "invalid rate"),
        (vec!["record", "-d", "1"], "nothing to profile"),
    ] {
        let o = run_perfpy(&args);
        assert_ne!(o.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&o.stderr).contains(msg), "{args:?}");
    }

    // Unwritable output: refused before anything touches the target.
    let py = python("3.12").or_else(|| python("3.11"));
    let Some(py) = py else { return };
    let w = Workload::start(Command::new(&py).arg(testdata("split.py")).arg("30"));
    let o = run_perfpy(&[
        "record",
        "-p",
        &w.pid().to_string(),
        "-d",
        "1",
        "-o",
        "/nonexistent-dir/out.pb.gz",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot write the output file /nonexistent-dir/out.pb.gz"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(matches!(w.state(), 'R' | 'S'));
}

#[test]
fn a_target_that_exits_ends_the_run_with_its_profile() {
    let Some(py) = python("3.12") else { return };
    let w = Workload::start(Command::new(&py).arg(testdata("sleeper.py")).arg("1.5"));
    let out = tmp("exit.pb.gz");
    let t = Instant::now();
    let o = Record::to(&out).pid(w.pid()).duration("60").run();
    assert!(o.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?} to notice the exit",
        t.elapsed()
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("target exited"));
    decode(&out);
}

#[test]
fn sigint_and_sigterm_write_the_profile_and_exit_0() {
    let Some(py) = python("3.12") else { return };
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let w = Workload::start(
            Command::new(&py)
                .args(["-X", "perf"])
                .arg(testdata("split.py"))
                .arg("30"),
        );
        let out = tmp(&format!("sig{sig}.pb.gz"));
        let mut p = Command::new(perfpy())
            .args([
                "record",
                "-p",
                &w.pid().to_string(),
                "-o",
                out.to_str().unwrap(),
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: signalling the perfpy process this test started, by its pid.
        unsafe { libc::kill(p.id() as i32, sig) };
        let st = wait_exit(&mut p, Duration::from_secs(20))
            .expect("perfpy did not exit after the signal");
        assert_eq!(st.code(), Some(0), "signal {sig}");
        let d = decode(&out);
        // 1.5 s at 100 Hz: 150 samples of a whole CPU; a tenth of one on a busy machine.
        assert!(d.total() > 15, "signal {sig}: {} samples", d.total());
        assert!(d.count_where(|s| s.has("round_")) > 0);
        assert!(matches!(w.state(), 'R' | 'S'));
    }
}

#[test]
fn spawned_command_exit_status_is_reported() {
    let o = run_perfpy(&[
        "record",
        "-o",
        tmp("false.pb.gz").to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("command exited with status 3"));
    let o = run_perfpy(&[
        "record",
        "-o",
        tmp("nf.pb.gz").to_str().unwrap(),
        "--",
        "/nonexistent/prog",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("command not found"));
}

#[test]
fn children_forked_by_the_command_are_followed() {
    let Some(py) = python("3.12") else { return };
    // A shell that runs Python as a child (not exec): the child's samples must be there.
    let out = tmp("fork.pb.gz");
    let cmd = format!(
        "{} -X perf {} 2; true",
        py.display(),
        testdata("split.py").display()
    );
    let o = Record::to(&out).command(["sh", "-c", &cmd]).run();
    assert!(o.status.success());
    let d = decode(&out);
    assert!(
        d.count_where(|s| s.has("round_")) > 50,
        "samples of the forked python: {}",
        d.count_where(|s| s.has("round_"))
    );
}

#[test]
fn spawned_python_gets_perf_support_from_the_environment_only_when_asked() {
    // With --python-perf-env perfpy sets PYTHONPERFSUPPORT=1, so 3.12+ runs under its perf
    // trampoline (which names its frames too, from <module> on).
    let Some(py) = python("3.13") else { return };
    let out = tmp("env.pb.gz");
    let o = Record::to(&out)
        .duration("3")
        .arg("--python-perf-env")
        .command([
            py.to_str().unwrap(),
            testdata("split.py").to_str().unwrap(),
            "4",
        ])
        .run();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the trampoline (PYTHONPERFSUPPORT=1) was on too, not needed"),
        "{err}"
    );
    let d = decode(&out);
    let spin = d.count_where(|s| s.has("spin"));
    let full = d.count_where(|s| s.has("spin") && s.has_chain(&CHAIN));
    assert!(
        spin > 10 && full as f64 >= 0.9 * spin as f64,
        "{full} of {spin}"
    );
    // By default the environment is left alone where the eBPF walker runs: no trampoline (no
    // perf map written), the names come from the walker alone, with lines.
    let out = tmp("noenv.pb.gz");
    let o = Record::to(&out)
        .duration("2")
        .rate(397)
        .command([
            py.to_str().unwrap(),
            testdata("split.py").to_str().unwrap(),
            "3",
        ])
        .run();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Python frames from the eBPF walker, no trampoline"),
        "{err}"
    );
    let d = decode(&out);
    let spin = d.count_where(|s| s.has("spin"));
    assert!(spin > 50);
    assert_eq!(
        d.count_where(|s| s.has("spin") && s.str_labels["frames_from"] != "ebpf"),
        0
    );
    // The walker gives lines: the hot loop of spin.
    assert_spin_in_its_loop(&d, "walker");
    // Without the walker the trampoline is the fallback: the environment is set again.
    let out = tmp("env-noebpf.pb.gz");
    let o = Record::to(&out)
        .duration("2")
        .arg("--no-ebpf")
        .command([
            py.to_str().unwrap(),
            testdata("split.py").to_str().unwrap(),
            "3",
        ])
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    let spin = d.count_where(|s| s.has("spin"));
    assert!(
        spin > 10
            && d.count_where(|s| s.has("spin") && s.str_labels["frames_from"] == "trampoline")
                == spin,
        "{spin}"
    );
}

/// The program's own CPU split of `generators.py` (build / iterate), and perfpy's if `out`.
fn generators_split(
    py: &std::path::Path,
    name: &str,
    perfpy_args: Option<&[&str]>,
) -> (f64, Option<f64>) {
    let rep = split_report(name);
    let script = testdata("generators.py");
    let args = [py.to_str().unwrap(), script.to_str().unwrap(), "3"];
    let ours = match perfpy_args {
        None => {
            let o = Command::new(args[0])
                .args(&args[1..])
                .env("SPLIT_REPORT", &rep)
                .output()
                .unwrap();
            assert!(o.status.success());
            None
        }
        Some(extra) => {
            let out = tmp(&format!("{name}.pb.gz"));
            let mut a = vec!["record", "-r", "499", "-o", out.to_str().unwrap()];
            a.extend_from_slice(extra);
            a.push("--");
            a.extend_from_slice(&args);
            let o = run_perfpy_env(&a, &[("SPLIT_REPORT", &rep)]);
            assert!(o.status.success());
            let d = decode(&out);
            let build = d.count_where(|s| s.has("build_tree")) as f64;
            let iterate = d.count_where(|s| s.has("iterate_tree")) as f64;
            // 3 s of CPU (the workload counts CPU time) at 499 Hz: ~1,500 samples.
            assert!(build + iterate > 500.0, "{build} + {iterate} samples");
            Some(build / (build + iterate))
        }
    };
    (measured_split(&rep)["build_tree"], ours)
}

#[test]
fn a_launched_program_is_profiled_without_the_trampoline_distorting_it() {
    // pyperformance's `generators`: under a perf trampoline resuming a generator costs about
    // twice as much, so the program's own build/iterate split moves by ~20 points. By default
    // perfpy names its frames with the eBPF walker and leaves the program as it runs alone.
    for minor in ["3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let (alone, _) = generators_split(&py, &format!("gen-alone-{minor}"), None);
        let (own, got) = generators_split(&py, &format!("gen-default-{minor}"), Some(&[]));
        let got = got.unwrap();
        eprintln!("{minor}: build alone {alone:.3}, under perfpy {own:.3}, perfpy says {got:.3}");
        assert!(
            (got - own).abs() <= 0.03,
            "{minor}: perfpy {got:.3}, program {own:.3}"
        );
        assert!(
            (own - alone).abs() <= 0.05,
            "{minor}: under perfpy {own:.3}, alone {alone:.3}"
        );
        // The distortion the default avoids is real (so the check above could fail): asked
        // for, the trampoline moves the program's own split, and perfpy reports that.
        let (own_t, got_t) = generators_split(
            &py,
            &format!("gen-env-{minor}"),
            Some(&["--python-perf-env"]),
        );
        let got_t = got_t.unwrap();
        eprintln!("{minor}: with the trampoline: program {own_t:.3}, perfpy {got_t:.3}");
        assert!(
            alone - own_t >= 0.10,
            "{minor}: {own_t:.3} vs {alone:.3} alone"
        );
        assert!(
            (got_t - own_t).abs() <= 0.03,
            "{minor}: perfpy {got_t:.3}, program {own_t:.3}"
        );
    }
}

#[test]
fn deep_stacks_are_marked_truncated_not_wrong() {
    let Some(py) = python("3.12") else { return };
    // Launched with the perf trampoline on (each Python call a C-level call, ~500 bytes of C
    // stack: 300 levels are far deeper than the 16 KiB copy). With the walker: whole, and the
    // summary says the stacks are deeper than the copy, not incomplete. With the walker's
    // limit below the depth, or without the walker: the inner frames, a marker naming the
    // limit that cut and the option that raises it, the same in the summary.
    let walker_limit = "[truncated: more Python frames than --max-python-frames]";
    let copy_end = "[truncated: end of the native stack copy, raise --stack-size]";
    for (name, extra, marker, said) in [
        ("walker", &[][..], None, "deeper than the native stack copy"),
        (
            "limit",
            &["--max-python-frames", "100"][..],
            Some(walker_limit),
            "truncated at the eBPF walker's Python frame limit (raise --max-python-frames)",
        ),
        (
            "no-ebpf",
            &["--no-ebpf"][..],
            Some(copy_end),
            "truncated at the native stack copy's end (raise --stack-size, max 65000)",
        ),
    ] {
        let depth = 300;
        let out = tmp(&format!("deep-{name}.pb.gz"));
        let t = Instant::now();
        let mut args = vec![
            "record",
            "-d",
            "2",
            "-r",
            "497",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let deep = testdata("deep.py");
        args.extend([
            "--",
            py.to_str().unwrap(),
            "-X",
            "perf",
            deep.to_str().unwrap(),
        ]);
        args.extend(["300", "30"]);
        let o = run_perfpy(&args);
        assert!(o.status.success());
        // The duration ends the launched command too.
        assert!(t.elapsed() < Duration::from_secs(10));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(said), "{name}: {err}");
        let d = decode(&out);
        let leaf = d.count_where(|s| s.has("rec"));
        assert!(leaf > 100, "{name}: {leaf} samples in rec");
        let marked = |m: &str| d.count_where(|s| s.frames.last().is_some_and(|f| f.function == m));
        let recs = |s: &Sample| s.frames.iter().filter(|f| f.function == "rec").count();
        let s = d
            .samples
            .iter()
            .filter(|s| s.has("rec"))
            .max_by_key(|s| s.count)
            .unwrap();
        match marker {
            Some(m) => {
                let n = marked(m);
                assert!(
                    n as f64 >= 0.9 * leaf as f64,
                    "{name}: {n} of {leaf} marked"
                );
                // The frames that are there are right: rec calling rec, innermost first.
                assert!(recs(s) >= 50, "{name}: {:?}", s.names());
                if m == walker_limit {
                    assert_eq!(recs(s), 100, "{name}");
                }
            }
            None => {
                // A sample whose walker record is missing (its ring full on a busy machine) is
                // cut at the stack copy, and says so: rare, never wrong.
                let any = d.count_where(|s| s.names().iter().any(|f| f.starts_with("[truncated")));
                assert!(
                    any as f64 <= 0.01 * leaf as f64,
                    "{name}: {any} of {leaf} truncated"
                );
                let rooted = d.count_where(|s| s.has("rec") && s.has("<module>"));
                assert!(rooted as f64 >= 0.9 * leaf as f64, "{rooted} of {leaf}");
                assert_eq!(recs(s), depth + 1);
                // Deeper than the copy is not incomplete: the walker gave every Python frame.
                let incomplete: f64 = err
                    .split(" stacks incomplete (")
                    .nth(1)
                    .and_then(|r| r.split('%').next())
                    .and_then(|p| p.parse().ok())
                    .expect("the summary's incomplete share");
                assert!(incomplete < 5.0, "{err}");
            }
        }
    }
}
