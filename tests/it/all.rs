//! `perfpy record -a` inside a private PID namespace (`unshare --pid --fork --mount-proc`), so
//! that the whole-machine recording sees only the processes this test starts.

use perfpy_test_support as common;

use std::collections::HashMap;
use std::process::Command;

use common::*;

#[test]
fn whole_machine_in_a_pid_namespace() {
    let (Some(py312), Some(py39), Some(py27)) = (python("3.12"), python("3.9"), python("2.7"))
    else {
        return;
    };
    let c = native_busy("busy-c");
    let out = tmp("all.pb.gz");
    let dir = tmp("all-logs");
    std::fs::create_dir_all(&dir).unwrap();
    // Each workload writes its "ready PID" line to its own file; the script waits for all of
    // them, records 3 s, then ends them (by pid).
    let script = format!(
        r#"set -e
cd {dir}
{py312} -X perf {split} 20 > w312 &
{py39} {busy} 20 > w39 &
{py27} {busy} 20 > w27 &
/usr/bin/python3.11 {busy} 20 > wdeb &
{c} 20 > wc &
for f in w312 w39 w27 wdeb wc; do
  for i in $(seq 1 300); do grep -q ready $f 2>/dev/null && break; sleep 0.1; done
done
{perfpy} info --json > info.json
{perfpy} record -a -d 3 -o {out}
for f in w312 w39 w27 wdeb; do echo "$f $(awk '{{print $2}}' $f | head -1)"; done
echo "wc $(jobs -p | tail -1)"
kill $(jobs -p) 2>/dev/null || true
wait || true
"#,
        dir = dir.display(),
        py312 = py312.display(),
        py39 = py39.display(),
        py27 = py27.display(),
        split = testdata("split.py").display(),
        busy = testdata("busy_any.py").display(),
        c = c.display(),
        perfpy = perfpy().display(),
        out = out.display(),
    );
    let (_, _, pids) = in_pid_namespace(&script);
    let d = decode(&out);
    check_go_pprof(&out);
    for w in ["w312", "w39", "w27", "wdeb", "wc"] {
        let pid = pids[w];
        let n = d.count_where(|s| s.num_labels["pid"] == pid);
        // 300 samples each on an idle machine (3 s at 100 Hz, 5 busy processes, 2 CPUs).
        assert!(n > 10, "{w} (pid {pid}): {n} samples");
    }
    let label = |w: &str, k: &str| {
        d.samples
            .iter()
            .find(|s| s.num_labels["pid"] == pids[w])
            .and_then(|s| s.str_labels.get(k).cloned())
    };
    assert_eq!(label("w312", "python_version").as_deref(), Some("3.12.1"));
    assert_eq!(label("w39", "python_version").as_deref(), Some("3.9"));
    assert_eq!(label("w27", "python_version").as_deref(), Some("2.7"));
    assert!(label("wdeb", "python_version").is_some_and(|v| v.starts_with("3.11")));
    assert_eq!(label("wc", "python_version"), None);
    // Every Python workload has its hot function named: 3.12 through its trampolines and the
    // eBPF walker, 3.9, 2.7 and Debian's static 3.11 through the walker.
    for w in ["w39", "w27", "wdeb"] {
        let n = d.count_where(|s| {
            s.num_labels["pid"] == pids[w] && s.has_chain(&["<module>", "hot_any"])
        });
        assert!(n > 15, "{w}: {n} samples with <module> -> hot_any");
    }
    // The C program's frames are there.
    assert!(d.count_where(|s| s.num_labels["pid"] == pids["w312"] && s.has("round_")) > 15);
    assert!(
        d.count_where(|s| s.num_labels["pid"] == pids["wc"]
            && s.has_chain(&["main", "level1", "level2", "leaf_busy"]))
            > 15
    );
    check_info_in_the_namespace(&dir, &pids);
    check_nothing_from_outside(&d, &pids);
}

#[test]
fn whole_machine_with_injection_finds_processes_as_they_appear() {
    // Issue 5's check: CPython 3.12 (no -X perf), 3.9 and 2.7 workloads, a native busy loop, and
    // a 3.10 workload started two seconds into a 6-second `record -a --inject-python`.
    let (Some(py312), Some(py39), Some(py27), Some(py310)) =
        (python("3.12"), python("3.9"), python("2.7"), python("3.10"))
    else {
        return;
    };
    let c = native_busy("busy-c-2");
    let out = tmp("all-inject.pb.gz");
    let dir = tmp("all-inject-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"cd {dir}
{py312} {split} 30 > w312 &
{py39} {busy} 30 > w39 &
{py27} {busy} 30 > w27 &
{c} 30 > wc &
for f in w312 w39 w27 wc; do
  for i in $(seq 1 300); do grep -q ready $f 2>/dev/null && break; sleep 0.1; done
done
{perfpy} record -a --inject-python -d 6 -o {out} 2> perfpy.err &
REC=$!
sleep 2
{py310} {busy} 30 > w310 &
wait $REC || echo "perfpy exited with $?" >&2
for f in w312 w39 w27 w310; do echo "$f $(awk '{{print $2}}' $f | head -1)"; done
cat perfpy.err >&2
# Asked from inside the 3.12 process itself: its trampoline is off again.
{perfpy} inject -p $(awk '{{print $2}}' w312 | head -1) --status
"#,
        dir = dir.display(),
        py312 = py312.display(),
        py39 = py39.display(),
        py27 = py27.display(),
        py310 = py310.display(),
        split = testdata("split.py").display(),
        busy = testdata("busy_any.py").display(),
        c = c.display(),
        perfpy = perfpy().display(),
        out = out.display(),
    );
    // The namespace (and every workload in it) ends when the script's bash exits.
    let (stdout, stderr, pids) = in_pid_namespace(&script);
    assert!(!stderr.contains("perfpy exited with"), "{stderr}");
    let d = decode(&out);
    check_go_pprof(&out);
    // Every one of the five has samples; the four Python ones have their hot function named.
    for (w, hot) in [
        ("w312", "round_"),
        ("w39", "hot_any"),
        ("w27", "hot_any"),
        ("w310", "hot_any"),
    ] {
        let pid = pids[w];
        let n = d.count_where(|s| s.num_labels["pid"] == pid);
        let named =
            d.count_where(|s| s.num_labels["pid"] == pid && s.has_chain(&["<module>", hot]));
        assert!(
            n > 10 && named as f64 > 0.6 * n as f64,
            "{w} (pid {pid}): {named} of {n} samples with <module> -> {hot}"
        );
    }
    let native = d.count_where(|s| {
        s.str_labels["comm"] == "busy-c-2"
            && s.has_chain(&["main", "level1", "level2", "leaf_busy"])
    });
    assert!(native > 20, "native busy loop: {native} samples");
    // The 3.12 process had its trampoline turned on, and off again at the end.
    let p312 = pids["w312"];
    assert!(
        stderr.contains(&format!("pid {p312}: perf trampoline turned on")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {p312}: perf trampoline turned off again")),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("pid {p312}: perf trampoline off")),
        "{stdout}"
    );
    // 3.9, 2.7 and 3.10 are refused for the trampoline with their reason, and still named.
    assert!(stderr.contains("python_too_old"), "{stderr}");
}

/// testdata/native.c built as `name` in the test's directory (its comm is the file name).
fn native_busy(name: &str) -> std::path::PathBuf {
    let c = tmp(name);
    let st = Command::new("cc")
        .args(["-O2", "-g", "-o"])
        .arg(&c)
        .arg(testdata("native.c"))
        .status()
        .unwrap();
    assert!(st.success());
    c
}

/// Runs `script` as the first process of a private PID namespace (every workload it starts
/// ends with it); returns its stdout and stderr, and the pids it printed as `NAME PID` lines.
fn in_pid_namespace(script: &str) -> (String, String, HashMap<String, i64>) {
    let o = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "bash", "-c", script])
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("{stdout}\n{stderr}");
    assert!(o.status.success());
    let pids = stdout
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect();
    (stdout, stderr, pids)
}

/// `perfpy info` inside the namespace lists the four Python workloads, versions and paths.
fn check_info_in_the_namespace(dir: &std::path::Path, pids: &HashMap<String, i64>) {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("info.json")).unwrap()).unwrap();
    let procs = info["python_processes"].as_array().unwrap();
    let find = |w: &str| {
        procs
            .iter()
            .find(|p| p["pid"].as_i64() == Some(pids[w]))
            .unwrap_or_else(|| panic!("{w} not in info: {info}"))
    };
    assert_eq!(find("w312")["version"], "3.12.1");
    assert!(find("w312")["interpreter"]
        .as_str()
        .unwrap()
        .ends_with("libpython3.12.so.1.0"));
    assert!(find("w312")["trampoline"]
        .as_str()
        .unwrap()
        .starts_with("on"));
    assert_eq!(find("w39")["version"], "3.9");
    assert_eq!(find("w27")["version"], "2.7");
    assert_eq!(find("wdeb")["interpreter"], "/usr/bin/python3.11");
    assert_eq!(find("wdeb")["static"], true);
    for w in ["w312", "w39", "w27", "wdeb"] {
        assert_eq!(find(w)["ebpf"], "yes", "{w}");
    }
    assert_eq!(find("w39")["injection"], "no: python_too_old");
    assert_eq!(find("w312")["injection"], "possible (--inject-python)");
    assert!(!procs.iter().any(|p| p["pid"].as_i64() == Some(pids["wc"])));
    assert_eq!(info["machine"]["perf_events"], "ok");
}

/// Nothing from outside the namespace: only the workloads, perfpy and the script's bash.
fn check_nothing_from_outside(d: &Decoded, pids: &HashMap<String, i64>) {
    let ours: Vec<i64> = pids.values().copied().collect();
    let perfpy_pid = d
        .samples
        .iter()
        .filter(|s| s.str_labels["comm"] == "perfpy")
        .map(|s| s.num_labels["pid"])
        .next();
    for s in &d.samples {
        let pid = s.num_labels["pid"];
        assert!(
            ours.contains(&pid) || Some(pid) == perfpy_pid || s.str_labels["comm"] == "bash",
            "sample of pid {pid} ({})",
            s.str_labels["comm"]
        );
    }
}

/// Host pid of the process whose command line contains `marker`.
fn find_by_cmdline(marker: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        let argv0 = cmd.split('\0').next().unwrap_or("");
        (cmd.contains(marker) && argv0.contains("python")).then_some(pid)
    })
}

#[test]
fn perf_map_in_a_private_tmp_of_another_pid_namespace() {
    let Some(py) = python("3.12") else { return };
    // A process in its own PID and mount namespace with a private /tmp: its perf map is
    // /tmp/perf-<its own pid>.map there, invisible in our /tmp.
    let marker = format!("{}.25", std::process::id() % 1000 + 20);
    // The script is opened before /tmp is covered: the checkout itself may live under /tmp.
    let script = format!(
        "exec 3< {} && mount -t tmpfs perfpy-test /tmp && exec {} -X perf /dev/fd/3 {marker}",
        testdata("split.py").display(),
        py.display()
    );
    let mut ns = Workload::start(Command::new("unshare").args([
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
        "bash",
        "-c",
        &script,
    ]));
    let pid = find_by_cmdline(&marker).expect("namespaced python not found");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    assert_ne!(nspid, pid.to_string(), "not in its own PID namespace");
    assert!(!std::path::Path::new(&format!("/tmp/perf-{nspid}.map")).exists() || nspid == "1");
    let out = tmp("ns-tmp.pb.gz");
    let o = Record::to(&out)
        .args(["-p", &pid.to_string()])
        .duration("2")
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    let named = d.count_where(|s| s.has_chain(&["<module>", "main", "round_"]));
    assert!(
        named as f64 > 0.8 * d.total() as f64,
        "{named} of {} samples named",
        d.total()
    );
    // info sees it too, with its container-side perf map.
    let o = run_perfpy(&["info", "-p", &pid.to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["python_processes"][0]["version"], "3.12.1");
    let _ = ns.child.kill();
    // SAFETY: ending the namespaced python this test started, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[test]
fn ebpf_names_a_process_in_another_pid_namespace() {
    // A container-like target: its threads know themselves by their namespace's tids, which
    // the walker must match (innermost pid level), not by the host's.
    let Some(py) = python("3.11") else { return };
    let marker = format!("{}.75", std::process::id() % 1000 + 20);
    let script = format!(
        "exec {} {} {marker}",
        py.display(),
        testdata("split.py").display()
    );
    let mut ns = Workload::start(Command::new("unshare").args([
        "--pid",
        "--fork",
        "--mount-proc",
        "bash",
        "-c",
        &script,
    ]));
    let pid = find_by_cmdline(&marker).expect("namespaced python not found");
    let out = tmp("ns-ebpf.pb.gz");
    let o = Record::to(&out)
        .args(["-p", &pid.to_string()])
        .duration("2")
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    let named =
        d.count_where(|s| s.has_chain(&["<module>", "main", "main.<locals>.loop", "round_"]));
    assert!(
        named as f64 > 0.8 * d.total() as f64,
        "{named} of {} samples named",
        d.total()
    );
    let _ = ns.child.kill();
    // SAFETY: ending the namespaced python this test started, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
