//! Several `perfpy record --inject-python` sessions on one target, ending in every order, one
//! of them SIGKILLed: each keeps Python names for its whole run, and the trampoline ends as it
//! was found once the last one is gone. `--no-ebpf`, so that names come from the trampoline
//! alone. "Keeps its names": >= 80% of its samples have Python frames (the session that turns
//! the trampoline on misses the frames entered before; a session whose trampoline was turned
//! off under it kept 58% in the report that led to this test).

use perfpy_test_support as common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn active(pid: i32) -> bool {
    let p = perfpy_inject::discover(pid).unwrap();
    perfpy_inject::trampoline_active(&p, Duration::from_secs(10)).unwrap()
}

struct Session {
    child: Child,
    out: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Session {
    /// Starts a recording and waits until it samples (its trampoline is on by then).
    fn start(name: &str, pid: i32, secs: &str) -> Session {
        let out = tmp(&format!("session-{name}.pb.gz"));
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new(perfpy())
            .args([
                "record",
                "-p",
                &pid.to_string(),
                "--inject-python",
                "--no-ebpf",
            ])
            .args(["-d", secs, "-r", "499", "-o"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let (r, acc) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if line.contains("sampling") {
                    let _ = tx.send(());
                }
                let mut a = acc.lock().unwrap();
                a.push_str(&line);
                a.push('\n');
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not start: {}", stderr.lock().unwrap()));
        Session { child, out, stderr }
    }

    /// Waits for its end; returns its messages and the share of its samples with Python frames.
    fn finish(mut self, name: &str) -> (String, f64) {
        let st = wait_exit(&mut self.child, Duration::from_secs(60)).expect("session ended");
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.lock().unwrap().clone();
        eprintln!("--- {name}\n{err}");
        assert!(st.success(), "{name}: {st:?}\n{err}");
        let d = decode(&self.out);
        let named = d.count_where(|s| {
            s.str_labels
                .get("frames_from")
                .is_some_and(|f| f != "native")
        });
        (err, named as f64 / d.total().max(1) as f64)
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn target(x_perf: bool) -> Option<Workload> {
    let py = python("3.12")?;
    let mut c = Command::new(py);
    if x_perf {
        c.args(["-X", "perf"]);
    }
    Some(Workload::start(c.arg(testdata("split.py")).arg("120")))
}

#[test]
fn two_sessions_share_the_trampoline_in_either_order() {
    for first_out in ["a", "b"] {
        let Some(w) = target(false) else { return };
        let pid = w.pid();
        assert!(!active(pid));
        let (a_secs, b_secs) = if first_out == "a" {
            ("2", "4")
        } else {
            ("4", "2")
        };
        let a = Session::start("a", pid, a_secs);
        let b = Session::start("b", pid, b_secs);
        let (first, second) = if first_out == "a" { (a, b) } else { (b, a) };
        let (err1, share1) = first.finish("first");
        assert!(
            err1.contains("perf trampoline left on: 1 other perfpy session"),
            "{err1}"
        );
        assert!(active(pid), "turned off while another session used it");
        let (err2, share2) = second.finish("second");
        assert!(err2.contains("perf trampoline turned off again"), "{err2}");
        assert!(!active(pid), "left on after the last session");
        for (n, s) in [(1, share1), (2, share2)] {
            assert!(
                s >= 0.8,
                "session {n}: Python names in {:.0}% of samples",
                100.0 * s
            );
        }
    }
}

#[test]
fn three_sessions_one_killed_and_a_target_started_with_x_perf() {
    let Some(w) = target(false) else { return };
    let pid = w.pid();
    let a = Session::start("a3", pid, "5");
    let b = Session::start("b3", pid, "30");
    let c = Session::start("c3", pid, "3");
    b.kill();
    let (err_c, share_c) = c.finish("c3");
    assert!(
        err_c.contains("perf trampoline left on: 1 other perfpy session"),
        "{err_c}"
    );
    assert!(active(pid));
    let (err_a, share_a) = a.finish("a3");
    assert!(
        err_a.contains("perf trampoline turned off again"),
        "{err_a}"
    );
    assert!(!active(pid));
    assert!(share_a >= 0.8 && share_c >= 0.8, "{share_a} {share_c}");
    drop(w);

    // The target's own trampoline (-X perf) stays on, whoever leaves last.
    let Some(w) = target(true) else { return };
    let pid = w.pid();
    let a = Session::start("ax", pid, "2");
    let b = Session::start("bx", pid, "3");
    let (err_a, share_a) = a.finish("ax");
    let (err_b, share_b) = b.finish("bx");
    assert!(
        !err_a.contains("turned off") && !err_b.contains("turned off"),
        "{err_a}{err_b}"
    );
    assert!(active(pid), "-X perf trampoline turned off");
    assert!(share_a >= 0.8 && share_b >= 0.8, "{share_a} {share_b}");
}

#[test]
fn deactivate_by_hand_says_who_still_uses_it() {
    let Some(w) = target(false) else { return };
    let pid = w.pid();
    let a = Session::start("hand", pid, "4");
    let o = run_perfpy(&["inject", "-p", &pid.to_string(), "--deactivate"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("perfpy session")
            && err.contains(&a.child.id().to_string())
            && err.contains("--force"),
        "{err}"
    );
    let info = run_perfpy(&["info", "-p", &pid.to_string()]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains(&format!("trampoline used by: perfpy pid {}", a.child.id()))
            && text.contains("turned on by perfpy"),
        "{text}"
    );
    assert!(active(pid));
    let (err, _) = a.finish("hand");
    assert!(err.contains("turned off again"), "{err}");
    assert!(!active(pid));
}
