//! Replay tests: recordings captured once on real CPython builds (`testdata/replay/capture.sh`,
//! `PERFPY_CAPTURE=DIR`) fed again through the collector (`perfpy replay DIR`) as an
//! unprivileged user: no root, no eBPF, no perf events, no live interpreter. The stacks a user
//! reads come out of the ring records, the walker's records, the memory and the files saved.

use perfpy_test_support as common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `perfpy replay testdata/replay/NAME` as `nobody` (through `setpriv` when we are root):
/// collapsed stacks, frames root first, with their counts.
fn replay(name: &str) -> BTreeMap<Vec<String>, u64> {
    let dir = testdata("replay").join(name);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(perfpy());
        c
    } else {
        Command::new(perfpy())
    };
    cmd.arg("replay").arg(&dir).args(["-f", "collapsed"]);
    let out = output_within(&mut cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {:?}\n{err}", out.status);
    let mut stacks = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (stack, n) = line.rsplit_once(' ').expect("`stack count`");
        let frames = stack.split(';').map(short).collect();
        *stacks.entry(frames).or_default() += n.parse::<u64>().expect("count");
    }
    assert!(!stacks.is_empty(), "{name}: no stacks replayed\n{err}");
    stacks
}

/// A frame without the directory of its file (captured in another checkout).
fn short(frame: &str) -> String {
    match frame.split_once(" (") {
        Some((f, file)) => format!("{f} ({}", file.rsplit('/').next().unwrap_or(file)),
        None => frame.to_string(),
    }
}

/// Samples whose stack holds `chain` (consecutive frames), and all samples.
fn with_chain(stacks: &BTreeMap<Vec<String>, u64>, chain: &[&str]) -> (u64, u64) {
    let has = |s: &[String]| {
        s.windows(chain.len())
            .any(|w| w.iter().zip(chain).all(|(a, b)| a == b))
    };
    let n = stacks.iter().filter(|(s, _)| has(s)).map(|(_, n)| n).sum();
    (n, stacks.values().sum())
}

fn show(stacks: &BTreeMap<Vec<String>, u64>) -> String {
    stacks
        .iter()
        .map(|(s, n)| format!("{} {n}\n", s.join(";")))
        .collect()
}

/// CPython 3.12 under its perf trampoline (no eBPF walker), Python frames named by its perf
/// map: `<module>` → `rec` ×4 → (`sorted`, the interpreter's, left out) → `key_of`, under
/// the program's native start frames; the trampolines themselves never show.
#[test]
fn trampoline_stack_of_3_12() {
    let stacks = replay("py312-trampoline");
    let rec = "rec (deep_callback.py)";
    let chain = [
        "<module> (deep_callback.py)",
        rec,
        rec,
        rec,
        rec,
        "key_of (deep_callback.py)",
    ];
    let (n, total) = with_chain(&stacks, &chain);
    assert!(
        n * 100 >= total * 70,
        "{n} of {total} samples in {chain:?}:\n{}",
        show(&stacks)
    );
    under_start(&stacks, &chain);
}

/// Stacks holding `chain` start with the program's own `_start`: the native unwinding went
/// through the trampolines (or the walker's frames took the evaluation loop's place) down to
/// the outermost frame.
fn under_start(stacks: &BTreeMap<Vec<String>, u64>, chain: &[&str]) {
    for s in stacks.keys() {
        if s.iter().any(|f| f == chain[0]) {
            assert!(
                s[0] == "_start" && s[1] == "__libc_start_main",
                "not under _start: {s:?}"
            );
        }
    }
}

/// CPython 3.11 with the eBPF walker's records: the Python frames (with their lines) take the
/// place of the evaluation loop's frames, between the native start frames and nothing else.
#[test]
fn walker_merged_stack_of_3_11() {
    let stacks = replay("py311-walker");
    let rec = "rec (deep_callback.py:22)";
    let chain = [
        "<module> (deep_callback.py:30)",
        rec,
        rec,
        rec,
        "rec (deep_callback.py:21)",
    ];
    let (n, total) = with_chain(&stacks, &chain);
    let (key_of, _) = with_chain(&stacks, &[chain[4], "key_of (deep_callback.py:15)"]);
    assert!(
        n * 100 >= total * 70 && key_of * 100 >= total * 40,
        "{n} then {key_of} of {total} samples in {chain:?} → key_of:\n{}",
        show(&stacks)
    );
    under_start(&stacks, &chain);
}

/// CPython 3.12, walker: a C extension (`hashlib` → OpenSSL's libcrypto) called from Python
/// keeps its native frames under the Python caller; the pure Python part is the bulk.
#[test]
fn c_extension_stack() {
    let stacks = replay("py312-c-extension");
    let (hashing, total) = with_chain(
        &stacks,
        &[
            "main (hashing.py:59)",
            "hash_blocks (hashing.py:24)",
            "EVP_update",
        ],
    );
    let (sha, _) = with_chain(&stacks, &["SHA256_Update", "[libcrypto.so.3]"]);
    let (compute, _) = with_chain(
        &stacks,
        &["main (hashing.py:57)", "compute (hashing.py:17)"],
    );
    assert!(
        hashing >= 3 && sha >= hashing && compute * 100 >= total * 50,
        "hash_blocks → EVP_update {hashing}, SHA256_Update {sha}, compute {compute} of {total}:\n{}",
        show(&stacks)
    );
}

/// A directory that is no capture says so.
#[test]
fn not_a_capture_is_refused() {
    let out = output_within(
        Command::new(perfpy()).args(["replay", "/nonexistent-perfpy-capture"]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no files.txt"),
        "{err}"
    );
}

/// The replay gives the recording's own result (`recorded.txt`, written by the capturing
/// run): the same Python stacks with the same counts. (Native names may differ: the fixture
/// keeps the files' own symbol tables, not their separate debug files.)
#[test]
fn replay_gives_what_the_recording_gave() {
    let python_part = |stacks: BTreeMap<Vec<String>, u64>| {
        let mut out: BTreeMap<Vec<String>, u64> = BTreeMap::new();
        for (s, n) in stacks {
            let py: Vec<String> = s.into_iter().filter(|f| f.contains(".py")).collect();
            *out.entry(py).or_default() += n;
        }
        out
    };
    for name in ["py312-trampoline", "py311-walker", "py312-c-extension"] {
        let text = std::fs::read_to_string(testdata("replay").join(name).join("recorded.txt"))
            .expect("recorded.txt");
        let mut recorded = BTreeMap::new();
        for line in text.lines() {
            let (stack, n) = line.rsplit_once(' ').expect("`stack count`");
            let frames: Vec<String> = stack.split(';').map(short).collect();
            *recorded.entry(frames).or_default() += n.parse::<u64>().expect("count");
        }
        let (want, got) = (python_part(recorded), python_part(replay(name)));
        assert_eq!(want, got, "{name}: replay differs from the recording");
    }
}
