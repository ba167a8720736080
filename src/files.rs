//! The ELF files mapped by profiled processes: opened once per (device, inode), kept open for the
//! whole recording (so a file deleted or a process gone by the end is still symbolized, through
//! `/proc/self/fd/N`), mapped read-only for the unwinder, described by their load segments.

use crate::ids::FileId;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::{Deref, Range};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use perfpy_process::elf::{ElfFacts, ElfFile, Section};
use perfpy_process::{LiveMemory, ReadMemory};

/// A byte range of a mapped file, handed to framehop as section data.
#[derive(Clone)]
pub struct SectionData {
    elf: Arc<ElfFile>,
    range: Range<usize>,
}

impl Deref for SectionData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.elf.bytes()[self.range.clone()]
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

/// An ELF file's facts (read once per file by `perfpy_process::elf`, shared with discovery
/// and `info`) and its sections as the unwinder takes them.
pub struct ElfInfo {
    elf: Arc<ElfFile>,
    pub sections: UnwindSections,
}

impl Deref for ElfInfo {
    type Target = ElfFacts;
    fn deref(&self) -> &ElfFacts {
        &self.elf.facts
    }
}

impl ElfInfo {
    fn new(elf: Arc<ElfFile>) -> Self {
        let data = |s: &Section| SectionData {
            elf: elf.clone(),
            range: s.file.clone(),
        };
        let with_addr = |s: &Option<Section>| s.as_ref().map(|s| (s.addr.clone(), data(s)));
        let s = &elf.sections;
        let sections = UnwindSections {
            text: with_addr(&s.text),
            eh_frame: with_addr(&s.eh_frame),
            eh_frame_hdr: with_addr(&s.eh_frame_hdr),
            debug_frame: s.debug_frame.as_ref().map(data),
            got: s.got.clone(),
        };
        ElfInfo { elf, sections }
    }
}

pub struct MappedFile {
    pub id: FileId,
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
        self.elf.as_ref()?.file_offset_to_vaddr(off)
    }

    /// Load bias of a mapping of this file that starts at `start` with file offset `pgoff`.
    pub fn bias(&self, start: u64, pgoff: u64) -> Option<u64> {
        self.elf.as_ref()?.bias(start, pgoff)
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
        let elf = perfpy_process::elf::read_cached(&file)
            .ok()
            .map(ElfInfo::new);
        let debug = match (&elf, root) {
            (Some(e), Some(root)) if !e.has_dwarf => find_debug_file(root, uids, path, e),
            _ => None,
        };
        let f = Arc::new(MappedFile {
            id: FileId(self.list.len() as u32),
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
                LiveMemory(pid).read_exact(start, &mut buf).ok()?;
                Some(buf)
            });
        let f = image.and_then(|image| {
            let file = memfd_with(&image)
                .map_err(|e| tracing::debug!("vDSO image: {e}"))
                .ok()?;
            let elf = perfpy_process::elf::read_file(&file)
                .ok()
                .map(|e| ElfInfo::new(Arc::new(e)));
            let f = Arc::new(MappedFile {
                id: FileId(self.list.len() as u32),
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
/// end of its mapping in our own `/proc/PID/maps`.
fn own_vdso() -> Option<&'static [u8]> {
    // SAFETY: getauxval only reads the auxiliary vector.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if base == 0 {
        return None;
    }
    let maps = perfpy_process::proc::maps(std::process::id()).ok()?;
    let end = maps.iter().find(|m| m.start == base)?.end;
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

/// The separate debug file of the file mapped at `path` (see
/// `perfpy_symbolize::debug_file`), each candidate opened inside `root` as every file a target
/// controls (see `target_files`).
fn find_debug_file(root: BorrowedFd<'_>, uids: &[u32], path: &str, elf: &ElfFacts) -> Option<File> {
    use perfpy_inject::target_files::{open_in_root, Rules};
    let rules = Rules {
        max_bytes: MAX_DEBUG_FILE,
        ..Rules::mapped_file(uids)
    };
    perfpy_symbolize::debug_file::find(root, path, elf, |candidate| {
        open_in_root(root, candidate, &rules, &crate::signals::ABORT_READS).ok()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Our own vDSO as a mapped file of `files` (see [`Files::vdso`]), and where it is mapped.
    pub(crate) fn own_vdso(files: &mut Files) -> (Arc<MappedFile>, u64, u64) {
        let maps = perfpy_process::proc::maps(std::process::id()).unwrap();
        let m = maps.iter().find(|m| m.path == "[vdso]").unwrap();
        let f = files.vdso(std::process::id(), m.start, m.end).unwrap();
        (f, m.start, m.end)
    }

    #[test]
    fn vdso_image_is_an_elf_file_with_unwind_tables() {
        // Ours stands for every 64-bit process's: same size, an ELF file with .eh_frame (so
        // the unwinder leaves the vDSO by its tables), one for all processes. Its functions
        // are named by the symbolization test of `symbols`.
        let mut files = Files::default();
        let (f, start, end) = own_vdso(&mut files);
        assert_eq!(f.path, "[vdso]");
        let elf = f.elf.as_ref().unwrap();
        assert!(elf.sections.eh_frame.is_some() && elf.sections.text.is_some());
        let other = std::process::id() + 1;
        assert!(Arc::ptr_eq(
            &f,
            &files.vdso(other, start + 0x1000, end + 0x1000).unwrap()
        ));
    }
}
