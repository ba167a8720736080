//! The offset tables agree with each installed version's own headers: tests/offsets.c is
//! compiled against them with `offsetof` and its output compared, field by field.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use perfpy_bpf::Offsets;

#[test]
fn offsets_match_every_installed_version() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let base = Path::new("/root/.pyenv/versions");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/offsets.c");
    for minor in [11u8, 12, 13] {
        let dir = std::fs::read_dir(base).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("3.{minor}.")))
        });
        let Some(dir) = dir else {
            assert!(!ci, "CPython 3.{minor} with headers is required under CI");
            eprintln!("NOTE: CPython 3.{minor} not installed: not checked");
            continue;
        };
        let inc = dir.join(format!("include/python3.{minor}"));
        let exe = std::env::temp_dir().join(format!("perfpy-offsets-3{minor}-{}", std::process::id()));
        let st = Command::new("cc")
            .arg(format!("-I{}", inc.display()))
            .arg(format!("-I{}", inc.join("internal").display()))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("cc");
        assert!(st.success(), "compiling offsets.c against 3.{minor}");
        let out = Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_file(&exe);
        let got: HashMap<String, i32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect();
        let table = Offsets::for_version((3, minor)).unwrap();
        for (name, value) in table.fields() {
            assert_eq!(got.get(name), Some(&value), "3.{minor}: {name}");
        }
    }
}
