//! What a user sees first in each output: the profile's main file in `go tool pprof`, process
//! names that follow exec, flamegraph boxes and tooltips, `--function` / `--nolineno`, and
//! speedscope's JSON checked with speedscope's own schema (its npm package) and loaded in
//! speedscope's own app in a headless Chromium.

use perfpy_test_support as common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Records `cmd` (a launched split.py) for 2 s at 1 kHz with `extra` options into `out`.
fn record(out: &Path, extra: &[&str], cmd: &[&str]) -> String {
    let mut args = vec![
        "record",
        "-d",
        "2",
        "-r",
        "1000",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    let o = run_perfpy(&args);
    assert!(o.status.success(), "perfpy failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn go_pprof_file_line(p: &Path) -> String {
    let o = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(p)
        .output()
        .expect("go tool pprof (Go is needed: scripts/deps.sh)");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.starts_with("File: "))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn pprof_main_file_is_the_program_and_names_follow_exec() {
    let split = testdata("split.py");
    let split = split.to_str().unwrap();
    // pyenv: a small executable and libpython3.12.so; Debian: libpython inside python3.11.
    let mut cases: Vec<(Vec<String>, &str)> = Vec::new();
    if let Some(py) = python("3.12") {
        cases.push((vec![py.display().to_string(), split.into()], "python3.12"));
    }
    cases.push((
        vec!["/usr/bin/python3.11".into(), split.into()],
        "python3.11",
    ));
    for (cmd, want) in cases {
        let out = tmp(&format!("main-{want}.pb.gz"));
        let cmd: Vec<&str> = cmd.iter().map(|s| s.as_str()).collect();
        record(&out, &[], &cmd);
        assert_eq!(go_pprof_file_line(&out), format!("File: {want}"));
        check_go_pprof(&out);
    }
    // `chroot DIR python3.14 …`: labelled and summarised as python3.14, not chroot.
    let Some(c) = chroot_python("3.14") else {
        return;
    };
    // `chroot DIR python3.14 …` as users type it: chroot looks python3.14 up in PATH.
    let chroot_args: Vec<String> = std::iter::once(c.get_program())
        .chain(c.get_args().take(1))
        .map(|s| s.to_string_lossy().into_owned())
        .chain(["python3.14".to_string(), chroot_testdata("split.py")])
        .collect();
    // Several runs: which CPU's ring holds which exec's record varies (the chroot's own exec
    // record read after python3.14's relabelled the whole run in 2 of 3 runs before the fix).
    let out = tmp("chroot.pb.gz");
    let args: Vec<&str> = chroot_args.iter().map(|s| s.as_str()).collect();
    for run in 0..4 {
        let stderr = record(&out, &[], &args);
        let d = decode(&out);
        // A sample or two taken while the new program's loader runs can be read before the
        // exec's COMM record (the rings of different CPUs are drained one after the other).
        let py = d.count_where(|s| s.str_labels["comm"] == "python3.14");
        assert!(
            py as f64 >= 0.99 * d.total() as f64,
            "run {run}: comm python3.14 in {py} of {} samples",
            d.total()
        );
        let rows: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains(" samples  "))
            .collect();
        assert!(
            rows.iter().any(|l| l.contains(" python3.14 "))
                && !rows
                    .iter()
                    .any(|l| l.contains(" chroot ") && !l.contains(" 0 samples")),
            "run {run}: summary rows name python3.14, not chroot:\n{stderr}"
        );
    }
    assert_eq!(go_pprof_file_line(&out), "File: python3.14");
}

#[test]
fn flamegraph_boxes_show_base_names_and_tooltips_full_paths() {
    let Some(py) = python("3.12") else { return };
    let split = testdata("split.py");
    let out = tmp("short.svg");
    record(&out, &[], &[py.to_str().unwrap(), split.to_str().unwrap()]);
    let svg = std::fs::read_to_string(&out).unwrap();
    let full = format!("<title>hot_function ({}:", split.display());
    assert!(svg.contains(&full), "tooltip with the full path");
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>').map(|(_, r)| r.split('<').next().unwrap()))
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("hot_function (split.py:")),
        "box text with the base name: {texts:?}"
    );
    assert!(
        !texts
            .iter()
            .any(|t| t.contains(&*split.display().to_string())),
        "no box with the full path: {texts:?}"
    );
}

/// Lines of `func` in collapsed stacks: the `(file:line)` suffixes seen.
fn lines_of(text: &str, func: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for stack in text.lines() {
        for frame in stack.split(';') {
            if let Some(rest) = frame.strip_prefix(&format!("{func} (")) {
                seen.insert(rest.split(')').next().unwrap().to_string());
            }
        }
    }
    seen
}

#[test]
fn function_and_nolineno_aggregate_python_frames() {
    let Some(py) = python("3.12") else { return };
    let split = testdata("split.py");
    let cmd = [py.to_str().unwrap(), split.to_str().unwrap()];
    let path = split.display().to_string();
    let mut got: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for (name, opt) in [
        ("cur", None),
        ("func", Some("--function")),
        ("none", Some("--nolineno")),
    ] {
        let out = tmp(&format!("lines-{name}.txt"));
        record(&out, opt.as_slice(), &cmd);
        got.insert(
            name,
            lines_of(&std::fs::read_to_string(&out).unwrap(), "spin"),
        );
    }
    assert!(
        got["cur"].len() > 1,
        "spin runs on several lines: {:?}",
        got["cur"]
    );
    let def = line_of("split.py", "def spin");
    assert_eq!(got["func"], BTreeSet::from([format!("{path}:{def}")]));
    assert_eq!(got["none"], BTreeSet::from([path]));
}

fn missing(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what} missing: run scripts/deps.sh");
    }
    eprintln!("NOTE: {what} missing (scripts/deps.sh installs it); part of this test not run");
}

fn npm_modules() -> Option<PathBuf> {
    let d = std::env::var_os("PERFPY_NPM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/perfpy/npm"))
        .join("node_modules");
    if d.join("speedscope").exists() && d.join("ajv").exists() {
        return Some(d);
    }
    missing(&format!("speedscope's npm package in {}", d.display()));
    None
}

/// Debian's headless Chromium (or $PERFPY_CHROMIUM) and puppeteer-core next to speedscope.
fn browser(nm: &Path) -> Option<PathBuf> {
    let exe = std::env::var_os("PERFPY_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium-headless-shell"));
    if !exe.exists() {
        missing(&format!("headless Chromium ({})", exe.display()));
        return None;
    }
    if !nm.join("puppeteer-core").exists() {
        missing(&format!("puppeteer-core in {}", nm.display()));
        return None;
    }
    Some(exe)
}

/// The percentage in a speedscope table cell like `358.70ms (33%)`.
fn percent(cell: &serde_json::Value) -> f64 {
    let s = cell.as_str().unwrap_or_default();
    let inner = s.rsplit_once('(').map(|x| x.1).unwrap_or_default();
    // speedscope writes tiny shares as "< 0.01%" (or "<0.01%"): the digits are what is kept.
    let digits: String = inner
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("a self-time cell without a share: {s:?}"))
}

/// Loads `file` in speedscope (headless) and checks the Sandwich view: no page error, one
/// profile per thread, rows sorted by self time with `spin` of split.py on top.
fn check_in_speedscope(nm: &Path, chromium: &Path, file: &Path, split: &Path, profiles: u64) {
    let o = output_within(
        Command::new("node")
            .arg(testdata("speedscope_browser.mjs"))
            .arg(nm)
            .arg(file)
            .arg(chromium),
        std::time::Duration::from_secs(40),
    );
    assert!(
        o.status.success(),
        "speedscope did not show the profile: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!([]), "page errors: {v}");
    let shown = v["profiles"].as_array().unwrap();
    assert_eq!(
        shown.len() as u64,
        profiles,
        "speedscope's profile list: {v}"
    );
    assert!(
        shown.iter().all(|p| p.as_str().unwrap().contains(" / ")),
        "{v}"
    );
    let rows = v["rows"].as_array().unwrap();
    let top = &rows[0];
    assert_eq!(top["name"], "spin", "Sandwich view's top row: {v}");
    assert_eq!(top["file"], split.display().to_string(), "{v}");
    let selves: Vec<f64> = rows.iter().map(|r| percent(&r["self"])).collect();
    assert!(
        selves.windows(2).all(|w| w[0] >= w[1]),
        "rows sorted by self time: {selves:?}"
    );
    // The heaviest thread (a worker) spends ~40% in spin, over its two lines (two rows).
    assert!(
        (20.0..60.0).contains(&selves[0]),
        "self share of spin's busiest line {}% (workload: ~30%)",
        selves[0]
    );
}

#[test]
fn speedscope_output_passes_its_schema_and_shows_the_hot_function_in_speedscope() {
    let Some(py) = python("3.12") else { return };
    let Some(nm) = npm_modules() else { return };
    let split = testdata("split.py");
    let out = tmp("prof.speedscope.json");
    record(
        &out,
        &["-f", "speedscope"],
        &[
            py.to_str().unwrap(),
            split.to_str().unwrap(),
            "10",
            "threads",
        ],
    );
    let o = output_within(
        Command::new("node")
            .arg(testdata("speedscope_check.mjs"))
            .arg(&nm)
            .arg(&out),
        std::time::Duration::from_secs(30),
    );
    assert!(
        o.status.success(),
        "speedscope's schema refused the file: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["top"]["name"], "spin", "{v}");
    assert_eq!(v["top"]["file"], split.display().to_string());
    let share = v["top"]["share"]
        .as_f64()
        .unwrap_or(v["share"].as_f64().unwrap());
    assert!(
        (0.25..0.6).contains(&share),
        "spin's self share {share} (workload: ~0.40)"
    );
    // One profile per thread: the main thread and two workers.
    assert!(v["profiles"].as_u64().unwrap() >= 2, "{v}");
    let profiles = v["profiles"].as_u64().unwrap();
    if let Some(chromium) = browser(&nm) {
        check_in_speedscope(&nm, &chromium, &out, &split, profiles);
    }
}
