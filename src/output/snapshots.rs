//! Snapshot tests of the writers: one synthetic report (two processes, threads, kernel and
//! native frames, an inlined function, Python frames named by the eBPF walker and by a perf
//! map, a truncated stack, names that need escaping) written in every format and compared with
//! the files in `testdata/snapshots/`. A change of output shows as a diff of those files.
//!
//! `PERFPY_UPDATE_SNAPSHOTS=1 cargo test --bin perfpy output::snapshots` rewrites them; review
//! the diff (`git diff testdata/snapshots`) before committing it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use perfpy_symbolize::Frame;
use pprof::protos::{self, Message};

use crate::profile::{Cut, FrameKey};
use crate::report::{FramesFrom, Report, Sample};
use crate::symbols::{Kind, Resolved};

fn resolved(kind: Kind, frames: &[(&str, Option<&str>, Option<u32>)]) -> Resolved {
    Resolved {
        frames: frames
            .iter()
            .map(|(f, file, line)| Frame {
                function: f.to_string(),
                file: file.map(str::to_string),
                line: *line,
            })
            .collect(),
        kind,
    }
}

fn sample(locs: &[u32], count: u64, pid: u32, tid: u32, thread: &str) -> Sample {
    Sample {
        locs: locs.to_vec(),
        count,
        offcpu_ns: 0,
        wait: None,
        gil_wait: false,
        pid,
        tid: crate::ids::Tid(tid),
        comm: if pid == 20 { "worker.py" } else { "python3.12" }.into(),
        thread: thread.into(),
        frames_from: if pid == 20 {
            FramesFrom::Trampoline
        } else {
            FramesFrom::Ebpf
        },
        python_version: Some("3.12.1".into()),
        container_id: (pid == 20).then(|| "0123abcd".into()),
        main_file: Some(crate::ids::FileId(0)),
    }
}

/// The synthetic report. Locations (leaf first in samples):
/// 0 `spin` (eBPF), 1 `<module>`, 2 `Shape.area`, 3 libcrypto's `sha256_block` with an inlined
/// `sha256_round`, 4 kernel `do_syscall_64`, 5 `hash_work` (perf map), 6 the truncation marker,
/// 7 a native frame without a name, 8 a Python frame whose name holds `;` and `&`.
pub(crate) fn report() -> Report {
    Report {
        locations: vec![
            FrameKey::Py { func: 0, line: 7 },
            FrameKey::Py { func: 1, line: 30 },
            FrameKey::Py { func: 2, line: 12 },
            FrameKey::File {
                file: crate::ids::FileId(1),
                offset: 0x4_1234,
            },
            FrameKey::Kernel(0xffff_ffff_8100_0010),
            FrameKey::Anon {
                proc: crate::ids::ProcessKey(1),
                addr: 0x7f00_0000_1000,
            },
            FrameKey::Truncated(Cut::StackCopy),
            FrameKey::File {
                file: crate::ids::FileId(0),
                offset: 0x2_0000,
            },
            FrameKey::Py { func: 3, line: 3 },
        ],
        resolved: vec![
            resolved(
                Kind::PythonEbpf,
                &[("spin", Some("/srv/app/split.py"), Some(7))],
            ),
            resolved(
                Kind::PythonEbpf,
                &[("<module>", Some("/srv/app/split.py"), Some(30))],
            ),
            resolved(
                Kind::PythonEbpf,
                &[("Shape.area", Some("/srv/app/shapes.py"), Some(12))],
            ),
            resolved(
                Kind::Native { interpreter: false },
                &[
                    ("sha256_round", Some("sha256.c"), Some(88)),
                    ("sha256_block", Some("sha256.c"), Some(140)),
                ],
            ),
            resolved(Kind::Kernel, &[("do_syscall_64", None, None)]),
            resolved(
                Kind::Python,
                &[("hash_work", Some("/srv/app/worker.py"), None)],
            ),
            resolved(Kind::Other, &[(Cut::StackCopy.marker(), None, None)]),
            resolved(
                Kind::Native { interpreter: false },
                &[("0x20000 (python3.12)", None, None)],
            ),
            resolved(
                Kind::PythonEbpf,
                &[("a;b & <c>", Some("/srv/app/odd name.py"), Some(3))],
            ),
        ],
        samples: vec![
            sample(&[0, 1], 60, 10, 10, "MainThread"),
            sample(&[2, 1], 20, 10, 10, "MainThread"),
            sample(&[3, 2, 1], 10, 10, 11, "worker"),
            sample(&[4, 3, 5, 6], 7, 20, 20, "MainThread"),
            sample(&[7], 2, 20, 21, "pool-1"),
            sample(&[8, 1], 1, 10, 10, "MainThread"),
        ],
        period_ns: 10_000_000,
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        duration: Duration::from_secs(5),
        files: vec![
            ("/usr/bin/python3.12".into(), Some(vec![0x12, 0x34])),
            (
                "/usr/lib/x86_64-linux-gnu/libcrypto.so.3".into(),
                Some(vec![0xab, 0xcd, 0xef]),
            ),
        ],
        command: "perfpy record -o prof.pb.gz -- python3.12 split.py".into(),
        offcpu: false,
    }
}

/// Compares `got` with `testdata/snapshots/NAME`, or writes it there with
/// `PERFPY_UPDATE_SNAPSHOTS=1`.
fn check(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/snapshots")
        .join(name);
    if std::env::var_os("PERFPY_UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; PERFPY_UPDATE_SNAPSHOTS=1 writes it",
            path.display()
        )
    });
    if want != got {
        let first = want
            .lines()
            .zip(got.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(got.lines().count()));
        panic!(
            "{} differs from the writer's output from line {}:\n  want: {:?}\n  got:  {:?}\n\
             If the change is intended: PERFPY_UPDATE_SNAPSHOTS=1 cargo test --bin perfpy \
             output::snapshots, then review `git diff testdata/snapshots`",
            path.display(),
            first + 1,
            want.lines().nth(first),
            got.lines().nth(first),
        );
    }
}

#[test]
fn collapsed() {
    let mut out = Vec::new();
    super::collapsed::write(&report(), &mut out).unwrap();
    check("collapsed.txt", &String::from_utf8(out).unwrap());
}

#[test]
fn flamegraph() {
    let mut out = Vec::new();
    super::flamegraph::write(&report(), "perfpy: split.py", &mut out).unwrap();
    check("flamegraph.svg", &String::from_utf8(out).unwrap());
}

#[test]
fn flamegraph_without_samples() {
    let mut r = report();
    r.samples.clear();
    let mut out = Vec::new();
    super::flamegraph::write(&r, "perfpy: idle.py", &mut out).unwrap();
    check("flamegraph-empty.svg", &String::from_utf8(out).unwrap());
}

#[test]
fn speedscope() {
    let mut out = Vec::new();
    super::speedscope::write(&report(), "split.py", &mut out).unwrap();
    // One line of JSON: pretty-printed, so that a change reads as a small diff.
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    check(
        "speedscope.json",
        &(serde_json::to_string_pretty(&v).unwrap() + "\n"),
    );
}

/// The gzip'd protobuf, decoded: its fields as text (the bytes themselves would say nothing
/// in a diff).
#[test]
fn pprof() {
    let mut out = Vec::new();
    super::pprof::write(&report(), &mut out).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut bytes).unwrap();
    let p = protos::Profile::decode(&bytes[..]).unwrap();
    check("pprof.txt", &format!("{p:#?}\n"));
}

/// Names read from reused memory can hold control characters (a NUL made the SVG invalid
/// XML): every writer shows them escaped, none writes them.
#[test]
fn control_characters_in_names_are_escaped_by_every_writer() {
    let mut r = report();
    r.resolved[8] = resolved(
        Kind::PythonEbpf,
        &[("a\0b\u{1}", Some("/srv/app/x\ny.py"), Some(3))],
    );
    r.samples[5].thread = "w\0\u{85}".into();
    r.samples[5].comm = "p\ty".into();
    // Raw control characters other than the writers' own line breaks.
    let raw = |s: &str| s.chars().any(|c| c.is_control() && c != '\n');
    let mut out = Vec::new();
    super::collapsed::write(&r, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(!raw(&text), "{text:?}");
    assert!(
        text.contains("a\\x00b\\x01 (/srv/app/x\\x0ay.py:3)"),
        "{text}"
    );
    // One line per distinct stack: the file name's newline did not split one.
    assert!(text
        .lines()
        .all(|l| l.rsplit(' ').next().unwrap().parse::<u64>().is_ok()));
    let mut out = Vec::new();
    super::flamegraph::write(&r, "perfpy: \0split.py", &mut out).unwrap();
    let svg = String::from_utf8(out).unwrap();
    assert!(!raw(&svg));
    assert!(svg.contains("a\\x00b\\x01 (/srv/app/x\\x0ay.py:3)"));
    let mut out = Vec::new();
    super::speedscope::write(&r, "split.py", &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let names = v["shared"]["frames"].as_array().unwrap();
    assert!(names.iter().any(|f| f["name"] == "a\\x00b\\x01"));
    assert!(
        !raw(&v.to_string().replace("\\n", ""))
            && !raw(&serde_json::to_string(&v["shared"]).unwrap())
    );
    for p in v["profiles"].as_array().unwrap() {
        assert!(!raw(p["name"].as_str().unwrap()));
    }
    for f in names {
        assert!(!raw(f["name"].as_str().unwrap()) && !raw(f["file"].as_str().unwrap_or("")));
    }
    let p = super::pprof::encode(&r);
    assert!(
        p.string_table.iter().all(|s| !raw(s)),
        "{:?}",
        p.string_table
    );
    assert!(p.string_table.iter().any(|s| s == "a\\x00b\\x01"));
}
