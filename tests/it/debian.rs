//! Debian's own CPython 3.13 – 3.15 (stripped, non-PIE, libpython in the executable), run in the
//! sid chroot `scripts/deps.sh` prepares.
use common::*;
use perfpy_test_support as common;

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

const PARTS: [&str; 4] = [
    "hot_function",
    "Shape.area",
    "make_closure.<locals>.inner",
    "hash_work",
];
const CHAIN: [&str; 6] = SPLIT_CHAIN;

/// The line of each frame of the chain to `spin` (root first), in testdata/split.py; for
/// spin, its loop (two lines).
fn chain_lines() -> Vec<(&'static str, Vec<i64>)> {
    let spin = line_of("split.py", "def spin");
    vec![
        ("<module>", vec![line_of("split.py", "    main()")]),
        ("main", vec![line_of("split.py", "        loop()")]),
        (
            "main.<locals>.loop",
            vec![line_of("split.py", "    round_(n, k, closure, shape)")],
        ),
        ("round_", vec![line_of("split.py", "hot_function(4 * n)")]),
        ("hot_function", vec![line_of("split.py", "return spin(n)")]),
        ("spin", vec![spin + 2, spin + 3]),
    ]
}

/// Attached with no trampoline (`record -p`, nothing injected, no -X perf) to Debian's 3.13,
/// 3.14, 3.15 (stripped, non-PIE, libpython in the executable, run in the sid chroot) and to
/// pyenv's 3.13: the walker takes its offsets from the target's `_Py_DebugOffsets` and gives the
/// workload's own CPU split within ±2 points, the whole chain from `<module>`, the right line of
/// every frame, qualified names, the C extension under its Python caller; `info` says where the
/// offsets come from.
#[test]
fn walker_from_the_targets_debug_offsets_debian_and_pyenv() {
    let mut targets: Vec<(String, std::process::Command, String, std::path::PathBuf)> = Vec::new();
    for minor in ["3.13", "3.14", "3.15"] {
        if let Some(mut cmd) = chroot_python(minor) {
            let (host, inside) = chroot_tmp(&format!("split-{minor}"));
            cmd.arg(chroot_testdata("split.py"))
                .arg("60")
                .env("SPLIT_REPORT", &inside);
            targets.push((format!("Debian {minor}"), cmd, inside, host));
        }
    }
    if let Some(py) = python("3.13") {
        let rep = split_report("pyenv-3.13");
        let mut cmd = std::process::Command::new(py);
        cmd.arg(testdata("split.py"))
            .arg("60")
            .env("SPLIT_REPORT", &rep);
        targets.push(("pyenv 3.13".into(), cmd, String::new(), rep));
    }
    for (what, mut cmd, _, report) in targets {
        cmd.env_remove("PYTHONPERFSUPPORT");
        let w = Workload::start(&mut cmd);
        let pid = w.pid().to_string();
        // info: the walker, with the target's own offsets.
        let o = run_perfpy(&["info", "-p", &pid, "--json"]);
        assert!(o.status.success(), "{what}: info failed");
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let p = &info["python_processes"][0];
        assert_eq!(p["ebpf"], "yes", "{what}: {p}");
        assert!(
            p["ebpf_offsets"]
                .as_str()
                .unwrap()
                .starts_with("the target's debug offsets"),
            "{what}: {p}"
        );
        let o = run_perfpy(&["info", "-p", &pid]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("offsets from the target's debug offsets")
        );

        let out = tmp(&format!("{}.pb.gz", what.replace(' ', "-")));
        let o = Record::to(&out)
            .args(["-p", &pid])
            .duration("5")
            .rate(1000)
            .run();
        assert!(o.status.success(), "{what}: record failed");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("Python frames from the eBPF walker"),
            "{what}: {stderr}"
        );
        let measured = measured_split(&report);
        drop(w);
        let d = decode(&out);
        check(&d, &what, &measured);
    }
}

fn check(d: &Decoded, what: &str, measured: &std::collections::HashMap<String, f64>) {
    let rounds = d.count_where(|s| s.has("round_"));
    assert!(rounds >= 800, "{what}: too few samples in round_: {rounds}");
    // Nothing from a trampoline: no trampoline was turned on.
    assert_eq!(
        d.count_where(|s| s.str_labels["frames_from"].contains("trampoline")),
        0,
        "{what}"
    );
    assert_split(d, what, "round_", &PARTS, measured, 0.02);
    // ≥ 90% of spin's samples carry the whole chain from <module>, each frame on its line.
    let spin = d.count_where(|s| s.has("spin"));
    let full = d.count_where(|s| s.has("spin") && s.has_chain(&CHAIN));
    assert!(spin > 100, "{what}: {spin} samples of spin");
    assert!(
        full as f64 >= 0.9 * spin as f64,
        "{what}: only {full} of {spin} samples of spin have the chain {CHAIN:?}"
    );
    let lines = chain_lines();
    let right_lines = d.count_where(|s| {
        s.has_chain(&CHAIN)
            && lines.iter().all(|(name, want)| {
                s.frames
                    .iter()
                    .find(|f| f.function == *name)
                    .is_some_and(|f| want.contains(&f.line))
            })
    });
    assert!(
        right_lines as f64 >= 0.98 * full as f64,
        "{what}: only {right_lines} of {full} full chains have every line right: {:?}",
        d.samples
            .iter()
            .filter(|s| s.has_chain(&CHAIN))
            .map(|s| s
                .frames
                .iter()
                .map(|f| (f.function.as_str(), f.line))
                .collect::<Vec<_>>())
            .find(|v| !lines
                .iter()
                .all(|(n, w)| v.iter().any(|(f, l)| f == n && w.contains(l))))
    );
    // Qualified names: a method and a closure.
    for q in ["Shape.area", "make_closure.<locals>.inner"] {
        assert!(d.count_where(|s| s.has(q)) > 0, "{what}: no {q}");
    }
    // The C extension's native frames sit under hash_work (leaf-ward), not elsewhere.
    let hashing = d.count_where(|s| s.has("hash_work"));
    let native_under = d.count_where(|s| {
        let i = s.frames.iter().position(|f| f.function == "hash_work");
        i.is_some_and(|i| {
            s.frames[..i]
                .iter()
                .any(|f| f.mapping.contains("libcrypto") || f.mapping.contains("_hashlib"))
        })
    });
    assert!(
        native_under as f64 >= 0.8 * hashing as f64,
        "{what}: only {native_under} of {hashing} hash_work samples have C-extension frames under it"
    );
    let above = d.count_where(|s| {
        let i = s.frames.iter().position(|f| f.function == "<module>");
        i.is_some_and(|i| {
            s.frames[i..]
                .iter()
                .any(|f| f.mapping.contains("libcrypto") || f.mapping.contains("_hashlib"))
        })
    });
    assert_eq!(above, 0, "{what}: C-extension frames above <module>");
    // Python frames sit where their evaluation calls run, under the program's entry in libc
    // (__libc_start_main or __libc_start_main_impl), never at the stack's root (where 3.15's
    // thread base frame once put them).
    let rooted = d.count_where(|s| {
        s.has("<module>") && s.frames.last().is_some_and(|f| f.file.ends_with(".py"))
    });
    let start = d.count_where(|s| {
        let i = s.frames.iter().position(|f| f.function == "<module>");
        i.is_some_and(|i| {
            s.frames[i..]
                .iter()
                .any(|f| f.function.starts_with("__libc_start"))
        })
    });
    let modules = d.count_where(|s| s.has("<module>"));
    assert!(
        rooted == 0 && start as f64 >= 0.95 * modules as f64,
        "{what}: {rooted} of {modules} samples have a Python frame at the root; {start} have __libc_start_main under <module>"
    );
}

/// A process whose `_Py_DebugOffsets` is corrupt (it overwrites its own, which CPython itself
/// never reads): `info` and the record summary give the reason, the profile has native frames
/// only — no misread Python stack. One with a wrong cookie (pyenv's 3.13), one with an offset
/// out of range (Debian's 3.14: `interpreter_frame.owner`, field 36 of its layout).
#[test]
fn a_corrupt_debug_offsets_table_is_refused_with_its_reason() {
    let script = |at: usize, bytes: &str| {
        format!(
            "import ctypes, os, sys\n\
             a = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, '_PyRuntime'))\n\
             ctypes.memmove(a + {at}, {bytes}, 8)\n\
             def busy_here():\n\
             \x20   x = 0\n\
             \x20   while True:\n\
             \x20       x += 1\n\
             print('ready', os.getpid(), flush=True)\n\
             busy_here()\n"
        )
    };
    let mut cases: Vec<(String, std::process::Command, &str)> = Vec::new();
    if let Some(py) = python("3.13") {
        let mut c = std::process::Command::new(py);
        c.args(["-c", &script(0, "b'ydebugpy'")]);
        cases.push(("pyenv 3.13".into(), c, "cookie"));
    }
    if let Some(mut c) = chroot_python("3.14") {
        // 8 (cookie) + 8 * 35: interpreter_frame.owner in the 3.14 layout.
        c.args(["-c", &script(8 + 8 * 35, "(1 << 20).to_bytes(8, 'little')")]);
        cases.push((
            "Debian 3.14".into(),
            c,
            "interpreter_frame.owner = 1048576 is out of range",
        ));
    }
    for (what, mut cmd, reason) in cases {
        let w = Workload::start(&mut cmd);
        let pid = w.pid().to_string();
        let o = run_perfpy(&["info", "-p", &pid, "--json"]);
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ebpf = info["python_processes"][0]["ebpf"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            ebpf.starts_with("no: ") && ebpf.contains(reason),
            "{what}: {ebpf}"
        );
        let out = tmp(&format!("corrupt-{}.pb.gz", what.replace(' ', "-")));
        let o = Record::to(&out)
            .args(["-p", &pid])
            .duration("2")
            .rate(499)
            .run();
        assert!(o.status.success(), "{what}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("native frames only (") && stderr.contains(reason),
            "{what}: {stderr}"
        );
        let d = decode(&out);
        assert!(d.total() > 50, "{what}: {} samples", d.total());
        assert_eq!(
            d.count_where(|s| s.str_labels["frames_from"] != "native"),
            0,
            "{what}: Python frames from a refused table"
        );
        assert_eq!(d.count_where(|s| s.has("busy_here")), 0, "{what}");
    }
}

/// Attached with `--inject-python` to Debian's 3.13 – 3.15 in the chroot: frames entered
/// before activation (`<module>`, `main`, the loop) are named (the walker names them), and the
/// trampoline is off again afterwards, as it was found.
#[test]
fn debian_interpreters_attached_with_injection() {
    for minor in ["3.13", "3.14", "3.15"] {
        let Some(mut cmd) = chroot_python(minor) else {
            continue;
        };
        let w = Workload::start(cmd.arg(chroot_testdata("split.py")).arg("60"));
        let pid = w.pid().to_string();
        let status = |what: &str| {
            let o = run_perfpy(&["inject", "-p", &pid, "--status"]);
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(o.status.success(), "{minor} {what}: {text}");
            text
        };
        assert!(status("before").contains("perf trampoline off"), "{minor}");
        let out = tmp(&format!("debian-inject-{minor}.pb.gz"));
        let o = Record::to(&out)
            .args(["-p", &pid, "--inject-python"])
            .duration("3")
            .rate(499)
            .run();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{minor}: {err}");
        assert!(
            err.contains("perf trampoline turned on") && err.contains("turned off again"),
            "{minor}: {err}"
        );
        let d = decode(&out);
        let spin = d.count_where(|s| s.has("spin"));
        let whole = d.count_where(|s| s.has("spin") && s.has_chain(&CHAIN));
        assert!(spin > 50, "{minor}: {spin} samples in spin");
        assert!(
            whole as f64 >= 0.9 * spin as f64,
            "{minor}: {whole} of {spin} spin samples with the chain from <module>"
        );
        assert!(status("after").contains("perf trampoline off"), "{minor}");
    }
}
