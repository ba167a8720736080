//! Injection against real targets started by this test: every state users have (busy, asleep,
//! blocked on a pipe, many allocating threads, receiving signals), repeated on/off cycles, the
//! target's own view of the result, and that it is left running, untraced and unchanged.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use perfpy_inject::{
    activate, deactivate, discover, registry, trampoline_active, ActivateOutcome, Reason,
};
use perfpy_test_support::python;

const T: Duration = Duration::from_secs(10);

fn target_script() -> PathBuf {
    perfpy_test_support::testdata("inject_target.py")
}

struct Target {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Target {
    fn start(py: &Path, args: &[&str], mode: &str) -> Target {
        let mut child = Command::new(py)
            .args(args)
            .arg(target_script())
            .arg(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "{line}");
        Target { child, stdin, out }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
    fn assert_untouched(&self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let get = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        };
        assert_eq!(get("TracerPid:"), "0", "left traced");
        let state = get("State:");
        assert!(state == "R" || state == "S", "left in state {state}");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_target_state_survives_repeated_cycles() {
    let Some(py) = python("3.12") else { return };
    let expected = (0..10000u64).map(|i| i * i).sum::<u64>().to_string();
    for mode in ["pipe", "sleep", "busy", "threads"] {
        let mut t = Target::start(&py, &[], mode);
        let p = discover(t.pid()).unwrap();
        assert_eq!(p.version.minor_pair(), (3, 12));
        for cycle in 0..3 {
            let started = Instant::now();
            assert_eq!(
                activate(&p, T).unwrap(),
                ActivateOutcome::Activated,
                "{mode} cycle {cycle}"
            );
            eprintln!("{mode}: activate took {:?}", started.elapsed());
            assert_eq!(t.ask("state"), "1", "{mode} cycle {cycle}");
            assert!(trampoline_active(&p, T).unwrap());
            deactivate(&p, T).unwrap();
            assert_eq!(t.ask("state"), "0", "{mode} cycle {cycle}");
            assert_eq!(t.ask("check"), expected, "{mode}: computation changed");
        }
        if mode == "sleep" {
            let ratio: f64 = t.ask("slept").parse().unwrap();
            assert!(ratio >= 0.99, "a sleep returned early: {ratio}");
        }
        t.assert_untouched();
        // No result files left in the target's /tmp (other tests of this process may have one
        // for a moment: they must all be gone within a second).
        let left = || {
            std::fs::read_dir("/tmp")
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!(".perfpy-inject-{}", std::process::id()))
                })
                .count()
        };
        let t0 = Instant::now();
        while left() != 0 && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(left(), 0);
    }
}

#[test]
fn signals_during_injection_are_delivered() {
    let Some(py) = python("3.13") else { return };
    let mut t = Target::start(&py, &[], "signals");
    let p = discover(t.pid()).unwrap();
    let pid = t.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let mut sent = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: signalling the target this test started, by pid.
            unsafe { libc::kill(pid, libc::SIGRTMIN()) };
            sent += 1;
            std::thread::sleep(Duration::from_millis(15));
        }
        sent
    });
    for _ in 0..5 {
        activate(&p, T).unwrap();
        deactivate(&p, T).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = sender.join().unwrap();
    // A busy (or loaded) target may take a moment to run the handlers of the last ones.
    let t0 = Instant::now();
    let mut got: u64 = t.ask("count").parse().unwrap();
    while got < sent && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        got = t.ask("count").parse().unwrap();
    }
    assert_eq!(got, sent, "signals lost");
    assert_eq!(t.ask("state"), "0");
    t.assert_untouched();
}

/// The registry is one per process: tests that drain it run one at a time.
static REGISTRY_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_target_started_with_x_perf_keeps_its_trampoline() {
    let _one = REGISTRY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(py) = python("3.13") else { return };
    let mut t = Target::start(&py, &["-X", "perf"], "busy");
    let p = discover(t.pid()).unwrap();
    assert_eq!(
        registry().activate(&p, T).unwrap(),
        ActivateOutcome::AlreadyActive
    );
    assert!(registry().pids().is_empty());
    // Released without being turned off: it was the target's own.
    let r = registry().deactivate_all(T);
    assert_eq!(r.len(), 1);
    assert!(
        matches!(r[0].1, Ok(perfpy_inject::Released::LeftAsFound)),
        "{r:?}"
    );
    assert_eq!(t.ask("state"), "1");
    t.assert_untouched();
}

#[test]
fn registry_turns_off_what_it_turned_on() {
    let _one = REGISTRY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(py) = python("3.12") else { return };
    let mut t = Target::start(&py, &[], "pipe");
    let p = discover(t.pid()).unwrap();
    assert_eq!(
        registry().activate(&p, T).unwrap(),
        ActivateOutcome::Activated
    );
    assert_eq!(t.ask("state"), "1");
    let r = registry().deactivate_all(T);
    assert_eq!(r.len(), 1);
    assert!(
        matches!(r[0].1, Ok(perfpy_inject::Released::TurnedOff)),
        "{r:?}"
    );
    assert_eq!(t.ask("state"), "0");
}

#[test]
fn refusals_name_their_reason() {
    if let Some(py) = python("3.11") {
        let t = Target::start(&py, &[], "busy");
        let p = discover(t.pid()).unwrap();
        assert_eq!(p.version.minor_pair(), (3, 11));
        let e = activate(&p, T).unwrap_err();
        assert_eq!(e.reason(), Some(Reason::PythonTooOld));
        assert!(e.to_string().starts_with("python_too_old"));
        t.assert_untouched();
    }
    // Debian's python3.11: libpython in the executable.
    if Path::new("/usr/bin/python3.11").exists() {
        let t = Target::start(Path::new("/usr/bin/python3.11"), &[], "busy");
        let p = discover(t.pid()).unwrap();
        assert!(p.in_executable);
        assert_eq!(p.version.minor_pair(), (3, 11));
        assert!(p.symbol("PyGILState_Ensure").is_some());
        assert_eq!(
            activate(&p, T).unwrap_err().reason(),
            Some(Reason::PythonTooOld)
        );
    }
    let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
    let e = discover(sleep.id() as i32).unwrap_err();
    assert_eq!(e.reason(), Some(Reason::NotPython));
    let _ = sleep.kill();
    let _ = sleep.wait();
    let e = discover(sleep.id() as i32).unwrap_err();
    assert_eq!(e.reason(), Some(Reason::ProcessGone));
}

#[test]
fn symbols_and_load_bias_of_every_installed_version() {
    for minor in [
        "2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13",
    ] {
        let Some(py) = python(minor) else { continue };
        let mut c = Command::new(&py)
            .args([
                "-c",
                "import sys,time; print('ready'); sys.stdout.flush(); time.sleep(30)",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let p = discover(c.id() as i32).unwrap();
        let want: Vec<u8> = minor.split('.').map(|v| v.parse().unwrap()).collect();
        assert_eq!(p.version.minor_pair(), (want[0], want[1]), "{minor}");
        // The load bias agrees with the mapping of the symbol's page in /proc/PID/maps.
        let ensure = p.symbol("PyGILState_Ensure").unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", c.id())).unwrap();
        let inside = maps.lines().any(|l| {
            let (r, rest) = l.split_once(' ').unwrap();
            let (a, b) = r.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            a <= ensure && ensure < b && rest.contains("x") && l.contains(&p.interpreter_name)
        });
        assert!(
            inside,
            "{minor}: PyGILState_Ensure at {ensure:#x} not in an executable mapping of {}",
            p.interpreter_name
        );
        if want >= vec![3, 12] {
            assert!(p.symbol("_Py_trampoline_func_start").is_some());
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn registers_round_trip_through_a_call() {
    // Attach to a thread waiting in read(), call a function in it, release; attach again: the
    // thread is back in the same system call with the same registers.
    let Some(py) = python("3.12") else { return };
    let t = Target::start(&py, &[], "pipe");
    let pid = t.pid();
    let p = discover(pid).unwrap();
    let regs = |pid: i32| perfpy_inject::run::snapshot(pid, pid).unwrap();
    // "ready" is printed before the thread reaches read(): wait until it is there.
    let in_read = || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some("0"))
    };
    let t0 = Instant::now();
    while !in_read() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(in_read(), "the target never waited in read()");
    let before = regs(pid);
    perfpy_inject::run::call_once(&p, pid, "PyGILState_Check").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let after = regs(pid);
    assert_eq!(before, after, "registers changed across an injected call");
    t.assert_untouched();
}

#[test]
fn a_target_killed_during_injection_is_an_error_not_a_hang() {
    let Some(py) = python("3.12") else { return };
    for delay_ms in [0u64, 2, 5, 20] {
        let t = Target::start(&py, &[], "threads");
        let pid = t.pid();
        let p = discover(pid).unwrap();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            // SAFETY: killing the target this test started, by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let started = Instant::now();
        let r = activate(&p, T);
        killer.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "hung for {:?}",
            started.elapsed()
        );
        if let Err(e) = r {
            let msg = e.to_string();
            assert!(
                e.reason() == Some(Reason::ProcessGone)
                    || msg.contains("exited")
                    || msg.contains("no result"),
                "delay {delay_ms} ms: {msg}"
            );
        }
    }
}
