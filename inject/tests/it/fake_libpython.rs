//! Processes that look like CPython by their file names but are not: a program that maps a
//! library named `libpython3.12.so` (a copy of zlib, through `LD_PRELOAD`), the same under a
//! name that is not UTF-8, and an executable named `python3.12` (a copy of `sleep`). `discover` reads every file whose name says python,
//! so each must be refused as not Python, by the library and by `perfpy inject`, without the
//! process ever being stopped or traced: injecting into a process that is not CPython would
//! call addresses that hold something else.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use perfpy_inject::{discover, Reason};

/// A real shared library that has nothing of CPython.
fn non_python_library() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib64/libz.so.1",
        "/usr/lib64/libz.so.1",
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib64/libm.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("no libz or libm to disguise as libpython")
}

/// A temporary directory and a `sleep` started from it; killed (it is our child) and the
/// directory removed on every way out of a test, failures included.
struct Target {
    child: Option<Child>,
    dir: PathBuf,
}

impl Target {
    fn dir() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "perfpy-fake-libpython-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Starts `program 300` with `env`, then waits until `disguise` is mapped from offset 0
    /// (the mapping `discover` inspects) and the process is asleep for good.
    fn start(dir: PathBuf, program: &Path, env: &[(&str, &Path)], disguise: &Path) -> Target {
        let mut cmd = Command::new(program);
        cmd.arg("300").stdin(Stdio::null()).stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut t = Target { child: None, dir };
        t.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        // Lossy: the name may be no UTF-8 at all.
        let wanted = disguise.to_string_lossy();
        loop {
            let maps = std::fs::read(format!("/proc/{}/maps", t.pid())).unwrap_or_default();
            let maps = String::from_utf8_lossy(&maps);
            let mapped = maps.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 6 && f[2] == "00000000" && f[5..].join(" ") == wanted
            });
            if mapped && t.status("State:").starts_with('S') {
                // Settled in nanosleep, not in a passing wait of its start-up: the counts the
                // tests compare hold still.
                let before = t.switches();
                std::thread::sleep(Duration::from_millis(50));
                if t.switches() == before {
                    return t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{wanted} not mapped from offset 0 by pid {} in 10 s:\n{maps}",
                t.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn status(&self, key: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = s
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {s}"));
        line[key.len()..].trim().to_string()
    }

    /// Context switches so far. A process asleep in `nanosleep` makes none until its timer
    /// fires; a ptrace attach (even one detached at once) wakes it and adds some. Equal counts
    /// before and after mean it was never stopped, which `TracerPid: 0` afterwards alone
    /// cannot tell.
    fn switches(&self) -> (String, String) {
        (
            self.status("voluntary_ctxt_switches:"),
            self.status("nonvoluntary_ctxt_switches:"),
        )
    }

    fn assert_untouched(&self, switches_before: &(String, String), after: &str) {
        assert_eq!(self.status("TracerPid:"), "0", "traced after {after}");
        let state = self.status("State:");
        assert!(state.starts_with('S'), "state {state} after {after}");
        assert_eq!(
            &self.switches(),
            switches_before,
            "woken (stopped or traced?) by {after}"
        );
    }

    /// Everything a user would check: the library refuses it as not Python, so does
    /// `perfpy inject`, with a message saying so, and the process was never stopped.
    fn assert_refused_untouched(&self) {
        let pid = self.pid();
        let before = self.switches();

        let err = discover(pid).expect_err("a process that is not CPython was discovered as one");
        assert_eq!(err.reason(), Some(Reason::NotPython), "{err}");
        assert!(
            err.to_string().contains("is not a CPython process"),
            "{err}"
        );
        self.assert_untouched(&before, "discover");

        let mut perfpy = Command::new(perfpy_test_support::perfpy())
            .args(["inject", "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: a refusal must not hang either.
        let deadline = Instant::now() + Duration::from_secs(60);
        while perfpy.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = perfpy.kill();
                let _ = perfpy.wait();
                panic!("perfpy inject -p {pid} still running after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = perfpy.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "perfpy inject succeeded: {stderr}");
        assert!(
            stderr.contains("not_python")
                && stderr.contains(&format!("pid {pid} is not a CPython process")),
            "perfpy inject -p {pid}: {stderr}"
        );
        self.assert_untouched(&before, "perfpy inject");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_library_named_libpython_that_is_not_python() {
    let dir = Target::dir();
    let fake = dir.join("libpython3.12.so");
    std::fs::copy(non_python_library(), &fake).unwrap();
    let t = Target::start(dir, Path::new("sleep"), &[("LD_PRELOAD", &fake)], &fake);
    t.assert_refused_untouched();
}

#[test]
fn an_executable_named_python_that_is_not_python() {
    let dir = Target::dir();
    let exe = dir.join("python3.12");
    let sleep = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("no sleep binary");
    std::fs::copy(sleep, &exe).unwrap();
    let t = Target::start(dir, &exe, &[], &exe);
    t.assert_refused_untouched();
}

#[test]
fn a_library_named_libpython_whose_name_is_not_utf8() {
    // File names are bytes: `/proc/PID/maps` is then not UTF-8 either, which once made the
    // whole process unreadable ("stream did not contain valid UTF-8") instead of refused for
    // what it is.
    use std::os::unix::ffi::OsStrExt;
    let dir = Target::dir();
    let fake = dir.join(std::ffi::OsStr::from_bytes(b"lib\xffpython3.12.so"));
    std::fs::copy(non_python_library(), &fake).unwrap();
    let t = Target::start(dir, Path::new("sleep"), &[("LD_PRELOAD", &fake)], &fake);
    t.assert_refused_untouched();
}
