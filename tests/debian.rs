//! Debian's own CPython 3.13 – 3.15 (stripped, non-PIE, libpython in the executable), run in the
//! sid chroot `scripts/deps.sh` prepares.
mod common;
use common::*;

/// The chroot's interpreters are there and run the testdata workloads (the helper other tests use).
#[test]
fn sid_chroot_runs_debians_python() {
    for minor in ["3.13", "3.14", "3.15"] {
        let Some(mut cmd) = chroot_python(minor) else {
            continue;
        };
        let out = cmd
            .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            .output()
            .expect("run chroot python");
        assert!(out.status.success(), "{minor}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), minor);
        let mut cmd = chroot_python(minor).unwrap();
        let w = Workload::start(cmd.arg(chroot_testdata("busy_any.py")).arg("5"));
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/root", w.pid())).unwrap(),
            sid_root()
        );
    }
}
