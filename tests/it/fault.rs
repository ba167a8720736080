//! Fault injection: perfpy interrupted, killed or left by its target at random moments, over
//! many runs with a fixed seed. After each run the target must be running, not stopped, not
//! traced, still able to run Python (asked through an injection of its own), with its perf
//! trampoline in the state it was found; an exit status 0 must come with a valid profile.
//! Every test prints its counts (runs, outcomes, failures).

use perfpy_test_support as common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// xorshift64*: a fixed sequence, so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a target must look like after perfpy has gone: alive, not stopped, not traced.
fn assert_unharmed(pid: i32, what: &str) {
    // SAFETY: signal 0 only checks that the process exists; `pid` is a process this test
    // started and has not reaped.
    let exists = unsafe { libc::kill(pid, 0) };
    assert_eq!(exists, 0, "{what}: target {pid} is gone");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        field("TracerPid:"),
        "0",
        "{what}: target {pid} still traced"
    );
    // Every thread: none stopped (T) or in a trace stop (t), none dead.
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = t.unwrap().file_name().to_string_lossy().parse().unwrap();
        let state =
            perfpy_process::proc::task_stat(pid as u32, tid as u32).map_or('?', |s| s.state);
        assert!(
            !matches!(state, 'T' | 't' | 'Z' | 'X'),
            "{what}: thread {tid} of {pid} in state {state}"
        );
    }
}

/// The trampoline's state, asked inside the target: this also proves that its interpreter
/// still runs Python code and that nobody holds its GIL for good.
fn trampoline_on(pid: i32, what: &str) -> bool {
    let o = Command::new(perfpy())
        .args(["inject", "-p", &pid.to_string(), "--status"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what}: status of {pid} failed: {text}");
    if text.contains("trampoline on") {
        true
    } else {
        assert!(text.contains("trampoline off"), "{what}: {text}");
        false
    }
}

fn set_trampoline(pid: i32, on: bool) {
    let mut args = vec!["inject".to_string(), "-p".into(), pid.to_string()];
    if !on {
        args.push("--deactivate".into());
    }
    let o = Command::new(perfpy()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

struct Target {
    w: Workload,
    name: &'static str,
    /// The trampoline's state as the target was found by each run.
    on: bool,
}

/// Targets of every kind injection meets: busy (pending-call path) and blocked in a system
/// call (direct path), each with the trampoline off and on (`-X perf`, which must stay on).
fn targets(py: &std::path::Path) -> Vec<Target> {
    let start = |args: &[&str]| {
        let mut c = Command::new(py);
        // A pipe on stdin that stays open: the blocked target waits on it.
        c.args(args).stdin(Stdio::piped());
        Workload::start(&mut c)
    };
    let split = testdata("split.py");
    let split = split.to_str().unwrap();
    let sleeper = testdata("inject_target.py");
    let sleeper = sleeper.to_str().unwrap();
    vec![
        Target {
            w: start(&[split, "600"]),
            name: "busy",
            on: false,
        },
        Target {
            w: start(&["-X", "perf", split, "600"]),
            name: "busy -X perf",
            on: true,
        },
        Target {
            w: start(&[sleeper, "pipe"]),
            name: "blocked",
            on: false,
        },
        Target {
            w: start(&["-X", "perf", sleeper, "pipe"]),
            name: "blocked -X perf",
            on: true,
        },
    ]
}

/// perfpy started with stderr read by a thread (so that it never blocks on a full pipe);
/// `ready` is signalled when it says it is sampling.
fn spawn_perfpy(
    args: &[String],
) -> (
    Child,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = Command::new(perfpy())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (all_tx, all_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("perfpy: sampling") {
                let _ = ready_tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        let _ = all_tx.send(text);
    });
    (child, ready_rx, all_rx)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: a signal to the perfpy process this test started (not yet reaped).
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn signals_at_random_moments_leave_targets_as_found() {
    let Some(py) = python("3.12") else { return };
    let mut targets = targets(&py);
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    const RUNS: usize = 32;
    let sigs = [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ];
    let (mut exit0, mut nonzero, mut after_end) = (0, 0, 0);
    let mut by_sig = [0usize; 3];
    for run in 0..RUNS {
        let ti = rng.below(targets.len() as u64) as usize;
        let t = &mut targets[ti];
        let pid = t.w.pid();
        let (si, delay) = (rng.below(3) as usize, rng.below(2600));
        by_sig[si] += 1;
        let what = format!(
            "run {run}: {} to perfpy after {delay} ms, target {}",
            sigs[si].1, t.name
        );
        let out = tmp(&format!("fault-signal-{run}.pb.gz"));
        let _ = std::fs::remove_file(&out);
        // A 2-second recording: the delays reach the attach, the injection, sampling, and the
        // end (symbolization, deactivation) that follows at about 2 s.
        let args: Vec<String> = [
            "record",
            "-p",
            &pid.to_string(),
            "--inject-python",
            "-d",
            "2",
            "-r",
            "997",
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (mut child, _ready, all) = spawn_perfpy(&args);
        std::thread::sleep(Duration::from_millis(delay));
        let already = child.try_wait().unwrap().is_some();
        if !already {
            signal(child.id(), sigs[si].0);
        } else {
            after_end += 1;
        }
        let status = wait_exit(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{what}: perfpy did not exit"));
        let stderr = all.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert_unharmed(pid, &what);
        assert_eq!(
            trampoline_on(pid, &what),
            t.on,
            "{what}: trampoline not as found\n{stderr}"
        );
        if status.success() {
            exit0 += 1;
            // A complete profile (decode fails on a partial one); it may hold no sample when
            // the fault came before the first one.
            decode(&out);
        } else {
            nonzero += 1;
            // A non-zero exit says why.
            assert!(
                stderr.contains("perfpy:"),
                "{what}: exit {status:?} without a message\n{stderr}"
            );
        }
    }
    eprintln!(
        "fault: {RUNS} runs (SIGINT {}, SIGTERM {}, SIGHUP {}; {after_end} after perfpy had ended): {exit0} exited 0 with a valid profile, {nonzero} non-zero with a message; 0 failures",
        by_sig[0], by_sig[1], by_sig[2]
    );
    assert_eq!(exit0 + nonzero, RUNS);
}

#[test]
fn sigkill_mid_injection_leaves_a_working_target() {
    let Some(py) = python("3.12") else { return };
    let targets = targets(&py);
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    const RUNS: usize = 16;
    let (mut on_after, mut off_after) = (0, 0);
    // How long a whole `perfpy inject` takes on each (start-up and discovery included): the
    // delays are spread over it, so that they fall before, inside and after the injection.
    let full: Vec<u64> = [0, 2]
        .iter()
        .map(|&i| {
            let pid = targets[i].w.pid();
            let t0 = Instant::now();
            set_trampoline(pid, true);
            let us = t0.elapsed().as_micros() as u64;
            set_trampoline(pid, false);
            us
        })
        .collect();
    for run in 0..RUNS {
        // The targets that start with the trampoline off: an activation is in progress.
        let t = &targets[[0, 2][run % 2]];
        let pid = t.w.pid();
        let delay = rng.below(full[run % 2] + 1);
        let what = format!(
            "run {run}: SIGKILL to `perfpy inject` after {delay} µs, target {}",
            t.name
        );
        let mut child = Command::new(perfpy())
            .args(["inject", "-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill();
        let _ = child.wait();
        // The kernel detaches a dead tracer's threads; give a call in flight time to return.
        std::thread::sleep(Duration::from_millis(300));
        assert_unharmed(pid, &what);
        // On or off, but working; and `inject --deactivate` restores it.
        if trampoline_on(pid, &what) {
            on_after += 1;
            set_trampoline(pid, false);
        } else {
            off_after += 1;
        }
        assert!(
            !trampoline_on(pid, &what),
            "{what}: still on after --deactivate"
        );
        assert_unharmed(pid, &what);
    }
    eprintln!("fault: {RUNS} SIGKILLs of `perfpy inject` within its {full:?} µs (busy, blocked): targets all running, {on_after} left on (then turned off with --deactivate), {off_after} left off; 0 failures");
}

#[test]
fn sigkill_mid_recording_then_info_and_deactivate() {
    let Some(py) = python("3.12") else { return };
    let split = testdata("split.py");
    let w = Workload::start(Command::new(&py).args([split.to_str().unwrap(), "600"]));
    let pid = w.pid();
    let out = tmp("fault-kill.pb.gz");
    let args: Vec<String> = [
        "record",
        "-p",
        &pid.to_string(),
        "--inject-python",
        "-o",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut child, ready, _all) = spawn_perfpy(&args);
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("perfpy started sampling");
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_unharmed(pid, "after SIGKILL mid-recording");
    // Nobody turned the trampoline off: info says so, and how to.
    let info = Command::new(perfpy())
        .args(["info", "-p", &pid.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success());
    assert!(
        text.contains("trampoline on")
            && text.contains(&format!("perfpy inject -p {pid} --deactivate")),
        "{text}"
    );
    set_trampoline(pid, false);
    assert!(!trampoline_on(pid, "after --deactivate"));
    assert_unharmed(pid, "after --deactivate");
    eprintln!("fault: SIGKILL mid-recording: target running, info showed the trampoline on with the command to turn it off, --deactivate turned it off");
}

#[test]
fn target_killed_at_random_moments_ends_the_recording_cleanly() {
    let Some(py) = python("3.12") else { return };
    let mut rng = Rng(0xdead_beef_0bad_f00d);
    const RUNS: usize = 8;
    let split = testdata("split.py");
    for run in 0..RUNS {
        let mut c = Command::new(&py);
        c.args([split.to_str().unwrap(), "600"]);
        let mut w = Workload::start(&mut c);
        let pid = w.pid();
        let delay = rng.below(1500);
        let what = format!("run {run}: target killed {delay} ms after perfpy started");
        let out = tmp(&format!("fault-target-{run}.pb.gz"));
        let _ = std::fs::remove_file(&out);
        let args: Vec<String> = [
            "record",
            "-p",
            &pid.to_string(),
            "--inject-python",
            "-d",
            "30",
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let t0 = Instant::now();
        let (mut child, _ready, all) = spawn_perfpy(&args);
        std::thread::sleep(Duration::from_millis(delay));
        w.child.kill().unwrap();
        w.child.wait().unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{what}: perfpy did not end"));
        let stderr = all.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        // Well before the 30 s asked for: the target's end ends the recording.
        assert!(t0.elapsed() < Duration::from_secs(15), "{what}");
        if status.success() {
            assert!(stderr.contains("target exited"), "{what}: {stderr}");
            decode(&out);
        } else {
            // Gone before sampling or injection could start: said so.
            assert!(stderr.contains(&pid.to_string()), "{what}: {stderr}");
            assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        }
    }
    eprintln!("fault: {RUNS} targets killed at random moments of attach, injection and recording: perfpy ended each cleanly; 0 failures");
}
