//! The layout perfpy holds of `_Py_DebugOffsets` agrees with each version's own header (pyenv's
//! 3.13, Debian's 3.13 – 3.15 in the sid chroot of scripts/deps.sh), and on pyenv's 3.13 the
//! table read from a running process is the one in the tree.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use perfpy_bpf::debug_offsets;

fn pyenv_313() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/root/.pyenv/versions")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("3.13.")
        });
    if dir.is_none() {
        assert!(
            !perfpy_test_support::ci(),
            "pyenv's CPython 3.13 is required under CI"
        );
        eprintln!("NOTE: pyenv's CPython 3.13 not installed: not checked");
    }
    dir
}

/// Compiles a program printing `offsetof(_Py_DebugOffsets, F)` for every field F of perfpy's
/// layout against these include flags, and compares with the layout's own positions.
fn check_layout(what: &str, v: perfpy_process::Version, flags: &[String]) {
    let layout = debug_offsets::layout(v).unwrap();
    let mut src = String::from(
        "#define Py_BUILD_CORE 1\n#include <Python.h>\n#include <stddef.h>\n#include <stdio.h>\n\
         #include \"internal/pycore_runtime.h\"\nint main(void) {\n",
    );
    for f in layout {
        src += &format!("    printf(\"%zu\\n\", offsetof(_Py_DebugOffsets, {f}));\n");
    }
    src += "    return 0;\n}\n";
    let dir = std::env::temp_dir().join(format!("perfpy-dbgoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{}.c", what.replace(' ', "-")));
    let exe = dir.join(what.replace(' ', "-"));
    std::fs::write(&c, src).unwrap();
    let st = Command::new("cc")
        .args(flags)
        .arg(&c)
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("cc");
    assert!(st.success(), "{what}: compiling against its headers");
    let out = Command::new(&exe).output().unwrap();
    let got: Vec<usize> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let want: Vec<usize> = (0..layout.len()).map(|i| 8 + 8 * i).collect();
    assert_eq!(got, want, "{what}: perfpy's layout of _Py_DebugOffsets");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn layouts_match_each_versions_header() {
    if let Some(p) = pyenv_313() {
        let inc = p.join("include/python3.13");
        check_layout(
            "pyenv 3.13",
            perfpy_process::Version::new(3, 13),
            &[
                format!("-I{}", inc.display()),
                format!("-I{}", inc.join("internal").display()),
            ],
        );
    }
    let inc = perfpy_test_support::sid_root().join("usr/include");
    for minor in [13u8, 14, 15] {
        let dir = inc.join(format!("python3.{minor}"));
        if !dir.join("internal").exists() {
            assert!(
                !perfpy_test_support::ci(),
                "Debian's libpython3.{minor}-dev missing in {}: run scripts/deps.sh",
                perfpy_test_support::sid_root().display()
            );
            eprintln!("NOTE: Debian's 3.{minor} headers not in the sid chroot: not checked");
            continue;
        }
        // -idirafter: the chroot's multiarch pyconfig.h, after (not instead of) our libc headers.
        check_layout(
            &format!("Debian 3.{minor}"),
            perfpy_process::Version::new(3, minor),
            &[
                format!("-I{}", dir.display()),
                format!("-I{}", dir.join("internal").display()),
                "-idirafter".into(),
                inc.display().to_string(),
            ],
        );
    }
}

#[test]
fn table_read_from_a_pyenv_313_process_is_the_one_in_the_tree() {
    let Some(p) = pyenv_313() else { return };
    // The process says where its _PyRuntime is (an exported symbol), then waits.
    let mut child = Command::new(p.join("bin/python3.13"))
        .args([
            "-c",
            "import ctypes, sys\n\
             a = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, '_PyRuntime'))\n\
             print('ready', a, flush=True)\n\
             sys.stdin.read()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let t = debug_offsets::read(
        &perfpy_process::LiveMemory(child.id()),
        addr,
        perfpy_process::Version::new(3, 13),
    );
    // A wrong address (8 bytes off): refused for its cookie, not misread.
    let off = debug_offsets::read(
        &perfpy_process::LiveMemory(child.id()),
        addr + 8,
        perfpy_process::Version::new(3, 13),
    );
    assert_eq!(off, Err(debug_offsets::TableError::Cookie));
    let _ = child.kill();
    let _ = child.wait();
    let t = t.expect("the live table");
    assert_eq!(t.offsets, perfpy_bpf::offsets::V3_13);
    assert!(!t.free_threaded);
    assert_eq!(t.version >> 16, 0x030d);
}
