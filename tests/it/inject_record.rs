//! `perfpy record --inject-python` and `perfpy inject` against targets this test starts.

use perfpy_test_support as common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn active(pid: i32) -> bool {
    let p = perfpy_inject::discover(pid).unwrap();
    perfpy_inject::trampoline_active(&p, Duration::from_secs(10)).unwrap()
}

#[test]
fn record_with_injection_names_python_and_restores_the_trampoline() {
    for minor in ["3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let rep = split_report(&format!("inject-{minor}"));
        let w = Workload::start(
            Command::new(&py)
                .arg(testdata("split.py"))
                .arg("30")
                .env("SPLIT_REPORT", &rep),
        );
        assert!(!active(w.pid()));
        let out = tmp(&format!("inject-{minor}.pb.gz"));
        let o = Record::to(&out)
            .pid(w.pid())
            .duration("4")
            .rate(497)
            .arg("--inject-python")
            .run();
        assert!(o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("perf trampoline turned on") && err.contains("turned off again"),
            "{err}"
        );
        let d = decode(&out);
        // Functions called after activation are named; round_ is entered anew every round.
        let rounds = d.count_where(|s| s.has("round_"));
        assert!(
            // The samples before the activation completes (longer on a busy machine) have
            // no Python frame.
            rounds as f64 > 0.7 * d.total() as f64,
            "{minor}: {rounds} of {} samples in round_",
            d.total()
        );
        let m = measured_split(&rep);
        for f in [
            "hot_function",
            "Shape.area",
            "make_closure.<locals>.inner",
            "hash_work",
        ] {
            let want = m[f];
            let got = d.count_where(|s| s.has(f)) as f64 / rounds as f64;
            assert!(
                (got - want).abs() <= 0.05,
                "{minor}: {f}: {:.1}%",
                got * 100.0
            );
        }
        assert!(d.count_where(|s| s.has_chain(&["round_", "hot_function", "spin"])) > 0);
        // Back off afterwards, target running and untraced.
        assert!(!active(w.pid()), "{minor}: trampoline left on");
        assert!(matches!(w.state(), 'R' | 'S'));
        let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid())).unwrap();
        assert!(status.contains("TracerPid:\t0"));
        check_go_pprof(&out);
    }
}

#[test]
fn injection_alone_names_functions_from_the_perf_map() {
    // Without the eBPF walker, the names come from the perf map the activated trampoline writes.
    for minor in ["3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let rep = split_report(&format!("inject-map-{minor}"));
        let w = Workload::start(
            Command::new(&py)
                .arg(testdata("split.py"))
                .arg("30")
                .env("SPLIT_REPORT", &rep),
        );
        let out = tmp(&format!("inject-map-{minor}.pb.gz"));
        let o = Record::to(&out)
            .pid(w.pid())
            .duration("3")
            .rate(497)
            .args(["--no-ebpf", "--inject-python"])
            .run();
        assert!(o.status.success());
        let d = decode(&out);
        let rounds = d.count_where(|s| s.has("round_"));
        assert!(
            // The samples before the activation completes (longer on a busy machine) have
            // no Python frame.
            rounds as f64 > 0.7 * d.total() as f64,
            "{minor}: {rounds} of {}",
            d.total()
        );
        assert_eq!(
            d.count_where(|s| s.has("round_") && s.str_labels["frames_from"] != "trampoline"),
            0
        );
        let m = measured_split(&rep);
        for f in [
            "hot_function",
            "Shape.area",
            "make_closure.<locals>.inner",
            "hash_work",
        ] {
            let want = m[f];
            let got = d.count_where(|s| s.has(f)) as f64 / rounds as f64;
            assert!(
                (got - want).abs() <= 0.05,
                "{minor}: {f}: {:.1}%",
                got * 100.0
            );
        }
        // Entered before activation: not wrapped, so not named on this path.
        assert_eq!(d.count_where(|s| s.has("<module>")), 0);
        assert!(!active(w.pid()));
    }
}

#[test]
fn a_target_started_with_x_perf_keeps_its_trampoline_on() {
    let Some(py) = python("3.12") else { return };
    let w = Workload::start(
        Command::new(&py)
            .args(["-X", "perf"])
            .arg(testdata("split.py"))
            .arg("30"),
    );
    let out = tmp("xperf-inject.pb.gz");
    let o = Record::to(&out)
        .pid(w.pid())
        .duration("2")
        .arg("--inject-python")
        .run();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already on"));
    assert!(active(w.pid()));
    // With -X perf everything is named, from <module> on.
    let d = decode(&out);
    assert!(
        d.count_where(|s| s.has_chain(&["<module>", "main", "round_"])) as f64
            > 0.8 * d.total() as f64
    );
}

#[test]
fn sigterm_during_a_recording_with_injection_turns_it_off() {
    let Some(py) = python("3.13") else { return };
    let w = Workload::start(Command::new(&py).arg(testdata("split.py")).arg("30"));
    let out = tmp("inject-term.pb.gz");
    let mut p = Command::new(perfpy())
        .args([
            "record",
            "-p",
            &w.pid().to_string(),
            "--inject-python",
            "-o",
            out.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling the perfpy process this test started.
    unsafe { libc::kill(p.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut p, Duration::from_secs(20)).expect("perfpy did not exit");
    assert_eq!(st.code(), Some(0));
    assert!(!active(w.pid()));
    assert!(decode(&out).count_where(|s| s.has("round_")) > 0);
}

#[test]
fn injection_refusals_stop_the_run_before_sampling() {
    // 3.11: too old, the reason named, exit 1, nothing written, target untouched.
    if let Some(py) = python("3.11") {
        let w = Workload::start(Command::new(&py).arg(testdata("split.py")).arg("30"));
        let out = tmp("old.pb.gz");
        let o = Record::to(&out)
            .pid(w.pid())
            .duration("1")
            .arg("--inject-python")
            .run();
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("python_too_old"));
        assert!(matches!(w.state(), 'R' | 'S'));
    }
    // Not Python.
    let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
    let o = run_perfpy(&[
        "record",
        "-p",
        &sleep.id().to_string(),
        "-d",
        "1",
        "--inject-python",
        "-o",
        tmp("np.pb.gz").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_python"));
    let o = run_perfpy(&["inject", "-p", &sleep.id().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_python"));
    let _ = sleep.kill();
    let _ = sleep.wait();
    // A pid that is gone.
    let o = run_perfpy(&["inject", "-p", &sleep.id().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no process"));
}

#[test]
fn inject_command_turns_it_on_and_off() {
    let Some(py) = python("3.12") else { return };
    let w = Workload::start(Command::new(&py).arg(testdata("split.py")).arg("30"));
    let pid = w.pid().to_string();
    let o = run_perfpy(&["inject", "-p", &pid]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("perf trampoline on"));
    assert!(active(w.pid()));
    let o = run_perfpy(&["inject", "-p", &pid]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("already on"));
    let o = run_perfpy(&["inject", "-p", &pid, "--deactivate"]);
    assert!(o.status.success());
    assert!(!active(w.pid()));
}

#[test]
fn a_c_extension_call_keeps_its_share_when_attached_with_injection() {
    // 10% of the work hashes in hashlib (long C calls: the activation's pending call waits for
    // them). Every sample from the first one has its Python frames (the walker knows the
    // target before the trampoline is turned on), so the C call keeps its share.
    for minor in ["3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let rep = split_report(&format!("hashing-{minor}"));
        let w = Workload::start(
            Command::new(&py)
                .arg(testdata("hashing.py"))
                .arg("30")
                .env("SPLIT_REPORT", &rep),
        );
        let out = tmp(&format!("hashing-{minor}.pb.gz"));
        let o = Record::to(&out)
            .pid(w.pid())
            .duration("4")
            .rate(997)
            .arg("--inject-python")
            .run();
        assert!(o.status.success());
        let d = decode(&out);
        let total = d.total();
        let no_python = d.count_where(|s| !s.frames.iter().any(|f| f.file.ends_with(".py")));
        assert!(
            (no_python as f64) < 0.02 * total as f64,
            "{minor}: {no_python} of {total} samples name no Python function"
        );
        let hashing = d.count_where(|s| s.has("hash_blocks")) as f64;
        let work = hashing + d.count_where(|s| s.has("compute")) as f64;
        let got = hashing / work;
        let want = measured_split(&rep)["hash_blocks"];
        eprintln!("{minor}: hash_blocks {got:.3}, measured {want:.3}");
        assert!(
            (got - want).abs() <= 0.02,
            "{minor}: hash_blocks {:.1}% of the samples, {:.1}% of the CPU",
            got * 100.0,
            want * 100.0
        );
        // The C extension's frames stay under their Python caller.
        assert!(
            d.count_where(|s| s.has_chain(&["hash_blocks", "SHA256_Update"])) as f64
                >= 0.5 * hashing,
            "{minor}: libcrypto not under hash_blocks"
        );
        assert!(!active(w.pid()), "{minor}: trampoline left on");
    }
}
