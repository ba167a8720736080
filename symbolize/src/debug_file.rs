//! Separate debug files: where the debug information of a stripped file may be, as gdb looks
//! (by build id, then by debug link next to the file, in its `.debug/`, and under
//! `/usr/lib/debug`), and whether a candidate is the file's (same build id, or the CRC-32 its
//! debug link gives).
//!
//! The candidates are the target's files: this module never opens a path itself. The caller
//! opens each one inside the root of the process that maps the file, with its safe opener
//! (`perfpy_inject::target_files::open_in_root`: `openat2` with `RESOLVE_IN_ROOT`, regular
//! files only, bounded size), and hands back the file.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use perfpy_process::elf::ElfFacts;

/// Where a separate debug file of `path` may be: `(path, found by build id)`, in the order
/// they are tried.
pub fn candidates(path: &str, elf: &ElfFacts) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if let Some(id) = elf.build_id.as_ref().filter(|b| b.len() >= 2) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        out.push((
            PathBuf::from(format!(
                "/usr/lib/debug/.build-id/{}/{}.debug",
                &hex[..2],
                &hex[2..]
            )),
            true,
        ));
    }
    if let Some((name, _)) = &elf.debuglink {
        let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
        if let Some(dir) = Path::new(path).parent() {
            // A name with a slash would step elsewhere than the three directories.
            if !name.as_encoded_bytes().contains(&b'/') && !name.is_empty() {
                let rel = dir.strip_prefix("/").unwrap_or(dir);
                out.push((dir.join(name), false));
                out.push((dir.join(".debug").join(name), false));
                out.push((Path::new("/usr/lib/debug").join(rel).join(name), false));
            }
        }
    }
    out
}

/// Finds and checks the separate debug file of the file mapped at `path` (see [`candidates`]),
/// inside the process's root directory `root`: accepted only if its build id is the file's,
/// or, for a debug link without build ids, if its CRC-32 is the one the link gives. `open`
/// opens a path inside `root` the safe way (see the module's documentation), `None` if it
/// refuses or there is nothing there.
pub fn find(
    root: BorrowedFd<'_>,
    path: &str,
    elf: &ElfFacts,
    mut open: impl FnMut(&Path) -> Option<File>,
) -> Option<File> {
    // A chroot in our mount namespace: its files' paths in /proc/PID/maps are ours
    // (`/srv/root/usr/lib/…`); inside the root they are the part after the root's own path.
    let root_path = std::fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd())).ok();
    let inner = root_path
        .as_deref()
        .filter(|r| *r != Path::new("/"))
        .and_then(|r| Path::new(path).strip_prefix(r).ok())
        .map(|p| format!("/{}", p.display()));
    let mut candidates = candidates(inner.as_deref().unwrap_or(path), elf);
    if inner.is_some() {
        candidates.extend(
            self::candidates(path, elf)
                .into_iter()
                .filter(|(_, by_id)| !by_id),
        );
    }
    for (cand, by_id) in candidates {
        if cand == Path::new(path) {
            continue;
        }
        let Some(file) = open(&cand) else {
            continue;
        };
        if is_debug_file_of(&file, elf, by_id) {
            tracing::debug!(path, debug = %cand.display(), "separate debug file");
            return Some(file);
        }
    }
    None
}

/// Whether `file` holds debug information (DWARF or a full symbol table) of the file whose
/// facts are `elf`: same build id; without build ids, and for a candidate named by the debug
/// link only, the link's CRC-32 of its bytes.
fn is_debug_file_of(file: &File, elf: &ElfFacts, by_id: bool) -> bool {
    let Ok(dbg) = perfpy_process::elf::read_file(file) else {
        return false;
    };
    let useful = dbg.has_dwarf || dbg.has_symtab;
    let their_id = dbg.build_id.as_deref();
    let matches = match (&elf.build_id, their_id) {
        (Some(a), Some(b)) => a[..] == b[..],
        _ if by_id => false,
        _ => elf.debuglink.as_ref().is_some_and(|(_, crc)| {
            let mut c = flate2::Crc::new();
            c.update(dbg.bytes());
            c.sum() == *crc
        }),
    };
    useful && matches
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn debug_file_candidates() {
        let elf = ElfFacts {
            loads: vec![],
            build_id: Some(vec![0xab, 0xcd, 0xef]),
            sections: Default::default(),
            symbols: HashMap::new(),
            is_interpreter: false,
            python_version: None,
            eval_range: None,
            py_runtime: None,
            has_dwarf: false,
            has_symtab: false,
            debuglink: Some((b"libx.so.debug".to_vec(), 0)),
        };
        let c: Vec<String> = candidates("/usr/lib/libx.so", &elf)
            .into_iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert_eq!(
            c,
            [
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/usr/lib/libx.so.debug",
                "/usr/lib/.debug/libx.so.debug",
                "/usr/lib/debug/usr/lib/libx.so.debug"
            ]
        );
        // A link naming another directory is not followed.
        let evil = ElfFacts {
            debuglink: Some((b"../../etc/shadow".to_vec(), 0)),
            build_id: None,
            ..elf
        };
        assert!(candidates("/usr/lib/libx.so", &evil).is_empty());
    }
}
