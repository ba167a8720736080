//! `perfpy dump`: targets with threads in known states (testdata/dump_target.py), on every
//! installed CPython: each thread's innermost Python frame and line equal what the target
//! reports about itself (sys._current_frames on request), the blocked thread shows its system
//! call, and the target is never stopped (its 1 ms clock thread sees no long gap during 100
//! dumps).

use perfpy_test_support as common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use common::*;

struct Target {
    child: std::process::Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

/// How long a target may take to answer: it needs the GIL, which busy threads contend for.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

impl Target {
    fn start(mut cmd: Command) -> Target {
        die_with_the_test(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start target");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // Lines are read by a thread so that a target that never answers fails the test
        // within ANSWER_WITHIN instead of hanging it.
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Target {
            child,
            stdin,
            lines,
        };
        let line = t.answer("ready");
        assert!(line.starts_with("ready"), "target said {line:?}");
        t
    }
    fn answer(&mut self, to: &str) -> String {
        match self.lines.recv_timeout(ANSWER_WITHIN) {
            Ok(line) => line,
            Err(e) => panic!(
                "target {} did not answer {to:?} within {ANSWER_WITHIN:?} ({e})",
                self.child.id()
            ),
        }
    }
    fn ask(&mut self, what: &str) -> String {
        writeln!(self.stdin, "{what}").unwrap();
        self.stdin.flush().unwrap();
        self.answer(what)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dump_json(pid: u32) -> serde_json::Value {
    let o = output_within(
        Command::new(perfpy()).args(["dump", "--json", "-p", &pid.to_string()]),
        Duration::from_secs(60),
    );
    assert!(
        o.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("dump --json")
}

/// The command of interpreter `name` of [`interpreters`] again, `quiet` or not.
fn cmd_again(name: &str, quiet: bool) -> Command {
    let mut c = interpreters()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1;
    if quiet {
        c.arg("quiet");
    }
    c
}

fn interpreters() -> Vec<(String, Command)> {
    let mut v = Vec::new();
    // Every installed CPython: pyenv's, Debian's own 3.11 and the sid chroot's 3.13 – 3.15.
    for minor in [
        "2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13",
    ] {
        if let Some(py) = python(minor) {
            let mut c = Command::new(py);
            c.arg(testdata("dump_target.py"));
            v.push((minor.to_string(), c));
        }
    }
    let mut c = Command::new("/usr/bin/python3.11");
    c.arg(testdata("dump_target.py"));
    v.push(("Debian 3.11".into(), c));
    for minor in ["3.13", "3.14", "3.15"] {
        if let Some(mut c) = chroot_python(minor) {
            c.arg(chroot_testdata("dump_target.py"));
            v.push((format!("Debian sid {minor}"), c));
        }
    }
    v
}

/// The minor version at the end of a name of [`interpreters`] ("Debian sid 3.14" → 14).
fn minor_of(name: &str) -> u32 {
    name.rsplit('.').next().unwrap().parse().unwrap()
}

#[test]
fn dump_shows_each_threads_own_frame_on_every_cpython() {
    for (name, cmd) in interpreters() {
        let mut t = Target::start(cmd);
        let pid = t.child.id();
        let own: HashMap<String, (String, u64)> =
            serde_json::from_str::<HashMap<String, (String, u64)>>(&t.ask("frames")).unwrap();
        // The main thread goes back to its read after answering: wait until the kernel says
        // it is there (the others stay put).
        let t0 = std::time::Instant::now();
        while !std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall"))
            .unwrap_or_default()
            .starts_with("0 ")
        {
            assert!(
                t0.elapsed().as_secs() < 10,
                "{name}: main thread never back in read"
            );
            std::thread::yield_now();
        }
        let d = dump_json(pid);
        let threads = d[0]["threads"].as_array().unwrap();
        for (tid, (func, line)) in &own {
            let th = threads
                .iter()
                .find(|x| x["tid"].as_u64().map(|t| t.to_string()).as_deref() == Some(tid.as_str()))
                .unwrap_or_else(|| panic!("{name}: thread {tid} missing in {d}"));
            let frames = th["frames"].as_array().unwrap();
            let inner = frames
                .last()
                .unwrap_or_else(|| panic!("{name}: thread {tid} without frames: {th}"));
            // The clock thread wakes every 1 ms and runs three lines: its function only.
            let line_ok = func == "clock" || inner["line"].as_u64() == Some(*line);
            assert!(
                inner["function"].as_str().unwrap().ends_with(func.as_str()) && line_ok,
                "{name}: thread {tid}: target says {func}:{line}, dump says {inner}"
            );
            if func == "read_line" {
                assert_eq!(th["syscall"], "read (fd 0)", "{name}: {th}");
                // Its native stack is whole, from `_start`, also where the interpreter is built
                // with frame pointers (sid's 3.15: the frame pointer is not in `/proc/…/syscall`).
                let outermost = th["native"][0].as_str().unwrap_or_default();
                assert!(
                    outermost.starts_with("_start ("),
                    "{name}: native frames of the blocked main thread: {}",
                    th["native"]
                );
            }
        }
        // The GIL: a busy thread's competitor waits for it (pyenv builds name take_gil; 2.7 has
        // no take_gil); from 3.13 the interpreter says which thread holds it.
        let pyenv = !name.starts_with("Debian") && name != "2.7";
        let holder_known = minor_of(&name) >= 13;
        let (mut waiting, mut holder) = (false, false);
        for _ in 0..20 {
            let d = dump_json(pid);
            for th in d[0]["threads"].as_array().unwrap() {
                let own = own.get(&th["tid"].to_string()).map(|x| x.0.as_str());
                let contender = matches!(own, Some("busy" | "hasher" | "clock"));
                waiting |= contender
                    && th["syscall"]
                        .as_str()
                        .is_some_and(|c| c.ends_with("waiting for the GIL"));
                holder |= th["holds_gil"] == true && matches!(own, Some("busy" | "hasher"));
                assert!(
                    holder_known || th["holds_gil"].is_null(),
                    "{name}: GIL holder claimed: {th}"
                );
            }
            if (waiting || !pyenv) && (holder || !holder_known) {
                break;
            }
        }
        assert!(
            waiting || !pyenv,
            "{name}: no thread seen waiting for the GIL"
        );
        assert!(holder || !holder_known, "{name}: no GIL holder seen");
        drop(t);
        never_stopped(&name);
    }
}

/// Never stopped: the clock thread of a `quiet` target of interpreter `name` sees no longer gap
/// during 100 dumps of it than during 100 dumps of another such process.
fn never_stopped(name: &str) {
    // A target whose clock thread has the GIL to itself (a busy thread competing for it makes
    // the clock's gaps the GIL's, 100 ms and more under 2.7); the other process gives the same
    // load on this machine's cores (perfpy's own CPU) without reading the target.
    let mut t = Target::start(cmd_again(name, true));
    let other = Target::start(cmd_again(name, true));
    // Other engineers' builds share these cores: a noisy round is run again (up to 3); a
    // target stopped by the dumps fails every round.
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let mut gaps = Vec::new();
        for (target, what) in [(other.child.id(), "another"), (t.child.id(), "it")] {
            t.ask("gaps");
            let start = std::time::Instant::now();
            for _ in 0..100 {
                let o = output_within(
                    Command::new(perfpy()).args(["dump", "-p", &target.to_string()]),
                    Duration::from_secs(60),
                );
                assert!(o.status.success());
            }
            let gap: f64 = t.ask("gaps").trim().parse().unwrap();
            eprintln!(
                "{name}: longest clock gap {gap:.1} ms during 100 dumps of {what} ({:?} per dump)",
                start.elapsed() / 100
            );
            gaps.push(gap);
        }
        rounds.push((gaps[1], gaps[0]));
        if gaps[1] <= gaps[0] * 2.0 + 10.0 {
            break;
        }
    }
    assert!(
        rounds.iter().any(|(it, other)| *it <= other * 2.0 + 10.0),
        "{name}: the target's clock stalled during dumps of it in every round: (it, another) = {rounds:?} ms"
    );
}

#[test]
fn dump_errors_and_non_python() {
    let o = Command::new(perfpy())
        .args(["dump", "-p", "999999999"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("999999999"), "{e}");
    // A process that is not Python: its threads with a note, exit 0.
    let mut sleep = Command::new("sleep").arg("30").spawn().unwrap();
    let d = dump_json(sleep.id());
    let _ = sleep.kill();
    let _ = sleep.wait();
    assert!(
        d[0]["note"]
            .as_str()
            .unwrap()
            .contains("not a Python process"),
        "{d}"
    );
    assert_eq!(d[0]["threads"][0]["syscall"], "clock_nanosleep", "{d}");
}

#[test]
fn dump_locals_shows_known_values_on_every_cpython() {
    for (name, _) in interpreters() {
        let t = Target::start(cmd_again(&name, true));
        let o = Command::new(perfpy())
            .args([
                "dump",
                "--json",
                "--locals",
                "-p",
                &t.child.id().to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let frame = d[0]["threads"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["frames"].as_array().unwrap().iter())
            .find(|f| f["function"] == "sleeper")
            .unwrap_or_else(|| panic!("{name}: no sleeper frame in {d}"))
            .clone();
        let locals: HashMap<String, (String, String)> = frame["locals"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no locals in {frame}"))
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_string(),
                    (
                        l["type"].as_str().unwrap().to_string(),
                        l["repr"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
        let mut want = vec![
            ("arg", "int", "7"),
            ("i", "int", "42"),
            ("neg", "int", "-7"),
            ("f", "float", "2.5"),
            ("n", "NoneType", "None"),
            ("t", "bool", "True"),
            ("l", "list", "<list of length 3>"),
            ("d", "dict", "<dict of length 1>"),
            ("tup", "tuple", "<tuple of length 2>"),
        ];
        // 2.7: 2**40 is an `int` too (a C long); its strings are bytes, its text `unicode`.
        want.push(("big", "int", "1099511627776"));
        if name != "2.7" {
            want.push(("s", "str", "'h\u{e9}llo'"));
            want.push(("b", "bytes", "b'ab\\x00'"));
        }
        for (k, ty, repr) in want {
            let got = locals
                .get(k)
                .unwrap_or_else(|| panic!("{name}: no local {k}: {locals:?}"));
            assert_eq!(
                (got.0.as_str(), got.1.as_str()),
                (ty, repr),
                "{name}: local {k}"
            );
        }
        // The order: arguments first.
        assert_eq!(frame["locals"][0]["name"], "arg", "{name}");
    }
}

#[test]
fn locals_offsets_of_3_11_and_3_12_match_their_headers() {
    for minor in ["3.11", "3.12"] {
        let Some(py) = python(minor) else { continue };
        let inc = py
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("include")
            .join(format!("python{minor}"));
        let exe = tmp(&format!("locals_offsets_{minor}"));
        let st = Command::new("cc")
            .arg(format!("-I{}", inc.display()))
            .arg(format!("-I{}", inc.join("internal").display()))
            .arg(testdata("locals_offsets.c"))
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("cc");
        assert!(st.success(), "{minor}: cc failed");
        let out = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
        let get = |k: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k} ")))
                .unwrap_or_else(|| panic!("{k} in {out}"))
                .parse()
                .unwrap()
        };
        assert_eq!(
            (
                get("frame_localsplus"),
                get("code_localsplusnames"),
                get("code_localspluskinds")
            ),
            (72, 96, 104),
            "{minor}: src/dump_locals.rs LOCALS_3_11"
        );
    }
}

/// `dump -a` inside a private PID namespace: every Python process there, and only those.
#[test]
fn dump_all_finds_every_python_process_in_a_pid_namespace() {
    let (Some(py312), Some(py27)) = (python("3.12"), python("2.7")) else {
        return;
    };
    let dir = tmp("dump-all");
    std::fs::create_dir_all(&dir).unwrap();
    // Each target prints "ready PID" into its own file once its threads run; the script waits
    // for both, then dumps.
    let script = format!(
        r#"set -e
cd {dir}
sleep 60 | {py312} {target} quiet > w312 &
sleep 60 | {py27} {target} quiet > w27 &
sleep 60 &
for f in w312 w27; do
  for i in $(seq 1 300); do grep -q ready $f 2>/dev/null && break; sleep 0.1; done
done
{perfpy} dump -a --json > dump.json
for f in w312 w27; do echo "$f $(awk '{{print $2}}' $f | head -1)"; done
kill $(jobs -p) 2>/dev/null || true
"#,
        dir = dir.display(),
        py312 = py312.display(),
        py27 = py27.display(),
        target = testdata("dump_target.py").display(),
        perfpy = perfpy().display(),
    );
    let o = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "bash", "-c", &script])
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&o.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
    let want: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.split_once(' ')?.1.trim().parse().ok())
        .collect();
    assert_eq!(want.len(), 2, "{stdout}");
    let d: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("dump.json")).unwrap()).unwrap();
    let mut got: Vec<u64> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    got.sort_unstable();
    let mut want = want;
    want.sort_unstable();
    assert_eq!(got, want, "the Python processes, not sleep nor bash: {d}");
    for p in d.as_array().unwrap() {
        let sleeper = p["threads"].as_array().unwrap().iter().any(|t| {
            t["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == "sleeper")
        });
        assert!(sleeper, "{p}");
    }
}
