//! The ELF files mapped by profiled processes: opened once per (device, inode), kept open for the
//! whole recording (so a file deleted or a process gone by the end is still symbolized, through
//! `/proc/self/fd/N`), mapped read-only for the unwinder, described by their load segments.

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, Range};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Object, ObjectSection, ObjectSymbol};

/// A byte range of a mapped file, handed to framehop as section data.
#[derive(Clone)]
pub struct SectionData {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl Deref for SectionData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// What the unwinder needs of one ELF file.
#[derive(Clone, Default)]
pub struct UnwindSections {
    pub text: Option<(Range<u64>, SectionData)>,
    pub eh_frame: Option<(Range<u64>, SectionData)>,
    pub eh_frame_hdr: Option<(Range<u64>, SectionData)>,
    pub debug_frame: Option<SectionData>,
    pub got: Option<Range<u64>>,
}

pub struct ElfInfo {
    /// PT_LOAD segments: (p_offset, p_vaddr, p_filesz).
    pub loads: Vec<(u64, u64, u64)>,
    pub build_id: Option<Vec<u8>>,
    pub sections: UnwindSections,
    /// Holds CPython's evaluation loop: its frames are the interpreter's, not the user's.
    pub is_python_interpreter: bool,
    /// The CPython version this file implements, when it is the interpreter: from the
    /// `Py_Version` constant (3.11+, read from the file itself), else from the file's name
    /// (`libpython3.9.so.1.0`, `python2.7`).
    pub python_version: Option<String>,
    /// Virtual address range of `_PyEval_EvalFrameDefault` (where the eBPF walker's Python
    /// frames go), when this file is the interpreter.
    pub eval_range: Option<Range<u64>>,
}

pub struct MappedFile {
    pub id: u32,
    /// The path as the process names it (for display).
    pub path: String,
    file: File,
    pub elf: Option<ElfInfo>,
}

impl MappedFile {
    /// A path under which this process can open the file again, whatever happened to the
    /// original: our own descriptor.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The virtual address (as in the file) of a file offset, via the load segments.
    pub fn file_offset_to_vaddr(&self, off: u64) -> Option<u64> {
        let elf = self.elf.as_ref()?;
        elf.loads
            .iter()
            .find(|(o, _, sz)| *o <= off && off < o.saturating_add(*sz))
            .map(|(o, v, _)| v + (off - o))
    }

    /// Load bias of a mapping of this file that starts at `start` with file offset `pgoff`.
    pub fn bias(&self, start: u64, pgoff: u64) -> Option<u64> {
        let elf = self.elf.as_ref()?;
        let (o, v, _) = elf
            .loads
            .iter()
            .find(|(o, _, sz)| *o & !0xfff <= pgoff && pgoff < o.saturating_add(*sz))
            .or_else(|| elf.loads.first())?;
        // The mapping starts at the page of p_offset: start corresponds to vaddr v - (o - pgoff).
        Some(start.wrapping_sub(v.wrapping_sub(o.wrapping_sub(pgoff))))
    }
}

/// All files seen in this recording.
#[derive(Default)]
pub struct Files {
    by_key: HashMap<(u64, u64), Arc<MappedFile>>,
    pub list: Vec<Arc<MappedFile>>,
}

impl Files {
    /// Opens the file behind a mapping of process `pid`: `/proc/PID/map_files/START-END` first
    /// (exact even if the file was replaced or lives in another mount namespace), then
    /// `/proc/PID/root/PATH`, then PATH.
    pub fn open_for_mapping(
        &mut self,
        pid: u32,
        start: u64,
        end: u64,
        path: &str,
    ) -> Option<Arc<MappedFile>> {
        let candidates = [
            PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}")),
            Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/')),
            PathBuf::from(path),
        ];
        for c in candidates {
            let Ok(file) = File::open(&c) else { continue };
            let Ok(meta) = file.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let key = (meta.dev(), meta.ino());
            if let Some(f) = self.by_key.get(&key) {
                return Some(f.clone());
            }
            let elf = load_elf(&file);
            let f = Arc::new(MappedFile {
                id: self.list.len() as u32,
                path: path.to_string(),
                file,
                elf,
            });
            self.by_key.insert(key, f.clone());
            self.list.push(f.clone());
            return Some(f);
        }
        tracing::debug!(pid, path, "cannot open mapped file");
        None
    }
}

fn load_elf(file: &File) -> Option<ElfInfo> {
    // SAFETY: a read-only private mapping of a regular file. If another process truncates the
    // file while we read it we may get SIGBUS; mapped executables and libraries are not modified
    // in place in practice (updates replace them), the same assumption perf and py-spy make.
    let map = Arc::new(unsafe { Mmap::map(file) }.ok()?);
    let elf = ElfFile64::<object::Endianness>::parse(&map[..]).ok()?;
    let endian = elf.endian();
    let loads = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
        .map(|ph| (ph.p_offset(endian), ph.p_vaddr(endian), ph.p_filesz(endian)))
        .collect::<Vec<_>>();
    let _ = elf.elf_header().e_type(endian);
    let build_id = elf.build_id().ok().flatten().map(|b| b.to_vec());
    let section = |name: &str| -> Option<(Range<u64>, SectionData)> {
        let s = elf.section_by_name(name)?;
        let (off, size) = s.file_range()?;
        let range = off as usize..(off + size) as usize;
        if range.end > map.len() {
            return None;
        }
        Some((
            s.address()..s.address() + s.size(),
            SectionData {
                map: map.clone(),
                range,
            },
        ))
    };
    let sections = UnwindSections {
        text: section(".text"),
        eh_frame: section(".eh_frame"),
        eh_frame_hdr: section(".eh_frame_hdr"),
        debug_frame: section(".debug_frame").map(|(_, d)| d),
        got: elf
            .section_by_name(".got")
            .map(|s| s.address()..s.address() + s.size()),
    };
    let is_python_interpreter = elf.dynamic_symbols().any(|s| {
        matches!(
            s.name_bytes(),
            Ok(b"_PyEval_EvalFrameDefault") | Ok(b"PyEval_EvalFrameEx")
        )
    });
    let python_version = if is_python_interpreter {
        py_version_constant(&elf, &map, &loads)
    } else {
        None
    };
    let eval_range = if is_python_interpreter {
        elf.symbols()
            .chain(elf.dynamic_symbols())
            .find(|s| matches!(s.name_bytes(), Ok(b"_PyEval_EvalFrameDefault") | Ok(b"PyEval_EvalFrameEx")) && s.size() > 0)
            .map(|s| s.address()..s.address() + s.size())
    } else {
        None
    };
    Some(ElfInfo {
        loads,
        build_id,
        sections,
        is_python_interpreter,
        python_version,
        eval_range,
    })
}

/// Reads `Py_Version` (a `const unsigned long` in read-only data, 3.11+) from the file.
fn py_version_constant(
    elf: &ElfFile64<'_, object::Endianness>,
    map: &[u8],
    loads: &[(u64, u64, u64)],
) -> Option<String> {
    let sym = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.name_bytes() == Ok(b"Py_Version"))?;
    let vaddr = sym.address();
    let (o, v, _) = loads.iter().find(|(_, v, sz)| *v <= vaddr && vaddr < v + sz)?;
    let off = (o + (vaddr - v)) as usize;
    let hex = u32::from_le_bytes(map.get(off..off + 4)?.try_into().ok()?);
    let (major, minor, micro) = (hex >> 24, (hex >> 16) & 0xff, (hex >> 8) & 0xff);
    (major == 2 || major == 3).then(|| format!("{major}.{minor}.{micro}"))
}

/// `X.Y` from a file name such as `libpython3.9.so.1.0`, `libpython2.7.so`, `python3.11`.
pub fn python_version_from_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let rest = name.strip_prefix("libpython").or_else(|| name.strip_prefix("python"))?;
    let mut it = rest.splitn(3, '.');
    let major: u32 = it.next()?.parse().ok()?;
    let minor: String = it.next()?.chars().take_while(|c| c.is_ascii_digit()).collect();
    let minor: u32 = minor.parse().ok()?;
    (major == 2 || major == 3).then(|| format!("{major}.{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        assert_eq!(python_version_from_name("/x/libpython3.9.so.1.0").as_deref(), Some("3.9"));
        assert_eq!(python_version_from_name("libpython2.7.so").as_deref(), Some("2.7"));
        assert_eq!(python_version_from_name("/usr/bin/python3.11").as_deref(), Some("3.11"));
        assert_eq!(python_version_from_name("/usr/bin/python3.13t").as_deref(), Some("3.13"));
        assert_eq!(python_version_from_name("/usr/bin/perl"), None);
    }

    #[test]
    fn py_version_constant_of_installed_interpreters() {
        // 3.11+ exports Py_Version: the version read from the file matches the directory name.
        let Ok(dir) = std::fs::read_dir("/root/.pyenv/versions") else { return };
        for d in dir.flatten() {
            let v = d.file_name().to_string_lossy().into_owned();
            let minor: u32 = v.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0);
            if !v.starts_with("3.") || minor < 11 {
                continue;
            }
            let lib = d.path().join(format!("lib/libpython3.{minor}.so.1.0"));
            let f = File::open(&lib).unwrap();
            let info = load_elf(&f).unwrap();
            assert!(info.is_python_interpreter);
            assert_eq!(info.python_version.as_deref(), Some(v.as_str()), "{}", lib.display());
        }
    }
}
