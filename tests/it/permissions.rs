//! Permission failures, simulated here by running perfpy as an unprivileged user (`nobody`,
//! no capabilities) through `setpriv`: each must end with the message that names the fix, and
//! what can still work must work (sampling one's own command, user space only, no eBPF).

use perfpy_test_support as common;

use std::process::{Command, Output, Stdio};

use common::*;

const NOBODY: &str = "65534";

fn as_nobody(args: &[&str]) -> Output {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(perfpy())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs");
    eprintln!(
        "nobody: perfpy {args:?} -> {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory `nobody` can write to.
fn open_dir(name: &str) -> std::path::PathBuf {
    let d = tmp(name);
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

#[test]
fn an_unprivileged_user_profiles_its_own_command_with_warnings() {
    // Debian's interpreter: pyenv's live under /root, out of nobody's reach.
    let py = "/usr/bin/python3.11";
    assert!(
        std::path::Path::new(py).exists(),
        "Debian's python3.11 is part of this machine"
    );
    let dir = open_dir("nobody-own");
    let out = dir.join("own.pb.gz");
    let o = as_nobody(&[
        "record",
        "-d",
        "2",
        "-r",
        "199",
        "-o",
        out.to_str().unwrap(),
        "--",
        py,
        testdata("busy_any.py").to_str().unwrap(),
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // What is missing, said once each, with the fix.
    assert!(
        err.contains("cannot load the eBPF frame walker") && err.contains("CAP_BPF"),
        "{err}"
    );
    assert!(
        err.contains("no permission to sample kernel code") && err.contains("perf_event_paranoid"),
        "{err}"
    );
    assert_eq!(
        err.matches("no permission to sample kernel code").count(),
        1,
        "{err}"
    );
    assert!(
        !err.contains("libbpf:"),
        "libbpf's raw messages leak: {err}"
    );
    // The summary says why the Python frames are not named.
    assert!(
        err.contains("native frames only (eBPF walker not loaded"),
        "{err}"
    );
    // And the samples are there, from user space only.
    let d = decode(&out);
    assert!(d.total() > 100, "{} samples", d.total());
    assert_eq!(
        d.count_where(|s| s.frames.iter().any(|f| f.function.ends_with("_[k]"))),
        0
    );
    assert!(d.count_where(|s| s.has("_PyEval_EvalFrameDefault")) > 50);
}

#[test]
fn an_unprivileged_user_is_told_why_it_cannot_profile_or_inject_another_users_process() {
    let Some(py) = python("3.12") else { return };
    let w =
        Workload::start(Command::new(&py).args([testdata("busy_any.py").to_str().unwrap(), "60"]));
    let pid = w.pid().to_string();
    let dir = open_dir("nobody-other");
    let out = dir.join("other.pb.gz");
    for args in [
        vec!["record", "-p", &pid, "-d", "1", "-o", out.to_str().unwrap()],
        vec![
            "record",
            "-p",
            &pid,
            "--inject-python",
            "-d",
            "1",
            "-o",
            out.to_str().unwrap(),
        ],
        vec!["inject", "-p", &pid],
    ] {
        let o = as_nobody(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("pid {pid} belongs to another user"))
                && err.contains("run perfpy as root"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
    // Untouched: running, not stopped or traced.
    assert!(
        matches!(proc_state(w.pid()), 'R' | 'S'),
        "state {}",
        proc_state(w.pid())
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"));
}
