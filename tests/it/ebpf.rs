//! The eBPF frame walker: Python frames with lines for CPython 3.11 – 3.13 without any
//! trampoline, attached to running processes (pyenv builds and Debian's static python3.11).

use perfpy_test_support as common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

#[test]
fn ebpf_walker_names_every_supported_version() {
    let mut pys: Vec<(String, PathBuf)> = [
        "2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13",
    ]
    .iter()
    .filter_map(|m| python(m).map(|p| (m.to_string(), p)))
    .collect();
    if std::path::Path::new("/usr/bin/python3.11").exists() {
        pys.push(("debian-3.11".into(), PathBuf::from("/usr/bin/python3.11")));
    }
    for (name, py) in pys {
        let rep = split_report(&format!("ebpf-{name}"));
        let w = Workload::start(
            Command::new(&py)
                .arg(testdata("split.py"))
                .arg("30")
                .env("SPLIT_REPORT", &rep),
        );
        let out = tmp(&format!("ebpf-{name}.pb.gz"));
        let o = Record::to(&out).pid(w.pid()).duration("3").rate(497).run();
        assert!(o.status.success());
        let d = decode(&out);
        // Qualified names from 3.11 on (co_qualname); before, methods get the class of `self`
        // and other functions the code object's name.
        // 2.7's `Shape` is an old-style class (its instances' type is `instance`).
        let qualified = !matches!(
            name.as_str(),
            "2.7" | "3.6" | "3.7" | "3.8" | "3.9" | "3.10"
        );
        let area = "Shape.area";
        let (inner, lp) = if qualified {
            ("make_closure.<locals>.inner", "main.<locals>.loop")
        } else {
            ("inner", "loop")
        };
        let rounds = d.count_where(|s| s.has("round_"));
        // ~1,400 on an idle machine (3 s at 497 Hz); a sixth of a CPU is enough.
        assert!(rounds > 250, "{name}: {rounds} samples in round_");
        // Compared with the split the workload measured itself.
        let m = measured_split(&rep);
        for (f, key) in [
            ("hot_function", "hot_function"),
            (area, "Shape.area"),
            (inner, "make_closure.<locals>.inner"),
            ("hash_work", "hash_work"),
        ] {
            let want = m[key];
            let got = d.count_where(|s| s.has(f)) as f64 / rounds as f64;
            eprintln!("{name}: {f}: {:.1}%", got * 100.0);
            assert!(
                (got - want).abs() <= 0.05,
                "{name}: {f}: {:.1}%, want {:.0}% ± 5",
                got * 100.0,
                want * 100.0
            );
        }
        let spin = d.count_where(|s| s.has("spin"));
        let full = d.count_where(|s| {
            s.has("spin")
                && s.has_chain(&["<module>", "main", lp, "round_", "hot_function", "spin"])
        });
        assert!(full as f64 >= 0.9 * spin as f64, "{name}: {full} of {spin}");
        // Lines of the hot loop, files of the functions.
        assert_spin_in_its_loop(&d, &name);
        let f = d
            .samples
            .iter()
            .flat_map(|s| &s.frames)
            .find(|f| f.function == area)
            .unwrap();
        assert!(f.file.ends_with("testdata/split.py"));
        // The C extension stays under its Python caller.
        let hashing = d.count_where(|s| s.has("hash_work"));
        let native_under = d.count_where(|s| {
            let i = s.frames.iter().position(|f| f.function == "hash_work");
            i.is_some_and(|i| {
                s.frames[..i].iter().any(|f| {
                    f.mapping.contains("libcrypto")
                        || f.mapping.contains("_hashlib")
                        || f.mapping.contains("_sha256")
                })
            })
        });
        assert!(
            native_under as f64 >= 0.8 * hashing as f64,
            "{name}: {native_under} of {hashing}"
        );
        assert!(d
            .samples
            .iter()
            .any(|s| s.str_labels["frames_from"] == "ebpf"));
        check_go_pprof(&out);
    }
}

#[test]
fn frames_entered_before_injection_are_named_by_the_walker() {
    let Some(py) = python("3.12") else { return };
    let w = Workload::start(Command::new(&py).arg(testdata("split.py")).arg("30"));
    let out = tmp("ebpf-inject.pb.gz");
    let o = Record::to(&out)
        .pid(w.pid())
        .duration("3")
        .arg("--inject-python")
        .run();
    assert!(o.status.success());
    let d = decode(&out);
    let named =
        d.count_where(|s| s.has_chain(&["<module>", "main", "main.<locals>.loop", "round_"]));
    assert!(
        named as f64 >= 0.9 * d.total() as f64,
        "{named} of {}",
        d.total()
    );
}

#[test]
fn ebpf_walker_names_python_2_7() {
    let Some(py) = python("2.7") else { return };
    let w = Workload::start(Command::new(&py).arg(testdata("busy_any.py")).arg("30"));
    let out = tmp("ebpf-2.7.pb.gz");
    let o = Record::to(&out).pid(w.pid()).duration("2").rate(497).run();
    assert!(o.status.success());
    let d = decode(&out);
    // Most CPU is in hot_any; nearly every one of its samples has the chain from <module>.
    let hot = d.count_where(|s| s.has("hot_any"));
    let chained = d.count_where(|s| s.has_chain(&["<module>", "hot_any"]));
    assert!(
        hot as f64 > 0.75 * d.total() as f64,
        "{hot} of {}",
        d.total()
    );
    assert!(chained as f64 >= 0.9 * hot as f64, "{chained} of {hot}");
    let lines: Vec<i64> = d
        .samples
        .iter()
        .flat_map(|s| &s.frames)
        .filter(|f| f.function == "hot_any")
        .map(|f| f.line)
        .collect();
    // The loop's two lines, or rarely the function's first or last (entry, return).
    assert!(lines.iter().all(|l| (9..=12).contains(l)), "{lines:?}");
    assert!(d
        .samples
        .iter()
        .all(|s| s.str_labels.get("python_version").map(|v| v.as_str()) == Some("2.7")));
}

#[test]
fn ebpf_walker_follows_each_thread() {
    // Two threads running the same Python code: each thread's samples get its own frames.
    for minor in ["3.9", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let w = Workload::start(
            Command::new(&py)
                .arg(testdata("split.py"))
                .args(["30", "threads"]),
        );
        let out = tmp(&format!("ebpf-threads-{minor}.pb.gz"));
        let o = Record::to(&out).pid(w.pid()).duration("2").rate(497).run();
        assert!(o.status.success());
        let d = decode(&out);
        let tids: std::collections::HashSet<i64> = d
            .samples
            .iter()
            .filter(|s| s.has("round_"))
            .map(|s| s.num_labels["tid"])
            .collect();
        assert_eq!(
            tids.len(),
            2,
            "{minor}: threads with Python frames: {tids:?}"
        );
        // A worker thread's stack starts in threading's bootstrap, not in <module>.
        let boot =
            d.count_where(|s| s.has("round_") && s.has("Thread._bootstrap") && !s.has("<module>"));
        assert!(
            boot as f64 > 0.8 * d.count_where(|s| s.has("round_")) as f64,
            "{minor}: {boot}"
        );
    }
}

/// Whether a sample's stack is, root first, `<module>` then exactly `recs` `rec` frames and the
/// leaf's own frames, with no Python frame missing and nothing cut.
fn deep_and_whole(s: &Sample, recs: usize) -> bool {
    let names = s.names();
    let root_python = names.iter().rposition(|n| *n == "<module>");
    let first_rec = names.iter().position(|n| *n == "rec");
    let (Some(m), Some(r)) = (root_python, first_rec) else {
        return false;
    };
    // Between the innermost rec and <module>: rec frames only (the interpreter's own native
    // frames are left out of stacks with Python frames).
    names[r..m].iter().all(|n| *n == "rec")
        && m - r == recs
        && !names.iter().any(|n| n.starts_with("[truncated"))
}

#[test]
fn deep_python_stacks_are_whole_on_every_version() {
    // Recursion at depths 200 and 900 (CPython's default recursion limit is 1,000), attached;
    // under 3.12 also with the perf trampoline on (each Python call then a C-level call with a
    // shim frame of its own: twice the walker's loop iterations). One recording per version, its workloads told apart by pid.
    for minor in ["2.7", "3.8", "3.11", "3.12", "3.13"] {
        let Some(py) = python(minor) else { continue };
        let mut runs: Vec<(usize, bool)> = vec![(200, false), (900, false)];
        if minor == "3.12" {
            // Under the trampoline each Python call is a C-level call too, and 3.12 counts
            // those against its C recursion limit (RecursionError at about 750).
            runs.push((700, true));
        }
        let ws: Vec<(usize, bool, Workload)> = runs
            .iter()
            .map(|&(depth, perf)| {
                let mut cmd = Command::new(&py);
                if perf {
                    cmd.args(["-X", "perf"]);
                }
                cmd.arg(testdata("deep.py"))
                    .arg(depth.to_string())
                    .arg("30");
                (depth, perf, Workload::start(&mut cmd))
            })
            .collect();
        let out = tmp(&format!("deep-all-{minor}.pb.gz"));
        let mut args = vec![
            "record",
            "-d",
            "2",
            "-r",
            "497",
            "-o",
            out.to_str().unwrap(),
        ];
        let pids: Vec<String> = ws.iter().map(|w| w.2.pid().to_string()).collect();
        for p in &pids {
            args.extend(["-p", p]);
        }
        let o = run_perfpy(&args);
        assert!(o.status.success(), "{minor}: {o:?}");
        // No stack cut by the walker. (Samples taken in the milliseconds between the events'
        // start and the walker's registration of the targets have no Python frames, and may
        // be cut at the native stack copy's end: they are not counted below.)
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("max-python-frames"), "{minor}: {err}");
        let d = decode(&out);
        let hot = line_of("deep.py", "for i in range(");
        for (depth, perf, w) in &ws {
            let pid = w.pid() as i64;
            // Samples in the loop at the bottom (on the way down or up, a sample rightly has
            // fewer rec frames).
            let mine = d.count_where(|s| {
                s.num_labels["pid"] == pid
                    && s.frames
                        .iter()
                        .find(|f| f.function == "rec")
                        .is_some_and(|f| (hot..=hot + 1).contains(&f.line))
            });
            let whole =
                d.count_where(|s| s.num_labels["pid"] == pid && deep_and_whole(s, depth + 1));
            eprintln!("{minor} depth {depth} perf {perf}: {whole} of {mine} whole");
            assert!(mine > 50, "{minor} depth {depth}: {mine} samples");
            assert!(
                whole as f64 >= 0.95 * mine as f64,
                "{minor} depth {depth} perf {perf}: {whole} of {mine} samples whole"
            );
        }
        check_go_pprof(&out);
    }
}

#[test]
fn c_callbacks_stay_in_place_in_deep_stacks() {
    // sorted() (C) calls the Python key function at the bottom of a recursion 300 deep: its
    // frame sits between rec and key_of. With --keep-interpreter-frames, as sorted is
    // CPython's own C code (left out of stacks with Python frames otherwise). 3.8: one C-level
    // call per Python call; 3.12: Python calls inlined in one C-level call; 3.12 -X perf: a
    // trampoline per Python call.
    for (minor, perf) in [("3.8", false), ("3.12", false), ("3.12", true)] {
        let Some(py) = python(minor) else { continue };
        let mut cmd = Command::new(&py);
        if perf {
            cmd.args(["-X", "perf"]);
        }
        let w = Workload::start(cmd.arg(testdata("deep_callback.py")).arg("300").arg("30"));
        let out = tmp(&format!("deep-callback-{minor}-{perf}.pb.gz"));
        let o = Record::to(&out)
            .pid(w.pid())
            .duration("2")
            .rate(497)
            .arg("--keep-interpreter-frames")
            .run();
        assert!(o.status.success(), "{minor}: {o:?}");
        let d = decode(&out);
        let keyed = d.count_where(|s| s.has("key_of"));
        let in_place = d.count_where(|s| {
            let names = s.names();
            let Some(k) = names.iter().position(|n| *n == "key_of") else {
                return false;
            };
            // Leaf first: key_of, native frames with sorted among them, then the innermost
            // rec, then 300 more rec and <module> at the root.
            let Some(r) = names[k..].iter().position(|n| *n == "rec").map(|i| i + k) else {
                return false;
            };
            let recs = names.iter().filter(|n| **n == "rec").count();
            names[k + 1..r].iter().any(|n| n.contains("builtin_sorted"))
                && recs == 301
                && names.iter().rposition(|n| *n == "<module>") > Some(r)
                && !names.iter().any(|n| n.starts_with("[truncated"))
        });
        eprintln!("{minor} perf {perf}: {in_place} of {keyed} with sorted in place");
        assert!(keyed > 100, "{minor}: {keyed} samples in key_of");
        assert!(
            in_place as f64 >= 0.9 * keyed as f64,
            "{minor} perf {perf}: {in_place} of {keyed} with sorted between rec and key_of"
        );
    }
}

/// ≤ 3.10 names a method from the class of its `self`, which the walker must read at the
/// sample: short-lived objects (`Job`, 2.7's old-style `Old`) are freed and their memory reused
/// by other objects long before the record is read, and a `self` that a lambda or a
/// comprehension captures sits in a cell, its local slot cleared.
#[test]
fn methods_are_named_with_the_class_self_had_at_the_sample() {
    let want = ["Job.work", "Grid.total", "Board.solve", "Old.step"];
    for minor in ["2.7", "3.6", "3.7", "3.8", "3.9", "3.10"] {
        let Some(py) = python(minor) else { continue };
        let w = Workload::start(Command::new(&py).arg(testdata("methods.py")).arg("30"));
        let out = tmp(&format!("methods-{minor}.pb.gz"));
        let o = Record::to(&out).pid(w.pid()).duration("3").rate(497).run();
        assert!(o.status.success(), "{minor}");
        let d = decode(&out);
        // Every frame of one of the four methods, by its bare name, and what it was called.
        let mut named = std::collections::BTreeMap::<String, i64>::new();
        for s in &d.samples {
            for f in &s.frames {
                let bare = f.function.rsplit('.').next().unwrap();
                if ["work", "total", "solve", "step"].contains(&bare)
                    && f.file.ends_with("testdata/methods.py")
                {
                    *named.entry(f.function.clone()).or_default() += s.count;
                }
            }
        }
        let total: i64 = named.values().sum();
        let wrong: i64 = named
            .iter()
            .filter(|(n, _)| !want.contains(&n.as_str()))
            .map(|(_, c)| c)
            .sum();
        eprintln!("{minor}: {named:?}");
        // About a quarter of ~1,500 samples each (3 s at 497 Hz); a sixth of a CPU is enough.
        for m in want {
            let c = named.get(m).copied().unwrap_or(0);
            assert!(c >= 60, "{minor}: {c} samples named {m}: {named:?}");
        }
        assert!(
            wrong * 100 <= total,
            "{minor}: {wrong} of {total} misnamed: {named:?}"
        );
    }
}
