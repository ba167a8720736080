//! Native frames of another root: the vDSO, a stripped library named from `.dynsym`, and
//! separate debug files found by build id and by debug link inside the target's root.

use perfpy_test_support as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Debian unstable's root made by scripts/deps.sh (python3.13, 3.14, 3.15, a stripped libc).
fn sid_root() -> Option<PathBuf> {
    let root = PathBuf::from("/var/cache/perfpy/sid");
    if root.join("usr/bin/python3.13").exists() {
        return Some(root);
    }
    assert!(!ci(), "{}: missing; run scripts/deps.sh", root.display());
    eprintln!(
        "NOTE: {} missing (scripts/deps.sh makes it); part of this test not run",
        root.display()
    );
    None
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Records `argv` launched, at 499 Hz, and decodes the profile.
fn record(name: &str, argv: &[&str]) -> Decoded {
    let out = tmp(&format!("{name}.pb.gz"));
    let mut a = vec!["record", "-r", "499", "-o", out.to_str().unwrap(), "--"];
    a.extend_from_slice(argv);
    let o = run_perfpy(&a);
    assert!(o.status.success());
    check_go_pprof(&out);
    decode(&out)
}

/// In `readclock`, the vDSO's frame (under libc's `clock_gettime`) is named, with file
/// `[vdso]`; nothing is `[unknown]`.
fn check_clock(d: &Decoded, what: &str) {
    let clock = d.count_where(|s| s.has("readclock"));
    let vdso = d.count_where(|s| {
        s.has("readclock")
            && s.frames
                .iter()
                .any(|f| f.file == "[vdso]" && f.function.contains("clock_gettime"))
    });
    // In the program's own samples (a sample taken in the middle of the launching `chroot`'s
    // exec has a user address of an image being replaced: unknowable, and not the point here).
    let unknown = d.count_where(|s| {
        s.has("readclock") && s.frames.iter().any(|f| f.function.starts_with("[unknown]"))
    });
    assert!(clock > 100, "{what}: {clock} samples in readclock");
    assert!(
        vdso as f64 >= 0.05 * clock as f64,
        "{what}: {vdso} of {clock} in the vDSO"
    );
    assert_eq!(unknown, 0, "{what}: [unknown] frames");
    // The vDSO's caller is libc's clock_gettime.
    assert!(
        d.count_where(|s| s.has_chain(&["readclock", "clock_gettime", "clock_gettime"])) > 0
            || d.count_where(|s| s.has_chain(&[
                "readclock",
                "__GI___clock_gettime",
                "clock_gettime"
            ])) > 0,
        "{what}: no libc clock_gettime over the vDSO"
    );
}

#[test]
fn vdso_and_a_stripped_libc_of_another_root_are_named() {
    if let Some(py) = python("3.13") {
        let d = record(
            "clock-host",
            &[
                py.to_str().unwrap(),
                testdata("clock.py").to_str().unwrap(),
                "3",
            ],
        );
        check_clock(&d, "pyenv 3.13");
    }
    let Some(root) = sid_root() else { return };
    // The chroot's libc has no .symtab: its functions are named from .dynsym.
    let libc = std::fs::read(root.join("usr/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
    let elf = object::File::parse(&*libc).unwrap();
    assert!(
        object::Object::symbol_table(&elf).is_none(),
        "the chroot's libc is not stripped"
    );
    let code = std::fs::read_to_string(testdata("clock.py")).unwrap();
    let d = record(
        "clock-sid",
        &[
            "chroot",
            root.to_str().unwrap(),
            "python3.13",
            "-c",
            &code,
            "3",
        ],
    );
    check_clock(&d, "Debian sid 3.13");
    let named = d.count_where(|s| s.has_chain(&["readclock", "clock_gettime", "clock_gettime"]));
    assert!(named > 0, "libc's clock_gettime not named from .dynsym");
}

/// `native.c` linked statically with DWARF (`-g`), then split: a stripped executable and its
/// debug file. Returns (stripped, debug file).
fn split_native(dir: &Path, build_id: bool) -> (PathBuf, PathBuf) {
    let full = dir.join("native.full");
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-g", "-static", "-o"])
        .arg(&full)
        .arg(testdata("native.c"));
    cc.arg(if build_id {
        "-Wl,--build-id=sha1"
    } else {
        "-Wl,--build-id=none"
    });
    run(&mut cc);
    let debug = dir.join("native.debug");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&full)
        .arg(&debug));
    let stripped = dir.join("native");
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&stripped)
        .arg(&full));
    run(Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&stripped));
    (stripped, debug)
}

fn build_id_hex(path: &Path) -> String {
    use object::Object;
    let data = std::fs::read(path).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    elf.build_id()
        .unwrap()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A root directory holding only `/bin/native` (static: nothing else is needed to run it).
fn root_with(name: &str, exe: &Path) -> PathBuf {
    let root = tmp(name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(exe, root.join("bin/native")).unwrap();
    root
}

/// Whether the chain main → level1 → level2 → leaf_busy is named with native.c's lines.
fn named_with_lines(d: &Decoded) -> (i64, i64) {
    let leaf = d.count_where(|s| s.has("leaf_busy"));
    let chain = d.count_where(|s| {
        s.has_chain(&["main", "level1", "level2", "leaf_busy"])
            && s.frames
                .iter()
                .any(|f| f.function == "leaf_busy" && f.file.ends_with("native.c") && f.line > 0)
    });
    (leaf, chain)
}

fn record_in_root(name: &str, root: &Path) -> Decoded {
    record(
        name,
        &["chroot", root.to_str().unwrap(), "/bin/native", "2"],
    )
}

#[test]
fn debug_files_in_the_targets_root_by_build_id_and_debug_link() {
    let dir = tmp("debugfiles");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // By build id: /usr/lib/debug/.build-id/xx/yyyy.debug inside the target's root.
    let with_id = dir.join("with-id");
    std::fs::create_dir_all(&with_id).unwrap();
    let (exe, debug) = split_native(&with_id, true);
    let hex = build_id_hex(&exe);
    let root = root_with("root-build-id", &exe);
    let at = root.join(format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &hex[..2],
        &hex[2..]
    ));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::copy(&debug, &at).unwrap();
    let (leaf, chain) = named_with_lines(&record_in_root("dbg-build-id", &root));
    assert!(
        leaf > 200 && chain as f64 >= 0.95 * leaf as f64,
        "build id: {chain} of {leaf}"
    );

    // Without it, the stripped executable has no names at all (so the above came from the
    // debug file)...
    let bare = root_with("root-bare", &exe);
    let d = record_in_root("dbg-none", &bare);
    assert_eq!(d.count_where(|s| s.has("leaf_busy")), 0);
    assert!(d.count_where(|s| s.has("[native]")) > 200);
    // ... and a debug file of another build at the build id's place is not taken.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (_, other_debug) = split_native(&other, true);
    let decoy = root_with("root-decoy", &exe);
    let at = decoy.join(format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &hex[..2],
        &hex[2..]
    ));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    // Same code, different build id (another -o name is enough to change nothing: patch it).
    let mut bytes = std::fs::read(&other_debug).unwrap();
    let id = hex::decode_like(&build_id_hex(&other_debug));
    let pos = bytes.windows(id.len()).position(|w| w == id).unwrap();
    bytes[pos] ^= 0xff;
    std::fs::write(&at, &bytes).unwrap();
    let d = record_in_root("dbg-decoy", &decoy);
    assert_eq!(
        d.count_where(|s| s.has("leaf_busy")),
        0,
        "a debug file of another build was used"
    );

    // By debug link, without build ids (checked by CRC): /bin/.debug/native.debug.
    let no_id = dir.join("no-id");
    std::fs::create_dir_all(&no_id).unwrap();
    let (exe, debug) = split_native(&no_id, false);
    let root = root_with("root-debuglink", &exe);
    std::fs::create_dir_all(root.join("bin/.debug")).unwrap();
    std::fs::copy(&debug, root.join("bin/.debug/native.debug")).unwrap();
    let (leaf, chain) = named_with_lines(&record_in_root("dbg-link", &root));
    assert!(
        leaf > 200 && chain as f64 >= 0.95 * leaf as f64,
        "debug link: {chain} of {leaf}"
    );
}

mod hex {
    pub fn decode_like(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
