//! What perfpy's integration tests share (the binary's, inject's and bpf's): interpreters
//! (pyenv's and the Debian sid chroot's), workloads started with a handshake, the built binary
//! and a builder for its `record` runs ([`Record`]), a decoder of the pprof it writes, bounded
//! waits, and the test OpenTelemetry Collector ([`otelcol`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pprof::protos::Message;

mod record;
pub use record::Record;

/// The `perfpy` binary built with the tests: beside the test binary's `deps/` directory
/// (`CARGO_BIN_EXE_perfpy` exists only in the binary's own crate). Missing: a failure that says
/// how to build it, never a skip.
pub fn perfpy() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let p = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("perfpy"))
        .expect("the test binary is in target/<profile>/deps");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        p.display()
    );
    p
}

/// The repository's top directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository")
}

pub fn testdata(name: &str) -> PathBuf {
    root().join("testdata").join(name)
}

/// Under CI (`CI=true`), where a missing interpreter or tool fails the test.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The pyenv interpreter `3.X`. Missing: a failure under CI=true, otherwise `None` with a note.
pub fn python(minor: &str) -> Option<PathBuf> {
    let base = Path::new("/root/.pyenv/versions");
    let dir = std::fs::read_dir(base).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(&format!("{minor}.")))
    });
    let exe = dir.map(|d| base.join(d).join("bin").join(format!("python{minor}")));
    match exe {
        Some(p) if p.exists() => Some(p),
        _ => {
            if ci() {
                panic!(
                    "CPython {minor} is not installed under {}: CI needs every supported version",
                    base.display()
                );
            }
            eprintln!("NOTE: CPython {minor} not installed; part of this test not run");
            None
        }
    }
}

/// `cmd`'s process is killed when the test thread that starts it ends, however it ends: a test
/// binary killed by its time limit must not leave busy workloads behind (Drop does not run).
pub fn die_with_the_test(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A process started by a test, killed (by pid) when dropped.
pub struct Workload {
    pub child: Child,
}

impl Workload {
    /// Starts `cmd` and waits (up to 30 s) for it to print a line starting with "ready".
    pub fn start(cmd: &mut Command) -> Workload {
        die_with_the_test(cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start workload");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if line.starts_with("ready") {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("workload did not print ready");
        Workload { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Process state letter from /proc (R, S, T, t, Z...).
    pub fn state(&self) -> char {
        proc_state(self.pid())
    }
}

pub fn proc_state(pid: i32) -> char {
    perfpy_process::proc::stat(pid as u32).map_or('?', |s| s.state)
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_perfpy(args: &[&str]) -> Output {
    run_perfpy_env(args, &[])
}

/// Runs perfpy with extra environment variables (passed on to a command it launches).
pub fn run_perfpy_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(perfpy());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).stdin(Stdio::null());
    let out = output_within(&mut cmd, Duration::from_secs(600));
    eprintln!(
        "perfpy {:?} -> {:?}\n{}",
        args,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("perfpy-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[derive(Debug, Clone)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: i64,
    pub mapping: String,
}

#[derive(Debug, Clone)]
pub struct Sample {
    /// Leaf first, inlined frames expanded.
    pub frames: Vec<Frame>,
    pub count: i64,
    pub nanos: i64,
    pub str_labels: HashMap<String, String>,
    pub num_labels: HashMap<String, i64>,
}

impl Sample {
    pub fn names(&self) -> Vec<&str> {
        self.frames.iter().map(|f| f.function.as_str()).collect()
    }
    pub fn has(&self, f: &str) -> bool {
        self.frames.iter().any(|x| x.function == f)
    }
    /// Whether `chain` (root first) appears in order, each next one deeper in the stack.
    pub fn has_chain(&self, chain: &[&str]) -> bool {
        let names: Vec<&str> = self.names().into_iter().rev().collect();
        let mut i = 0;
        for n in names {
            if i < chain.len() && n == chain[i] {
                i += 1;
            }
        }
        i == chain.len()
    }
}

pub struct Decoded {
    pub profile: pprof::protos::Profile,
    pub samples: Vec<Sample>,
}

impl Decoded {
    pub fn total(&self) -> i64 {
        self.samples.iter().map(|s| s.count).sum()
    }
    pub fn count_where(&self, f: impl Fn(&Sample) -> bool) -> i64 {
        self.samples.iter().filter(|s| f(s)).map(|s| s.count).sum()
    }
    pub fn string(&self, i: i64) -> &str {
        &self.profile.string_table[i as usize]
    }
}

pub fn decode(path: &Path) -> Decoded {
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open profile"));
    let mut bytes = Vec::new();
    gz.read_to_end(&mut bytes).expect("gzip");
    let p = pprof::protos::Profile::decode(bytes.as_slice()).expect("protobuf");
    let s = |i: i64| p.string_table[i as usize].clone();
    let funcs: HashMap<u64, &pprof::protos::Function> =
        p.function.iter().map(|f| (f.id, f)).collect();
    let maps: HashMap<u64, &pprof::protos::Mapping> = p.mapping.iter().map(|m| (m.id, m)).collect();
    let locs: HashMap<u64, &pprof::protos::Location> =
        p.location.iter().map(|l| (l.id, l)).collect();
    let mut samples = Vec::new();
    for smp in &p.sample {
        let mut frames = Vec::new();
        for lid in &smp.location_id {
            let l = locs[lid];
            let mapping = maps
                .get(&l.mapping_id)
                .map(|m| s(m.filename))
                .unwrap_or_default();
            for line in &l.line {
                let f = funcs[&line.function_id];
                frames.push(Frame {
                    function: s(f.name),
                    file: s(f.filename),
                    line: line.line,
                    mapping: mapping.clone(),
                });
            }
        }
        let mut str_labels = HashMap::new();
        let mut num_labels = HashMap::new();
        for l in &smp.label {
            if l.str != 0 {
                str_labels.insert(s(l.key), s(l.str));
            } else {
                num_labels.insert(s(l.key), l.num);
            }
        }
        samples.push(Sample {
            frames,
            count: smp.value[0],
            nanos: smp.value[1],
            str_labels,
            num_labels,
        });
    }
    Decoded {
        profile: p,
        samples,
    }
}

/// `go tool pprof -top` (and `-traces`) must read the file. Go missing: failure under CI.
pub fn check_go_pprof(path: &Path) {
    for mode in ["-top", "-traces"] {
        let out = Command::new("go")
            .args(["tool", "pprof", mode])
            .arg(path)
            .output();
        match out {
            Ok(o) => assert!(
                o.status.success(),
                "go tool pprof {mode} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => {
                if ci() {
                    panic!("go is needed under CI to check the pprof output: {e}");
                }
                eprintln!("NOTE: go not installed; go tool pprof check not run");
                return;
            }
        }
    }
}

/// `cmd.output()`, but a command still running after `limit` is killed and the test fails
/// saying so: a hang must fail the suite with its name, never stall CI.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|x| Box::new(x) as _));
    let err = drain(child.stderr.take().map(|x| Box::new(x) as _));
    let Some(status) = wait_exit(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        panic!("{cmd:?} still running after {limit:?}: killed; its stderr:\n{err}");
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The split a `split.py` run measured itself (its `$SPLIT_REPORT` file): name → fraction.
pub fn measured_split(path: &Path) -> HashMap<String, f64> {
    let text = std::fs::read_to_string(path).expect("split report");
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The tolerance for a share `share` measured over `n` samples: `stated`, or three standard
/// errors where the samples are few (on a busy machine each sample falls on the target at
/// random), whichever is larger.
pub fn share_tolerance(share: f64, n: f64, stated: f64) -> f64 {
    (3.0 * (share * (1.0 - share) / n.max(1.0)).sqrt()).max(stated)
}

/// Each of `parts` has, among the samples of `within`, the share the workload measured itself
/// (`measured`), within `tolerance` (a fraction: 0.05 is ±5 points).
pub fn assert_split(
    d: &Decoded,
    what: &str,
    within: &str,
    parts: &[&str],
    measured: &HashMap<String, f64>,
    tolerance: f64,
) {
    let all = d.count_where(|s| s.has(within)) as f64;
    for f in parts {
        let want = measured[*f];
        let got = d.count_where(|s| s.has(f)) as f64 / all.max(1.0);
        eprintln!(
            "{what}: {f}: {:.1}% (measured {:.1}%)",
            got * 100.0,
            want * 100.0
        );
        assert!(
            (got - want).abs() <= tolerance,
            "{what}: {f} has {:.1}% of the samples, the workload measured {:.1}% (± {:.0} points)",
            got * 100.0,
            want * 100.0,
            tolerance * 100.0
        );
    }
}

/// The lines at which `function`'s frames were sampled, one per frame.
impl Decoded {
    pub fn lines_of(&self, function: &str) -> Vec<i64> {
        self.samples
            .iter()
            .flat_map(|s| &s.frames)
            .filter(|f| f.function == function)
            .map(|f| f.line)
            .collect()
    }
}

/// split.py's call chain to its hot loop (3.11+ qualified names), root first.
pub const SPLIT_CHAIN: [&str; 6] = [
    "<module>",
    "main",
    "main.<locals>.loop",
    "round_",
    "hot_function",
    "spin",
];

/// split.py's `spin` was sampled in its loop: its `for` line and the next in ≥ 99% of its
/// frames, and never outside the function (a sample can land on `s = 0` as it is entered, or
/// `return s` as it leaves).
pub fn assert_spin_in_its_loop(d: &Decoded, what: &str) {
    let lines = d.lines_of("spin");
    let hot = line_of("split.py", "def spin") + 2;
    let in_loop = lines
        .iter()
        .filter(|l| (hot..=hot + 1).contains(*l))
        .count();
    assert!(
        in_loop as f64 >= 0.99 * lines.len() as f64,
        "{what}: spin lines {lines:?}"
    );
    assert!(
        lines.iter().all(|l| (hot - 2..=hot + 2).contains(l)),
        "{what}: spin lines {lines:?}"
    );
}

/// A fresh path for a `split.py` report.
pub fn split_report(name: &str) -> PathBuf {
    let p = tmp(&format!("{name}.split"));
    let _ = std::fs::remove_file(&p);
    p
}

/// The 1-based line of the first line of `testdata/<file>` containing `needle`.
pub fn line_of(file: &str, needle: &str) -> i64 {
    let text = std::fs::read_to_string(testdata(file)).unwrap();
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle in file") as i64
        + 1
}

/// The Debian sid chroot `scripts/deps.sh` prepares (python3.13 – 3.15 as Debian builds them).
pub fn sid_root() -> PathBuf {
    std::env::var_os("PERFPY_SID")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/perfpy/sid"))
}

/// Where testdata/*.py are inside the chroot (copied there by `chroot_python`).
pub const CHROOT_TESTDATA: &str = "/perfpy-testdata";

/// Debian's `python3.X` of the sid chroot, as a `Command` running
/// `chroot SID /usr/bin/python3.X` (add the script and its arguments; script paths are inside
/// the chroot: `chroot_testdata("split.py")`). Copies testdata/*.py into `SID/perfpy-testdata/`
/// first. Missing: a failure under CI=true, otherwise `None` with a note (run scripts/deps.sh).
pub fn chroot_python(minor: &str) -> Option<Command> {
    let root = sid_root();
    let exe = format!("/usr/bin/python{minor}");
    if !root.join(exe.trim_start_matches('/')).exists() {
        if ci() {
            panic!(
                "Debian's python{minor} is not in {}: run scripts/deps.sh (CI needs it)",
                root.display()
            );
        }
        eprintln!(
            "NOTE: Debian's python{minor} not in {} (scripts/deps.sh makes it); part of this test not run",
            root.display()
        );
        return None;
    }
    sync_testdata(&root);
    let mut cmd = Command::new("chroot");
    cmd.arg(&root).arg(exe);
    Some(cmd)
}

/// `testdata/<name>` as seen from inside the chroot.
pub fn chroot_testdata(name: &str) -> String {
    format!("{CHROOT_TESTDATA}/{name}")
}

/// A fresh file path usable by a process in the chroot: (path on the host, path inside).
pub fn chroot_tmp(name: &str) -> (PathBuf, String) {
    let inside = format!("/tmp/perfpy-tests-{}/{name}", std::process::id());
    let host = sid_root().join(inside.trim_start_matches('/'));
    std::fs::create_dir_all(host.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&host);
    (host, inside)
}

/// Copies testdata/*.py into the chroot where they differ; each file written under a temporary
/// name and renamed, so tests running at the same time never see half a file.
fn sync_testdata(root: &Path) {
    let dst = root.join(CHROOT_TESTDATA.trim_start_matches('/'));
    std::fs::create_dir_all(&dst).expect("create the chroot's testdata directory");
    for e in std::fs::read_dir(root_testdata())
        .unwrap()
        .filter_map(|e| e.ok())
    {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("py") {
            continue;
        }
        let text = std::fs::read(&p).unwrap();
        let target = dst.join(e.file_name());
        if std::fs::read(&target).is_ok_and(|t| t == text) {
            continue;
        }
        let tmp = dst.join(format!(
            ".{}.{}",
            e.file_name().to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, &text).unwrap();
        std::fs::rename(&tmp, &target).unwrap();
    }
}

fn root_testdata() -> PathBuf {
    root().join("testdata")
}
pub mod otelcol;
