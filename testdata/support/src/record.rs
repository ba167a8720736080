//! A builder for `perfpy record` runs, so that a test says what it records (target, rate,
//! duration, options) instead of spelling an argument array, and reads the profile it wrote.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::{check_go_pprof, decode, run_perfpy_env, tmp, Decoded};

/// `perfpy record` with its output in the test's temporary directory.
#[derive(Clone, Debug)]
pub struct Record {
    out: PathBuf,
    args: Vec<String>,
    command: Vec<String>,
    env: Vec<(String, PathBuf)>,
}

impl Record {
    /// A recording written to `<tmp>/<name>` (its extension picks the format, as for users:
    /// `.pb.gz` pprof, `.txt` collapsed, `.svg` flamegraph, `.json` speedscope).
    pub fn new(name: &str) -> Record {
        let out = tmp(name);
        let _ = std::fs::remove_file(&out);
        Record {
            out,
            args: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A recording written to `path` (made by the test, e.g. with [`tmp`]).
    pub fn to(path: &Path) -> Record {
        Record {
            out: path.to_path_buf(),
            args: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `-p PID` (repeatable).
    pub fn pid(self, pid: i32) -> Record {
        self.args(["-p", &pid.to_string()])
    }

    /// `-a`: the whole machine.
    pub fn all(self) -> Record {
        self.arg("-a")
    }

    /// `-r HZ`.
    pub fn rate(self, hz: u32) -> Record {
        self.args(["-r", &hz.to_string()])
    }

    /// `-d DURATION` (as a user writes it: "3", "500ms", "2s").
    pub fn duration(self, d: &str) -> Record {
        self.args(["-d", d])
    }

    /// Any other option, e.g. `.arg("--no-ebpf")`.
    pub fn arg(mut self, a: &str) -> Record {
        self.args.push(a.to_string());
        self
    }

    /// Several options at once, e.g. `.args(["--min-block", "0"])`.
    pub fn args<'a>(mut self, a: impl IntoIterator<Item = &'a str>) -> Record {
        self.args.extend(a.into_iter().map(str::to_string));
        self
    }

    /// The command to launch (after `--`).
    pub fn command<'a>(mut self, argv: impl IntoIterator<Item = &'a str>) -> Record {
        self.command = argv.into_iter().map(str::to_string).collect();
        self
    }

    /// An environment variable for perfpy (and the command it launches).
    pub fn env(mut self, key: &str, value: &Path) -> Record {
        self.env.push((key.to_string(), value.to_path_buf()));
        self
    }

    /// Where the profile is written.
    pub fn output(&self) -> &Path {
        &self.out
    }

    /// The whole argument list, as perfpy gets it.
    pub fn argv(&self) -> Vec<String> {
        let mut v = vec!["record".to_string(), "-o".to_string()];
        v.push(self.out.to_string_lossy().into_owned());
        v.extend(self.args.iter().cloned());
        if !self.command.is_empty() {
            v.push("--".to_string());
            v.extend(self.command.iter().cloned());
        }
        v
    }

    /// Runs it (bounded in time: a hang fails the test), whatever its exit status.
    pub fn run(&self) -> Output {
        let argv = self.argv();
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let env: Vec<(&str, &Path)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_path()))
            .collect();
        run_perfpy_env(&args, &env)
    }

    /// Runs it, requires exit status 0, and decodes the pprof it wrote. Returns the decoded
    /// profile and perfpy's stderr (its summary).
    pub fn profile(&self) -> (Decoded, String) {
        let o = self.run();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            o.status.success(),
            "perfpy {:?} failed ({:?}):\n{stderr}",
            self.argv(),
            o.status
        );
        (decode(&self.out), stderr)
    }

    /// [`Record::profile`], and `go tool pprof` must read the file as well.
    pub fn profile_read_by_go(&self) -> (Decoded, String) {
        let r = self.profile();
        check_go_pprof(&self.out);
        r
    }
}
