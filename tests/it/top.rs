//! `perfpy top` driven in a real terminal (tmux: send-keys, capture-pane) and through a pipe,
//! on testdata/split.py (its leaf `spin`, under hot_function, takes ~40% of its CPU; the other
//! parts ~20% each): the hot function is on top within 3 s of the first screen, sorting keys
//! change the order, q and Ctrl-C quit with exit 0 (-o then writes the profile), the target is
//! left running and untraced, the terminal is restored (no raw mode, main screen, cursor shown)
//! also on SIGTERM and when the target exits; without a terminal, plain tables whose top row is
//! `spin`, `--tid` shows one thread's samples, `perfpy top … | head` ends when head does, and
//! `-a` (in a private PID namespace) names every Python process's functions.

use perfpy_test_support as common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A tmux server of our own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A 200x50 session running `cmd` in `sh`; None (a failure under CI=true) without tmux.
    fn start(name: &str, cmd: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(!ci(), "tmux is not installed: scripts/deps.sh installs it");
            eprintln!("NOTE: tmux not installed; test not run");
            return None;
        }
        let t = Tmux {
            socket: format!("perfpy-test-{}-{name}", std::process::id()),
        };
        let out = t.run(&[
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "50",
            "sh",
            "-c",
            cmd,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        Some(t)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]).args(args);
        output_within(&mut c, Duration::from_secs(10))
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p"]).stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", keys]).status.success());
    }

    /// Polls the screen until `ok` holds of it, for at most `limit`; the last screen either way.
    fn wait(&self, limit: Duration, ok: impl Fn(&str) -> bool) -> (bool, String) {
        let t = Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return (true, s);
            }
            if t.elapsed() > limit {
                return (false, s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (cursor shown, alternate screen on).
    fn cursor_and_alternate(&self) -> (bool, bool) {
        let out = self.run(&["display", "-p", "#{cursor_flag} #{alternate_on}"]);
        let s = String::from_utf8_lossy(&out.stdout);
        let v: Vec<&str> = s.split_whitespace().collect();
        (v.first() == Some(&"1"), v.get(1) == Some(&"1"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The rows of the table on a screen: (own share of the last interval, total share of the last
/// interval, function), in the order shown.
fn rows(screen: &str) -> Vec<(f64, f64, String)> {
    screen
        .lines()
        .skip_while(|l| !l.contains("%Own"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            let own = v.first()?.parse().ok()?;
            let total = v.get(1)?.parse().ok()?;
            Some((own, total, l.get(32..)?.to_string()))
        })
        .collect()
}

fn top_row_is(screen: &str, name: &str) -> bool {
    rows(screen).first().is_some_and(|r| r.2.starts_with(name))
}

fn split_target() -> Option<Workload> {
    let py = python("3.12")?;
    Some(Workload::start(
        Command::new(py).arg(testdata("split.py")).arg("600"),
    ))
}

/// After perfpy: its exit status and the terminal's line discipline flags, printed by the
/// session's shell (`tty: isig icanon echo` when restored).
fn after(perfpy_args: &str) -> String {
    format!(
        "{} top {perfpy_args}; echo perfpy-exit=$?; echo tty: $(stty -a | tr ' ;' '\\n\\n' | grep -x -E -e '-?(isig|icanon|echo)'); sleep 120",
        perfpy().display()
    )
}

/// The target runs on, untraced: state R or S, TracerPid 0.
fn untouched(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0\n"), "{status}");
    assert!(matches!(proc_state(pid), 'R' | 'S'), "{status}");
}

/// The terminal as the shell expects it: cooked mode with echo, main screen, cursor shown.
fn restored(t: &Tmux, screen: &str) {
    let stty = screen.lines().find(|l| l.starts_with("tty:")).unwrap_or("");
    assert_eq!(
        stty.trim_end(),
        "tty: isig icanon echo",
        "terminal left in raw mode:\n{screen}"
    );
    assert_eq!(t.cursor_and_alternate(), (true, false), "{screen}");
}

#[test]
fn hot_function_on_top_sorting_keys_and_q() {
    let Some(w) = split_target() else { return };
    let args = format!("-p {} --function", w.pid());
    let Some(t) = Tmux::start("keys", &after(&args)) else {
        return;
    };
    let (ok, s) = t.wait(Duration::from_secs(30), |s| s.contains("perfpy top: pid"));
    assert!(ok, "no screen:\n{s}");
    assert!(s.contains("o own  t total  n name"), "no footer:\n{s}");
    let (ok, s) = t.wait(Duration::from_secs(3), |s| top_row_is(s, "spin ("));
    assert!(ok, "spin not on top within 3 s:\n{s}");
    assert!(s.contains("CPython 3.12"), "{s}");
    assert!(s.contains("frames from the eBPF walker"), "{s}");
    assert!(s.contains("hot_function ("), "{s}");

    // Total: a root of every stack first (ties by name: <module>).
    t.keys("t");
    let (ok, s) = t.wait(Duration::from_secs(5), |s| {
        s.contains("sort total") && rows(s).first().is_some_and(|r| r.1 >= 90.0)
    });
    assert!(ok, "sort by total:\n{s}");
    let names: Vec<String> = rows(&s).into_iter().map(|r| r.2).collect();
    assert!(names[0].starts_with("<module> ("), "{s}");
    let totals: Vec<f64> = rows(&s).iter().map(|r| r.1).collect();
    assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{s}");

    // Name: alphabetical.
    t.keys("n");
    let (ok, s) = t.wait(Duration::from_secs(5), |s| s.contains("sort name"));
    assert!(ok, "sort by name:\n{s}");
    let names: Vec<String> = rows(&s).into_iter().map(|r| r.2).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert!(names.len() >= 4 && names == sorted, "{s}");

    // Own again: spin back on top.
    t.keys("o");
    let (ok, s) = t.wait(Duration::from_secs(5), |s| {
        s.contains("sort own") && top_row_is(s, "spin (")
    });
    assert!(ok, "sort by own:\n{s}");

    // Space: the screen stays as it is (two refreshes later, the same), until space again.
    t.keys("Space");
    let (ok, paused) = t.wait(Duration::from_secs(5), |s| s.contains("[paused]"));
    assert!(ok, "no pause:\n{paused}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(t.screen(), paused);
    t.keys("Space");
    let (ok, s) = t.wait(Duration::from_secs(5), |s| {
        !s.contains("[paused]") && samples_shown(s) > samples_shown(&paused)
    });
    assert!(ok, "no resume:\n{s}");

    t.keys("q");
    let (ok, s) = t.wait(Duration::from_secs(20), |s| s.contains("tty:"));
    assert!(ok, "perfpy did not quit on q:\n{s}");
    assert!(s.contains("perfpy-exit=0"), "{s}");
    assert!(s.contains("perfpy: top ended (quit)"), "{s}");
    restored(&t, &s);
    untouched(w.pid());
}

#[test]
fn ctrl_c_quits_and_writes_the_profile() {
    let Some(w) = split_target() else { return };
    let out = tmp("top-ctrl-c.pb.gz");
    let args = format!("-p {} -o {}", w.pid(), out.display());
    let Some(t) = Tmux::start("ctrlc", &after(&args)) else {
        return;
    };
    // Enough samples for a share to mean something, even on a busy machine.
    let (ok, s) = t.wait(Duration::from_secs(60), |s| {
        top_row_is(s, "spin (") && samples_shown(s) >= 50
    });
    assert!(ok, "spin not on top with 50 samples:\n{s}");
    let shown = samples_shown(&s);
    t.keys("C-c");
    let (ok, s) = t.wait(Duration::from_secs(30), |s| s.contains("tty:"));
    assert!(ok, "perfpy did not quit on Ctrl-C:\n{s}");
    assert!(s.contains("perfpy-exit=0"), "{s}");
    assert!(
        s.contains(&format!("perfpy: wrote {}", out.display())),
        "{s}"
    );
    restored(&t, &s);
    untouched(w.pid());
    let p = decode(&out);
    // Every sample of the run, those shown included.
    assert!(
        p.total() >= shown,
        "{} samples in the file, {shown} shown",
        p.total()
    );
    let spin = p.count_where(|s| s.names().first().is_some_and(|n| n.starts_with("spin")));
    // ~40% of the CPU time; at least a quarter on a busy machine.
    assert!(
        spin * 4 >= p.total(),
        "spin {spin} of {} samples",
        p.total()
    );
}

/// The sample count in the screen's header ("… samples N (last interval …").
fn samples_shown(screen: &str) -> i64 {
    screen
        .split("samples ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sigterm_restores_the_terminal() {
    let Some(w) = split_target() else { return };
    let Some(t) = Tmux::start("term", &after(&format!("-p {}", w.pid()))) else {
        return;
    };
    let (ok, s) = t.wait(Duration::from_secs(30), |s| s.contains("perfpy top: pid"));
    assert!(ok, "no screen:\n{s}");
    // perfpy: the child of the pane's shell (both started by this test).
    let out = t.run(&["display", "-p", "#{pane_pid}"]);
    let sh = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
    let perfpy: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    assert!(std::fs::read_to_string(format!("/proc/{perfpy}/cmdline"))
        .unwrap()
        .contains("top"));
    // A pid this test started (through tmux).
    let rc = Command::new("kill")
        .args(["-TERM", &perfpy.to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let (ok, s) = t.wait(Duration::from_secs(30), |s| s.contains("tty:"));
    assert!(ok, "perfpy did not end on SIGTERM:\n{s}");
    assert!(s.contains("perfpy-exit=0"), "{s}");
    assert!(s.contains("perfpy: top ended (interrupted)"), "{s}");
    restored(&t, &s);
    untouched(w.pid());
}

#[test]
fn target_exit_restores_the_terminal_and_prints_the_last_table() {
    let Some(py) = python("3.12") else { return };
    let args = format!("-- {} {} 2", py.display(), testdata("split.py").display());
    let Some(t) = Tmux::start("exit", &after(&args)) else {
        return;
    };
    // 2 s of CPU: within 60 s even on a busy machine.
    let (ok, s) = t.wait(Duration::from_secs(60), |s| s.contains("tty:"));
    assert!(ok, "perfpy did not end with its command:\n{s}");
    assert!(s.contains("perfpy-exit=0"), "{s}");
    assert!(s.contains("perfpy: top ended (command exited)"), "{s}");
    // The last table stays in the shell, spin on top since the start.
    assert!(rows(&s).iter().any(|r| r.2.starts_with("spin (")), "{s}");
    restored(&t, &s);
}

#[test]
fn plain_tables_without_a_terminal() {
    let Some(w) = split_target() else { return };
    let mut cmd = Command::new(perfpy());
    cmd.args(["top", "-p", &w.pid().to_string(), "-d", "8", "-i", "2"])
        .args(["--function", "--rows", "40"]);
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stdout.contains('\x1b'),
        "escape sequences in a pipe:\n{stdout}"
    );
    let tables: Vec<&str> = stdout
        .split("\n\n")
        .filter(|t| !t.trim().is_empty())
        .collect();
    assert!(tables.len() >= 2, "{stdout}");
    assert!(
        tables.iter().all(|t| t.starts_with("perfpy top: pid")),
        "{stdout}"
    );
    // The last table, since the start: spin on top.
    let last = tables.last().unwrap();
    let by_all: Vec<(f64, String)> = last
        .lines()
        .skip(3)
        .filter_map(|l| {
            Some((
                l.split_whitespace().nth(2)?.parse().ok()?,
                l.get(32..)?.into(),
            ))
        })
        .collect();
    let top = by_all.iter().max_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
    assert!(top.1.starts_with("spin ("), "{last}");
    // Each table is sorted by the last interval: spin on top of most of those with enough
    // samples to tell 40% from 20% (a busy machine may leave the target too little CPU for any).
    let full: Vec<&&str> = tables
        .iter()
        .filter(|t| interval_samples(t) >= 30)
        .collect();
    let on_top = full.iter().filter(|t| top_row_is(t, "spin (")).count();
    assert!(2 * on_top > full.len() || full.is_empty(), "{stdout}");
    untouched(w.pid());
}

/// The samples of a table's interval ("… (last interval N) …").
fn interval_samples(table: &str) -> i64 {
    table
        .split("last interval ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn thread_filter_by_tid() {
    let Some(py) = python("3.12") else { return };
    let w = Workload::start(
        Command::new(py)
            .arg(testdata("split.py"))
            .args(["600", "threads"]),
    );
    // The main thread waits in join; the two workers (started after "ready") share the work.
    let tasks = || -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{}/task", w.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .collect()
    };
    let t0 = std::time::Instant::now();
    while tasks().len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "workers not started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = tasks().into_iter().max().unwrap();
    let mut cmd = Command::new(perfpy());
    // One interval as long as the run: its count (the thread's) and the header's (every
    // thread's) are over the same time.
    cmd.args(["top", "-p", &w.pid().to_string(), "-d", "4", "-i", "4"])
        .args(["--function", "--tid", &worker.to_string()]);
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    let last = stdout
        .split("\n\n")
        .filter(|t| !t.trim().is_empty())
        .last()
        .unwrap();
    let header = last.lines().next().unwrap();
    assert!(header.contains(&format!("thread {worker}")), "{stdout}");
    // Its samples only: about half of all.
    let all = samples_shown(header) as f64;
    let rows = rows(last);
    let lp = rows
        .iter()
        .find(|r| r.2.starts_with("main.<locals>.loop"))
        .unwrap_or_else(|| panic!("{stdout}"));
    // Every stack of the worker runs its loop (but the few samples the walker may miss on a
    // busy machine, which have native frames only).
    assert!(lp.1 >= 85.0, "{last}");
    assert!(rows.iter().any(|r| r.2.starts_with("spin (")), "{last}");
    let mine = interval_samples(header) as f64;
    assert!(
        all >= 40.0 && mine > 0.2 * all && mine < 0.8 * all,
        "{stdout}"
    );
}

#[test]
fn a_closed_pipe_ends_top() {
    let Some(w) = split_target() else { return };
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "{} top -p {} | head -3; echo head-done",
        perfpy().display(),
        w.pid()
    ));
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("perfpy top: pid"), "{stdout}");
    assert!(stdout.ends_with("head-done\n"), "{stdout}");
    assert!(
        stderr.contains("perfpy: top ended (stdout closed)"),
        "{stderr}"
    );
    untouched(w.pid());
}

/// `top -a` inside a private PID namespace (so "every process" is the test's own): a CPython
/// 3.12 split.py and a CPython 2.7 busy loop, both named; the 2.7 loop (one CPU's worth in one
/// function) above split.py's spin (~40% of the other CPU's worth), both with their files.
#[test]
fn all_processes_in_a_pid_namespace() {
    let (Some(py312), Some(py27)) = (python("3.12"), python("2.7")) else {
        return;
    };
    let dir = tmp("top-all");
    std::fs::create_dir_all(&dir).unwrap();
    // Each target writes "ready PID" into its own file; the script waits for both (bounded),
    // then runs top for 4 s as plain tables, then ends its jobs (by pid).
    let script = format!(
        r#"set -e
cd {dir}
{py312} {split} 60 > w312 &
{py27} {busy} 60 > w27 &
for f in w312 w27; do
  for i in $(seq 1 300); do grep -q ready $f 2>/dev/null && break; sleep 0.1; done
done
{perfpy} top -a -d 4 -i 2 --function --rows 40 > top.txt
kill $(jobs -p) 2>/dev/null || true
wait || true
"#,
        dir = dir.display(),
        py312 = py312.display(),
        py27 = py27.display(),
        split = testdata("split.py").display(),
        busy = testdata("busy_any.py").display(),
        perfpy = perfpy().display(),
    );
    let o = output_within(
        Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "bash", "-c", &script]),
        Duration::from_secs(90),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("perfpy: top ended (duration elapsed)"),
        "{stderr}"
    );
    let stdout = std::fs::read_to_string(dir.join("top.txt")).unwrap();
    let last = stdout
        .split("\n\n")
        .filter(|t| !t.trim().is_empty())
        .last()
        .unwrap_or_else(|| panic!("no table: {stderr}"));
    let header = last.lines().next().unwrap();
    assert!(header.starts_with("perfpy top: every process"), "{last}");
    assert!(
        header.contains("CPython 2.7") && header.contains("CPython 3.12"),
        "{last}"
    );
    // Own share since the start (third column) of a function's row.
    let since = |name: &str| -> f64 {
        last.lines()
            .skip(3)
            .find(|l| l.get(32..).is_some_and(|f| f.starts_with(name)))
            .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or_else(|| panic!("no row {name}:\n{last}"))
    };
    let (hot, spin) = (
        since(&format!("hot_any ({}:", testdata("busy_any.py").display())),
        since(&format!("spin ({}:", testdata("split.py").display())),
    );
    assert!(
        hot > spin && hot >= 20.0 && spin >= 5.0,
        "hot_any {hot}%, spin {spin}% (expected ~45% and ~20%):\n{last}"
    );
}
