//! The ELF files mapped by profiled processes: opened once per (device, inode), kept open for the
//! whole recording (so a file deleted or a process gone by the end is still symbolized, through
//! `/proc/self/fd/N`), mapped read-only for the unwinder, described by their load segments.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::{Deref, Range};
use std::os::fd::{AsRawFd, BorrowedFd};
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
    /// Virtual address of `_PyRuntime` (3.7+) or, failing that, `interp_head` (2.7, 3.6):
    /// where the eBPF walker starts, when this file is the interpreter.
    pub py_runtime: Option<u64>,
    /// Has DWARF (`.debug_info`) of its own: no separate debug file is looked for.
    pub has_dwarf: bool,
    /// `.gnu_debuglink`: the name of its separate debug file and that file's CRC-32.
    pub debuglink: Option<(Vec<u8>, u32)>,
}

pub struct MappedFile {
    pub id: u32,
    /// The path as the process names it (for display).
    pub path: String,
    file: File,
    pub elf: Option<ElfInfo>,
    /// Its separate debug file (same build id, or debug link and CRC), found in the root of
    /// the process that mapped it: symbols and lines of a stripped file.
    pub debug: Option<File>,
}

impl MappedFile {
    /// A path under which this process can open the file again, whatever happened to the
    /// original: our own descriptor.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The same for its separate debug file, if it has one.
    pub fn debug_fd_path(&self) -> Option<PathBuf> {
        let f = self.debug.as_ref()?;
        Some(PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())))
    }

    /// The virtual address (as in the file) of a file offset, via the load segments.
    pub fn file_offset_to_vaddr(&self, off: u64) -> Option<u64> {
        let elf = self.elf.as_ref()?;
        elf.loads
            .iter()
            .find(|(o, _, sz)| *o <= off && off < o.saturating_add(*sz))
            .and_then(|(o, v, _)| v.checked_add(off - o))
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
    /// vDSO images by size (one, in practice: see [`Files::vdso`]).
    vdso: HashMap<u64, Option<Arc<MappedFile>>>,
    /// A replay (`record::replay`): the files, by the path the process mapped, are these
    /// copies from the fixture instead.
    pub replay_files: Option<HashMap<String, PathBuf>>,
}

impl Files {
    /// Opens the file behind a mapping of process `pid` (see
    /// `perfpy_inject::target_files::open_mapped`: the exact file through map_files, else its
    /// path inside the process's root, never a link out of it nor anything but a regular file).
    /// A file without DWARF gets its separate debug file, looked for in the process's root
    /// directory (`root`), opened the same way.
    pub fn open_for_mapping(
        &mut self,
        pid: u32,
        root: Option<BorrowedFd<'_>>,
        uids: &[u32],
        range: (u64, u64),
        path: &str,
    ) -> Option<Arc<MappedFile>> {
        let file = match &self.replay_files {
            Some(copies) => File::open(copies.get(path)?).ok()?,
            None => {
                perfpy_inject::target_files::open_mapped(
                    pid,
                    root,
                    range,
                    path,
                    uids,
                    &crate::signals::ABORT_READS,
                )
                .ok()?
                .1
            }
        };
        let meta = file.metadata().ok()?;
        let key = (meta.dev(), meta.ino());
        if let Some(f) = self.by_key.get(&key) {
            return Some(f.clone());
        }
        let elf = load_elf(&file);
        let debug = match (&elf, root) {
            (Some(e), Some(root)) if !e.has_dwarf => find_debug_file(root, uids, path, e),
            _ => None,
        };
        let f = Arc::new(MappedFile {
            id: self.list.len() as u32,
            path: path.to_string(),
            file,
            elf,
            debug,
        });
        self.by_key.insert(key, f.clone());
        self.list.push(f.clone());
        Some(f)
    }

    /// The image of the vDSO mapped at `start..end` in `pid`, as a file (a memfd) that the
    /// unwinder and blazesym read as any other ELF file.
    ///
    /// Every 64-bit process on this kernel maps the same vDSO image, ours included, so our own
    /// copy (at `getauxval(AT_SYSINFO_EHDR)`) serves for all of them: no access to the target's
    /// memory, nothing per process, and it works for a process that already exited. A vDSO of
    /// another size (a 32-bit process) is read from the process's memory instead.
    pub fn vdso(&mut self, pid: u32, start: u64, end: u64) -> Option<Arc<MappedFile>> {
        let size = end.checked_sub(start)?;
        if let Some(f) = self.vdso.get(&size) {
            return f.clone();
        }
        let image = own_vdso()
            .filter(|v| v.len() as u64 == size)
            .map(<[u8]>::to_vec)
            .or_else(|| {
                let mut buf = vec![0u8; usize::try_from(size).ok().filter(|s| *s <= 1 << 20)?];
                let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
                std::os::unix::fs::FileExt::read_exact_at(&mem, &mut buf, start).ok()?;
                Some(buf)
            });
        let f = image.and_then(|image| {
            let file = memfd_with(&image)
                .map_err(|e| tracing::debug!("vDSO image: {e}"))
                .ok()?;
            let elf = load_elf(&file);
            let f = Arc::new(MappedFile {
                id: self.list.len() as u32,
                path: "[vdso]".to_string(),
                file,
                elf,
                debug: None,
            });
            self.list.push(f.clone());
            Some(f)
        });
        self.vdso.insert(size, f.clone());
        f
    }
}

/// Our own vDSO image: from the address the kernel passed us in the auxiliary vector to the
/// end of its mapping in `/proc/self/maps`.
fn own_vdso() -> Option<&'static [u8]> {
    // SAFETY: getauxval only reads the auxiliary vector.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if base == 0 {
        return None;
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let end = maps.lines().find_map(|l| {
        let range = l.split_whitespace().next()?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        (a == base).then_some(b)
    })?;
    let len = usize::try_from(end.checked_sub(base)?).ok()?;
    // SAFETY: the vDSO is mapped readable for the life of the process at `base..end` (read from
    // our own maps just now) and never changes.
    Some(unsafe { std::slice::from_raw_parts(base as usize as *const u8, len) })
}

/// A sealed-size anonymous file holding `bytes`.
fn memfd_with(bytes: &[u8]) -> io::Result<File> {
    let fd = nix::sys::memfd::memfd_create(
        c"perfpy-vdso",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let mut f = File::from(fd);
    io::Write::write_all(&mut f, bytes)?;
    Ok(f)
}

/// Largest separate debug file perfpy reads (they are mapped, not read whole).
const MAX_DEBUG_FILE: u64 = 2 << 30;

/// Where a separate debug file of `path` may be, as gdb looks: by build id, then by debug
/// link next to the file, in its `.debug/`, and under `/usr/lib/debug`.
fn debug_candidates(path: &str, elf: &ElfInfo) -> Vec<(PathBuf, bool)> {
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

/// Finds and checks the separate debug file of the file mapped at `path` (see
/// [`debug_candidates`]), inside `root`: accepted only if its build id is the file's, or, for
/// a debug link without build ids, if its CRC-32 is the one the link gives.
fn find_debug_file(root: BorrowedFd<'_>, uids: &[u32], path: &str, elf: &ElfInfo) -> Option<File> {
    use perfpy_inject::target_files::{open_in_root, Rules};
    // A file the target controls: opened as every such file (see `target_files`).
    let rules = Rules {
        max_bytes: MAX_DEBUG_FILE,
        ..Rules::mapped_file(uids)
    };
    // A chroot in our mount namespace: its files' paths in /proc/PID/maps are ours
    // (`/srv/root/usr/lib/…`); inside the root they are the part after the root's own path.
    let root_path = std::fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd())).ok();
    let inner = root_path
        .as_deref()
        .filter(|r| *r != Path::new("/"))
        .and_then(|r| Path::new(path).strip_prefix(r).ok())
        .map(|p| format!("/{}", p.display()));
    let mut candidates = debug_candidates(inner.as_deref().unwrap_or(path), elf);
    if inner.is_some() {
        candidates.extend(
            debug_candidates(path, elf)
                .into_iter()
                .filter(|(_, by_id)| !by_id),
        );
    }
    for (cand, by_id) in candidates {
        if cand == Path::new(path) {
            continue;
        }
        let Ok(file) = open_in_root(root, &cand, &rules, &crate::signals::ABORT_READS) else {
            continue;
        };
        // SAFETY: a read-only private mapping of a regular file (see `load_elf`).
        let Ok(map) = (unsafe { Mmap::map(&file) }) else {
            continue;
        };
        let Ok(dbg) = ElfFile64::<object::Endianness>::parse(&map[..]) else {
            continue;
        };
        let useful = dbg.section_by_name(".debug_info").is_some()
            || dbg.section_by_name(".symtab").is_some();
        let their_id = dbg.build_id().ok().flatten();
        let matches = match (&elf.build_id, their_id) {
            (Some(a), Some(b)) => a[..] == *b,
            _ if by_id => false,
            _ => elf.debuglink.as_ref().is_some_and(|(_, crc)| {
                let mut c = flate2::Crc::new();
                c.update(&map);
                c.sum() == *crc
            }),
        };
        if useful && matches {
            tracing::debug!(path, debug = %cand.display(), "separate debug file");
            return Some(file);
        }
    }
    None
}

fn load_elf(file: &File) -> Option<ElfInfo> {
    // SAFETY: a read-only private mapping of a regular file. If another process truncates the
    // file while we read it we may get SIGBUS; mapped executables and libraries are not modified
    // in place in practice (updates replace them), the same assumption perf and py-spy make.
    let map = Arc::new(unsafe { Mmap::map(file) }.ok()?);
    elf_info(map)
}

/// What we need of an ELF image. Any bytes are accepted: a file that is not a 64-bit ELF is
/// `None`; offsets, addresses and sizes that do not add up (truncated or corrupt headers) leave
/// out the part they describe instead of overflowing.
fn elf_info(map: Arc<Mmap>) -> Option<ElfInfo> {
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
        let range = usize::try_from(off).ok()?..usize::try_from(off.checked_add(size)?).ok()?;
        if range.end > map.len() {
            return None;
        }
        Some((
            s.address()..s.address().checked_add(s.size())?,
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
            .and_then(|s| Some(s.address()..s.address().checked_add(s.size())?)),
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
            .filter(|s| {
                matches!(
                    s.name_bytes(),
                    Ok(b"_PyEval_EvalFrameDefault") | Ok(b"PyEval_EvalFrameEx")
                ) && s.size() > 0
            })
            .find_map(|s| Some(s.address()..s.address().checked_add(s.size())?))
    } else {
        None
    };
    let py_runtime = if is_python_interpreter {
        let find = |name: &[u8]| {
            elf.dynamic_symbols()
                .chain(elf.symbols())
                .find(|s| s.name_bytes() == Ok(name) && s.address() != 0)
                .map(|s| s.address())
        };
        find(b"_PyRuntime")
            .or_else(|| find(b"interp_head"))
            // 3.13+: `_PyRuntime` also has a section of its own, found without any symbol.
            .or_else(|| {
                elf.section_by_name(".PyRuntime")
                    .map(|s| s.address())
                    .filter(|&a| a != 0)
            })
    } else {
        None
    };
    let has_dwarf = elf.section_by_name(".debug_info").is_some();
    let debuglink = elf
        .gnu_debuglink()
        .ok()
        .flatten()
        .map(|(name, crc)| (name.to_vec(), crc));
    Some(ElfInfo {
        loads,
        build_id,
        sections,
        is_python_interpreter,
        python_version,
        eval_range,
        py_runtime,
        has_dwarf,
        debuglink,
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
    // The PT_LOAD segment holding it gives its file offset; a corrupt segment whose end or
    // offset overflows holds nothing.
    let off = loads.iter().find_map(|&(o, v, sz)| {
        let inside = v <= vaddr && vaddr < v.checked_add(sz)?;
        inside.then(|| o.checked_add(vaddr - v)).flatten()
    })?;
    let off = usize::try_from(off).ok()?;
    let hex = u32::from_le_bytes(map.get(off..off.checked_add(4)?)?.try_into().ok()?);
    let (major, minor, micro) = (hex >> 24, (hex >> 16) & 0xff, (hex >> 8) & 0xff);
    (major == 2 || major == 3).then(|| format!("{major}.{minor}.{micro}"))
}

/// `X.Y` from a file name such as `libpython3.9.so.1.0`, `libpython2.7.so`, `python3.11`.
pub fn python_version_from_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let mut it = rest.splitn(3, '.');
    let major: u32 = it.next()?.parse().ok()?;
    let minor: String = it
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let minor: u32 = minor.parse().ok()?;
    (major == 2 || major == 3).then(|| format!("{major}.{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::elf::SectionHeader;
    use object::Endianness;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::sync::OnceLock;

    #[test]
    fn vdso_image_is_an_elf_file_with_unwind_tables() {
        // Ours stands for every 64-bit process's: same size, an ELF file with the clock
        // functions and .eh_frame (so the unwinder leaves the vDSO by its tables).
        let me = std::process::id();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let (start, end) = maps
            .lines()
            .find(|l| l.ends_with("[vdso]"))
            .and_then(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            })
            .unwrap();
        let mut files = Files::default();
        let f = files.vdso(me, start, end).unwrap();
        assert_eq!(f.path, "[vdso]");
        let elf = f.elf.as_ref().unwrap();
        assert!(elf.sections.eh_frame.is_some() && elf.sections.text.is_some());
        assert!(Arc::ptr_eq(
            &f,
            &files.vdso(me + 1, start + 0x1000, end + 0x1000).unwrap()
        ));
        let s = perfpy_symbolize::Symbolizer::new();
        let data = std::fs::read(f.fd_path()).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let sym = obj
            .dynamic_symbols()
            .find(|s| s.name() == Ok("__vdso_clock_gettime"))
            .unwrap();
        let off = f.elf.as_ref().unwrap().loads[0];
        let frames = s
            .symbolize_elf(&f.fd_path(), &[sym.address() - off.1 + off.0 + 1], false)
            .unwrap();
        assert!(
            frames[0][0].function.contains("clock_gettime"),
            "{frames:?}"
        );
    }

    #[test]
    fn debug_file_candidates() {
        let elf = ElfInfo {
            loads: vec![],
            build_id: Some(vec![0xab, 0xcd, 0xef]),
            sections: UnwindSections::default(),
            is_python_interpreter: false,
            python_version: None,
            eval_range: None,
            py_runtime: None,
            has_dwarf: false,
            debuglink: Some((b"libx.so.debug".to_vec(), 0)),
        };
        let c: Vec<String> = debug_candidates("/usr/lib/libx.so", &elf)
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
        let evil = ElfInfo {
            debuglink: Some((b"../../etc/shadow".to_vec(), 0)),
            build_id: None,
            ..elf
        };
        assert!(debug_candidates("/usr/lib/libx.so", &evil).is_empty());
    }

    #[test]
    fn versions_from_names() {
        assert_eq!(
            python_version_from_name("/x/libpython3.9.so.1.0").as_deref(),
            Some("3.9")
        );
        assert_eq!(
            python_version_from_name("libpython2.7.so").as_deref(),
            Some("2.7")
        );
        assert_eq!(
            python_version_from_name("/usr/bin/python3.11").as_deref(),
            Some("3.11")
        );
        assert_eq!(
            python_version_from_name("/usr/bin/python3.13t").as_deref(),
            Some("3.13")
        );
        assert_eq!(python_version_from_name("/usr/bin/perl"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any path a process maps (a name from `/proc/PID/maps`, odd bytes included): a
        /// version only for a python-named file, and then `2.Y` or `3.Y`.
        #[test]
        fn version_from_any_name(path in "\\PC{0,80}|/[a-z/]{0,20}(lib)?python[0-9.]{0,30}[a-z0-9.]{0,10}") {
            if let Some(v) = python_version_from_name(&path) {
                let name = path.rsplit('/').next().unwrap();
                prop_assert!(name.starts_with("python") || name.starts_with("libpython"), "{}", path);
                let (major, minor) = v.split_once('.').unwrap();
                prop_assert!(major == "2" || major == "3", "{}", v);
                prop_assert!(minor.parse::<u32>().is_ok(), "{}", v);
            }
        }

        /// Well-formed names with any minor version and any suffix give exactly that version.
        #[test]
        fn version_from_well_formed_names(
            dir in "(/[a-zA-Z0-9_ .-]{1,12}){0,4}",
            lib in any::<bool>(),
            major in 2u32..=3,
            minor in 0u32..1000,
            suffix in "(m|t|d)?(\\.so(\\.1\\.0)?)?",
        ) {
            let path = format!("{dir}/{}python{major}.{minor}{suffix}", if lib { "lib" } else { "" });
            let expected = format!("{major}.{minor}");
            prop_assert_eq!(python_version_from_name(&path), Some(expected));
        }
    }

    #[test]
    fn py_version_constant_of_installed_interpreters() {
        // 3.11+ exports Py_Version: the version read from the file matches the directory name.
        let Ok(dir) = std::fs::read_dir("/root/.pyenv/versions") else {
            return;
        };
        for d in dir.flatten() {
            let v = d.file_name().to_string_lossy().into_owned();
            let minor: u32 = v
                .split('.')
                .nth(1)
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if !v.starts_with("3.") || minor < 11 {
                continue;
            }
            let lib = d.path().join(format!("lib/libpython3.{minor}.so.1.0"));
            let f = File::open(&lib).unwrap();
            let info = load_elf(&f).unwrap();
            assert!(info.is_python_interpreter);
            assert_eq!(
                info.python_version.as_deref(),
                Some(v.as_str()),
                "{}",
                lib.display()
            );
        }
    }

    /// An interpreter with no `_PyRuntime` symbol at all: the `.PyRuntime` section gives it.
    #[test]
    fn py_runtime_from_the_pyruntime_section() {
        let dir = std::env::temp_dir().join(format!("perfpy-pyruntime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = dir.join("rt.c");
        std::fs::write(
            &c,
            "__attribute__((section(\".PyRuntime\"), used)) char runtime_state[64] = \"xdebugpy\";\n\
             void _PyEval_EvalFrameDefault(void) {}\nint main(void) { return 0; }\n",
        )
        .unwrap();
        let exe = dir.join("rt");
        let st = std::process::Command::new("cc")
            .args(["-O0", "-rdynamic", "-o"])
            .arg(&exe)
            .arg(&c)
            .status()
            .expect("cc");
        assert!(st.success());
        let data = std::fs::read(&exe).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let elf = ElfFile64::<Endianness>::parse(&data[..]).unwrap();
        let section = elf.section_by_name(".PyRuntime").unwrap().address();
        assert!(!elf
            .dynamic_symbols()
            .chain(elf.symbols())
            .any(|s| s.name() == Ok("_PyRuntime")));
        let info = elf_info(mapped(&data)).unwrap();
        assert!(info.is_python_interpreter);
        assert_eq!(info.py_runtime, Some(section));
    }

    /// Debian's own 3.13 – 3.15 (stripped, non-PIE, libpython inside), when the sid chroot of
    /// scripts/deps.sh is there: an interpreter, its version, `_PyRuntime` (in `.dynsym`, at the
    /// start of `.PyRuntime`).
    #[test]
    fn debian_stripped_non_pie_interpreters() {
        let sid = std::path::Path::new("/var/cache/perfpy/sid/usr/bin");
        for minor in [13, 14, 15] {
            let Ok(data) = std::fs::read(sid.join(format!("python3.{minor}"))) else {
                assert!(
                    !ci(),
                    "Debian's python3.{minor} missing: run scripts/deps.sh"
                );
                continue;
            };
            let elf = ElfFile64::<Endianness>::parse(&data[..]).unwrap();
            assert_eq!(
                elf.elf_header().e_type(Endianness::Little),
                object::elf::ET_EXEC
            );
            let section = elf.section_by_name(".PyRuntime").unwrap().address();
            let info = elf_info(mapped(&data)).unwrap();
            assert!(info.is_python_interpreter);
            assert!(info
                .python_version
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("3.{minor}."))));
            assert_eq!(info.py_runtime, Some(section), "3.{minor}");
        }
    }

    // Hostile files: every file a profiled process maps is read here, so a truncated,
    // corrupted or fake one must give `None` or facts that hold for its bytes, never a panic
    // (an overflow in a debug build) or a section slice outside the mapping.

    const LIBPYTHON: &str = "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0";

    fn ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
    }

    /// The 3.12 interpreter, read once; `None` (with a note) when it is not installed, outside
    /// CI where a missing fixture is a failure.
    fn libpython() -> Option<&'static [u8]> {
        static CELL: OnceLock<Option<Vec<u8>>> = OnceLock::new();
        CELL.get_or_init(|| match std::fs::read(LIBPYTHON) {
            Ok(d) => Some(d),
            Err(e) if ci() => panic!("{LIBPYTHON}: {e}"),
            Err(e) => {
                say!("NOTE: {LIBPYTHON}: {e}; skipped");
                None
            }
        })
        .as_deref()
    }

    fn bin_true() -> &'static [u8] {
        static CELL: OnceLock<Vec<u8>> = OnceLock::new();
        CELL.get_or_init(|| std::fs::read("/bin/true").expect("/bin/true"))
    }

    /// `bytes` as a read-only mapping, as `load_elf` gets them from a file (without writing
    /// 30 MB to disk per case).
    fn mapped(bytes: &[u8]) -> Arc<Mmap> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).unwrap();
        m[..bytes.len()].copy_from_slice(bytes);
        Arc::new(m.make_read_only().unwrap())
    }

    /// What a caller may rely on whatever the input: section data inside the mapping (reading
    /// it would panic otherwise), ranges that do not run backwards, a version `X.Y.Z`.
    fn assert_plausible(info: &ElfInfo) {
        let s = &info.sections;
        for (r, d) in [&s.text, &s.eh_frame, &s.eh_frame_hdr]
            .into_iter()
            .flatten()
        {
            assert!(r.start <= r.end);
            let _ = d.len();
        }
        if let Some(d) = &s.debug_frame {
            let _ = d.len();
        }
        for r in [&s.got, &info.eval_range].into_iter().flatten() {
            assert!(r.start <= r.end);
        }
        if let Some(v) = &info.python_version {
            let parts: Vec<&str> = v.split('.').collect();
            assert!(
                parts.len() == 3 && (parts[0] == "2" || parts[0] == "3"),
                "{v}"
            );
            assert!(parts.iter().all(|p| p.parse::<u8>().is_ok()), "{v}");
        }
    }

    /// Byte ranges that steer parsing: headers, the section header table, symbol tables and
    /// their strings, notes. Flipping bits in code or data changes nothing parsed.
    fn structural_ranges(data: &[u8]) -> Vec<Range<usize>> {
        let elf = ElfFile64::<Endianness>::parse(data).unwrap();
        let (h, e) = (elf.elf_header(), elf.endian());
        let (phoff, shoff) = (h.e_phoff(e) as usize, h.e_shoff(e) as usize);
        let mut out = vec![
            0..64,
            phoff..phoff + 56 * h.e_phnum(e) as usize,
            shoff..shoff + 64 * h.e_shnum(e) as usize,
        ];
        for name in [
            ".dynsym",
            ".dynstr",
            ".symtab",
            ".strtab",
            ".note.gnu.build-id",
            ".shstrtab",
        ] {
            if let Some((o, s)) = elf.section_by_name(name).and_then(|s| s.file_range()) {
                out.push(o as usize..(o + s) as usize);
            }
        }
        out
    }

    /// File offsets of the u64 fields whose sums `elf_info` computes: PT_LOAD offset, address
    /// and size; address, offset and size of the sections handed to the unwinder; value and
    /// size of `Py_Version` and `_PyEval_EvalFrameDefault` in both symbol tables.
    fn summed_fields(data: &[u8]) -> Vec<usize> {
        let elf = ElfFile64::<Endianness>::parse(data).unwrap();
        let (h, e) = (elf.elf_header(), elf.endian());
        let mut out = Vec::new();
        for (i, ph) in elf.elf_program_headers().iter().enumerate() {
            if ph.p_type(e) == object::elf::PT_LOAD {
                let at = h.e_phoff(e) as usize + 56 * i;
                out.extend([at + 8, at + 16, at + 32]);
            }
        }
        let sections = h.sections(e, data).unwrap();
        for (i, sh) in sections.iter().enumerate() {
            let name = sections.section_name(e, sh).unwrap_or_default();
            if [&b".text"[..], b".eh_frame", b".eh_frame_hdr", b".got"].contains(&name) {
                let at = h.e_shoff(e) as usize + 64 * i;
                out.extend([at + 16, at + 24, at + 32]);
            }
            if matches!(
                sh.sh_type(e),
                object::elf::SHT_SYMTAB | object::elf::SHT_DYNSYM
            ) {
                let table = sections.symbols(e, data, sh.sh_type(e)).unwrap();
                for (j, sym) in table.iter().enumerate() {
                    let n = table.symbol_name(e, sym).unwrap_or_default();
                    if n == b"Py_Version" || n == b"_PyEval_EvalFrameDefault" {
                        // Elf64_Sym: st_value at 8, st_size at 16.
                        let at = sh.sh_offset(e) as usize + 24 * j;
                        out.extend([at + 8, at + 16]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn real_files_give_full_facts() {
        // The baseline of the property tests below: without it "never panics" could pass on
        // a parser that rejects everything.
        let t = elf_info(mapped(bin_true())).unwrap();
        assert!(!t.is_python_interpreter && t.python_version.is_none() && t.eval_range.is_none());
        assert_eq!(t.build_id.as_ref().map(|b| b.len()), Some(20));
        assert!(t.sections.text.is_some() && t.sections.eh_frame.is_some());
        let Some(lib) = libpython() else { return };
        let p = elf_info(mapped(lib)).unwrap();
        assert!(p.is_python_interpreter);
        assert_eq!(p.python_version.as_deref(), Some("3.12.1"));
        assert!(p.eval_range.as_ref().is_some_and(|r| r.start < r.end));
        assert!(summed_fields(lib).len() >= 3 * 4 + 3 * 4 + 2 * 4);
        assert_plausible(&p);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A file cut short, through a real file as `open_for_mapping` reads it (an empty file
        /// included): the section headers sit at the end, so a prefix that loses them is not
        /// an ELF file we use.
        #[test]
        fn prefixes_of_bin_true(len in prop_oneof![0usize..512, 0usize..40_000]) {
            let data = bin_true();
            let len = len.min(data.len());
            let mut f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut f, &data[..len]).unwrap();
            let info = load_elf(&f);
            prop_assert_eq!(info.is_some(), len == data.len(), "{}-byte prefix", len);
        }

        #[test]
        fn prefixes_of_libpython(len in prop_oneof![0usize..70_000, any::<usize>()]) {
            let Some(lib) = libpython() else { return Ok(()) };
            let len = len % lib.len();
            prop_assert!(elf_info(mapped(&lib[..len])).is_none(), "{}-byte prefix", len);
        }

        /// Random bytes, alone or behind a real ELF header (so parsing follows offsets into
        /// the garbage).
        #[test]
        fn random_bytes(mut bytes in proptest::collection::vec(any::<u8>(), 0..8192), real_header in any::<bool>()) {
            if real_header {
                let n = bytes.len().min(64);
                bytes[..n].copy_from_slice(&bin_true()[..n]);
            }
            if let Some(info) = elf_info(mapped(&bytes)) {
                assert_plausible(&info);
            }
        }
    }

    proptest! {
        // Each case copies and parses the 30 MB libpython: few cases, each worth it.
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn bit_flipped_libpython(flips in proptest::collection::vec((any::<Index>(), any::<Index>(), 0u8..8), 1..16)) {
            let Some(lib) = libpython() else { return Ok(()) };
            let ranges = structural_ranges(lib);
            let mut data = lib.to_vec();
            for (r, at, bit) in flips {
                let r = &ranges[r.index(ranges.len())];
                data[r.start + at.index(r.len())] ^= 1 << bit;
            }
            if let Some(info) = elf_info(mapped(&data)) {
                assert_plausible(&info);
            }
        }

        /// Segment, section and symbol numbers set to anything, extremes included: the sums
        /// `elf_info` makes of them overflow (a panic in a debug build before they were
        /// checked); the file is still recognised as the interpreter, since its symbol names
        /// are intact.
        #[test]
        fn summed_fields_anywhere(writes in proptest::collection::vec((any::<Index>(), prop_oneof![
            any::<u64>(),
            (0u64..0x1000).prop_map(|d| u64::MAX - d),
            0u64..0x2000_0000,
        ]), 1..4)) {
            let Some(lib) = libpython() else { return Ok(()) };
            let fields = summed_fields(lib);
            let mut data = lib.to_vec();
            for (i, v) in writes {
                let at = fields[i.index(fields.len())];
                data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            let info = elf_info(mapped(&data));
            prop_assert!(info.as_ref().is_some_and(|i| i.is_python_interpreter));
            assert_plausible(&info.unwrap());
        }
    }
}
