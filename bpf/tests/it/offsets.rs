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
    for (major, minor) in [
        (2u8, 7u8),
        (3, 6),
        (3, 7),
        (3, 8),
        (3, 9),
        (3, 10),
        (3, 11),
        (3, 12),
        (3, 13),
    ] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(if (major, minor) >= (3, 11) {
            "tests/offsets.c"
        } else {
            "tests/offsets_old.c"
        });
        let dir = std::fs::read_dir(base).ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{major}.{minor}."))
            })
        });
        let Some(dir) = dir else {
            assert!(
                !ci,
                "CPython {major}.{minor} with headers is required under CI"
            );
            eprintln!("NOTE: CPython {major}.{minor} not installed: not checked");
            continue;
        };
        let mut inc = dir.join(format!("include/python{major}.{minor}"));
        if !inc.exists() {
            inc = dir.join(format!("include/python{major}.{minor}m"));
        }
        let exe = std::env::temp_dir().join(format!(
            "perfpy-offsets-{major}{minor}-{}",
            std::process::id()
        ));
        let st = Command::new("cc")
            .arg(format!("-I{}", inc.display()))
            .arg(format!("-I{}", inc.join("internal").display()))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status()
            .expect("cc");
        assert!(
            st.success(),
            "compiling {} against {major}.{minor}",
            src.display()
        );
        let out = Command::new(&exe).output().unwrap();
        let _ = std::fs::remove_file(&exe);
        let got: HashMap<String, i32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect();
        let table = if (major, minor) == (3, 13) {
            perfpy_bpf::offsets::V3_13
        } else {
            Offsets::for_version(perfpy_process::Version::new(major, minor)).unwrap()
        };
        let fields: HashMap<&str, i32> = table.fields().into_iter().collect();
        assert!(
            got.len() >= 16,
            "{major}.{minor}: only {} offsets printed",
            got.len()
        );
        for (name, value) in &got {
            assert_eq!(
                fields.get(name.as_str()),
                Some(value),
                "{major}.{minor}: {name}"
            );
        }
    }
}
