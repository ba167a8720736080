//! The ELF files a process maps, read once per file: load segments (and the one load-bias
//! formula), build id and debug link, the sections the unwinder needs, and, for CPython's
//! interpreter (libpython or an executable with the interpreter inside), its version,
//! evaluation loop, `_PyRuntime` and the symbols injection calls.
//!
//! Every file a profiled process maps is read here, so any bytes are accepted: a file that
//! is not a 64-bit ELF, or is cut short, is an error; offsets, addresses and sizes that do not
//! add up (truncated or corrupt headers) leave out the part they describe instead of
//! overflowing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use memmap2::Mmap;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind};

use crate::Version;

/// A PT_LOAD segment: (p_offset, p_vaddr, p_filesz).
pub type Load = (u64, u64, u64);

/// A section: its virtual addresses (as in the file) and where its bytes are in the file
/// (inside the file: checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub addr: Range<u64>,
    pub file: Range<usize>,
}

/// What the unwinder needs of an ELF file.
#[derive(Clone, Debug, Default)]
pub struct UnwindSections {
    pub text: Option<Section>,
    pub eh_frame: Option<Section>,
    pub eh_frame_hdr: Option<Section>,
    pub debug_frame: Option<Section>,
    pub got: Option<Range<u64>>,
}

/// What perfpy needs of one ELF file.
#[derive(Debug)]
pub struct ElfFacts {
    pub loads: Vec<Load>,
    pub build_id: Option<Vec<u8>>,
    /// Has DWARF (`.debug_info`) of its own: no separate debug file is looked for.
    pub has_dwarf: bool,
    /// Has a symbol table (`.symtab`), not only the dynamic one.
    pub has_symtab: bool,
    /// `.gnu_debuglink`: the name of its separate debug file and that file's CRC-32.
    pub debuglink: Option<(Vec<u8>, u32)>,
    pub sections: UnwindSections,
    /// Symbol name → (virtual address as in the file, size), for the names in [`WANTED`]
    /// defined here (`.dynsym` first, then `.symtab`). `_PyRuntime` of a 3.13+ interpreter
    /// stripped of its symbols comes from its `.PyRuntime` section.
    pub symbols: HashMap<String, (u64, u64)>,
    /// Holds CPython's evaluation loop: the interpreter (its frames are the interpreter's,
    /// not the user's).
    pub is_interpreter: bool,
    /// The interpreter's version from its `Py_Version` constant (3.11+); before 3.11 see
    /// [`Version::from_file_name`].
    pub python_version: Option<Version>,
    /// Virtual address range of `_PyEval_EvalFrameDefault` (`PyEval_EvalFrameEx` on 2.7):
    /// where the eBPF walker's Python frames go.
    pub eval_range: Option<Range<u64>>,
    /// Virtual address of `_PyRuntime` (3.7+) or, failing that, `interp_head` (2.7, 3.6):
    /// where the eBPF walker and `dump` start.
    pub py_runtime: Option<u64>,
}

/// Functions inside which a thread may hold CPython's pending-calls lock: injection never
/// interrupts a thread there (`perfpy_inject`'s pending-call path). Looked up with [`WANTED`].
pub const PENDING_FUNCTIONS: &[&str] = &[
    "Py_AddPendingCall",
    "_PyEval_AddPendingCall",
    "_PyEval_MakePendingCalls",
    "make_pending_calls",
    "_pop_pending_call",
    "_push_pending_call",
    "PyThread_acquire_lock_timed",
    "PyThread_acquire_lock",
    "PyThread_release_lock",
];

/// Symbols perfpy looks up (besides [`PENDING_FUNCTIONS`]); reading all of a big `.symtab` into a map would cost tens of MB.
pub const WANTED: &[&str] = &[
    "_PyEval_EvalFrameDefault",
    "PyEval_EvalFrameEx",
    "Py_Version",
    "PyGILState_Ensure",
    "PyGILState_Release",
    "PyGILState_Check",
    "PyInterpreterState_Main",
    "PyRun_SimpleString",
    "_Py_trampoline_func_start",
    "_Py_trampoline_func_end",
    "_PyPerfTrampoline_SetCallbacks",
    "_PyIsPerfTrampolineActive",
    "_PyRuntime",
    "interp_head",
    "autoTLSkey",
    "_PyThreadState_Current",
    "mmap",
    "munmap",
];

const EVAL: [&[u8]; 2] = [b"_PyEval_EvalFrameDefault", b"PyEval_EvalFrameEx"];

/// `mov rax, 15 (rt_sigreturn); syscall`: glibc's and musl's `__restore_rt`.
const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// An ELF file, mapped read-only, and its facts.
pub struct ElfFile {
    map: Mmap,
    pub facts: ElfFacts,
}

impl std::ops::Deref for ElfFile {
    type Target = ElfFacts;
    fn deref(&self) -> &ElfFacts {
        &self.facts
    }
}

impl ElfFile {
    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes of a section of [`ElfFacts::sections`].
    pub fn section_bytes(&self, s: &Section) -> &[u8] {
        &self.map[s.file.clone()]
    }

    /// Virtual address (as in the file) of `mov rax, 15; syscall` in an executable segment:
    /// libc's `__restore_rt`, which returns from a signal handler through `rt_sigreturn`.
    /// Looked for on demand: only injection needs it, and only in libc.
    pub fn sigreturn(&self) -> Option<u64> {
        let elf = ElfFile64::<object::Endianness>::parse(&self.map[..]).ok()?;
        let endian = elf.endian();
        elf.elf_program_headers().iter().find_map(|ph| {
            if ph.p_type(endian) != object::elf::PT_LOAD
                || ph.p_flags(endian) & object::elf::PF_X == 0
            {
                return None;
            }
            let off = usize::try_from(ph.p_offset(endian)).ok()?;
            let len = usize::try_from(ph.p_filesz(endian)).ok()?;
            let seg = self.map.get(off..off.checked_add(len)?)?;
            let at = seg.windows(SIGRETURN.len()).position(|w| w == SIGRETURN)?;
            ph.p_vaddr(endian).checked_add(at as u64)
        })
    }
}

/// [`read_file`], once per file (device, inode, size, modification time) for the life of
/// perfpy: discovery, `info`, `dump` and the sampler meet the same interpreter and C library
/// in every process, and parsing libpython takes milliseconds.
pub fn read_cached(file: &File) -> io::Result<Arc<ElfFile>> {
    use std::os::unix::fs::MetadataExt;
    type Key = (u64, u64, u64, i64, i64);
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<ElfFile>>>> = OnceLock::new();
    let m = file.metadata()?;
    let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(f) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let elf = Arc::new(read_file(file)?);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    // Bounded: past this many files (`-a` on a big machine) a file is read again when met
    // again; those in use stay with their users.
    if c.len() >= 1024 {
        c.clear();
    }
    c.insert(key, elf.clone());
    Ok(elf)
}

/// Maps and reads an ELF file already opened (a target's: opened through
/// `perfpy_inject::target_files`), without the cache.
pub fn read_file(file: &File) -> io::Result<ElfFile> {
    // SAFETY: a read-only private mapping of a regular file. If another process truncates the
    // file while we read it we may get SIGBUS; mapped executables and libraries are not modified
    // in place in practice (updates replace them), the same assumption perf and py-spy make.
    let map = unsafe { Mmap::map(file) }?;
    let facts = ElfFacts::parse(&map)?;
    Ok(ElfFile { map, facts })
}

impl ElfFacts {
    /// The facts of an ELF image in memory.
    pub fn parse(data: &[u8]) -> io::Result<ElfFacts> {
        let elf = ElfFile64::<object::Endianness>::parse(data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let endian = elf.endian();
        let loads: Vec<Load> = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
            .map(|ph| (ph.p_offset(endian), ph.p_vaddr(endian), ph.p_filesz(endian)))
            .collect();
        let symbols = wanted_symbols(&elf);
        let is_interpreter = EVAL
            .iter()
            .any(|n| symbols.contains_key(std::str::from_utf8(n).expect("ASCII")));
        let python_version = symbols
            .get("Py_Version")
            .filter(|_| is_interpreter)
            .and_then(|&(vaddr, _)| {
                let off = usize::try_from(vaddr_to_offset(&loads, vaddr)?).ok()?;
                let b = data.get(off..off.checked_add(4)?)?;
                Version::from_hex(u32::from_le_bytes(b.try_into().ok()?))
            });
        // The first name of EVAL that is defined: 3.6+ keep the 2.7 name `PyEval_EvalFrameEx`
        // as a small wrapper (53 bytes in 3.11), listed before the loop in some symbol tables.
        let eval_range = is_interpreter
            .then(|| {
                EVAL.iter().find_map(|name| {
                    elf.symbols()
                        .chain(elf.dynamic_symbols())
                        .filter(|s| s.name_bytes().is_ok_and(|n| n == *name) && s.size() > 0)
                        .find_map(|s| Some(s.address()..s.address().checked_add(s.size())?))
                })
            })
            .flatten();
        let py_runtime = is_interpreter
            .then(|| {
                symbols
                    .get("_PyRuntime")
                    .or_else(|| symbols.get("interp_head"))
                    .map(|&(a, _)| a)
            })
            .flatten();
        Ok(ElfFacts {
            build_id: elf.build_id().ok().flatten().map(<[u8]>::to_vec),
            has_dwarf: elf.section_by_name(".debug_info").is_some(),
            has_symtab: elf.section_by_name(".symtab").is_some(),
            debuglink: elf
                .gnu_debuglink()
                .ok()
                .flatten()
                .map(|(name, crc)| (name.to_vec(), crc)),
            sections: unwind_sections(&elf, data.len()),
            loads,
            symbols,
            is_interpreter,
            python_version,
            eval_range,
            py_runtime,
        })
    }

    /// Load bias of a mapping of this file (see [`load_bias`]).
    pub fn bias(&self, start: u64, pgoff: u64) -> Option<u64> {
        load_bias(&self.loads, start, pgoff)
    }

    /// The virtual address (as in the file) of a file offset, via the load segments.
    pub fn file_offset_to_vaddr(&self, off: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|(o, _, sz)| *o <= off && off < o.saturating_add(*sz))
            .and_then(|(o, v, _)| v.checked_add(off - o))
    }
}

/// The load bias of a mapping of an ELF file that starts at `start` with file offset `pgoff`:
/// what to add to an address of the file to get the address in the process. The segment that
/// holds `pgoff` (else the first) gives it: the mapping starts at the page of its p_offset,
/// so `start` corresponds to `p_vaddr - (p_offset - pgoff)`.
pub fn load_bias(loads: &[Load], start: u64, pgoff: u64) -> Option<u64> {
    let (o, v, _) = loads
        .iter()
        .find(|(o, _, sz)| *o & !0xfff <= pgoff && pgoff < o.saturating_add(*sz))
        .or_else(|| loads.first())?;
    Some(start.wrapping_sub(v.wrapping_sub(o.wrapping_sub(pgoff))))
}

/// File offset of a virtual address through the PT_LOAD segment that holds it; `None` when
/// no segment does (or the segment's numbers overflow: a corrupt header).
fn vaddr_to_offset(loads: &[Load], vaddr: u64) -> Option<u64> {
    loads.iter().find_map(|&(o, v, sz)| {
        let inside = v <= vaddr && vaddr < v.checked_add(sz)?;
        inside.then(|| o.checked_add(vaddr - v)).flatten()
    })
}

fn wanted_symbols(elf: &ElfFile64<'_, object::Endianness>) -> HashMap<String, (u64, u64)> {
    let mut symbols = HashMap::new();
    for s in elf.dynamic_symbols().chain(elf.symbols()) {
        let Ok(name) = s.name() else { continue };
        if s.address() == 0
            || !(WANTED.contains(&name) || PENDING_FUNCTIONS.contains(&name))
            || symbols.contains_key(name)
        {
            continue;
        }
        symbols.insert(name.to_string(), (s.address(), s.size()));
    }
    // CPython 3.13+ also puts `_PyRuntime` in a section of its own, `.PyRuntime`, so that a
    // profiler finds it in a binary stripped of every symbol.
    if !symbols.contains_key("_PyRuntime") {
        if let Some(s) = elf
            .section_by_name(".PyRuntime")
            .filter(|s| s.address() != 0 && s.kind() != SectionKind::UninitializedData)
        {
            symbols.insert("_PyRuntime".to_string(), (s.address(), s.size()));
        }
    }
    symbols
}

fn unwind_sections(elf: &ElfFile64<'_, object::Endianness>, len: usize) -> UnwindSections {
    let section = |name: &str| -> Option<Section> {
        let s = elf.section_by_name(name)?;
        let (off, size) = s.file_range()?;
        let file = usize::try_from(off).ok()?..usize::try_from(off.checked_add(size)?).ok()?;
        if file.end > len {
            return None;
        }
        Some(Section {
            addr: s.address()..s.address().checked_add(s.size())?,
            file,
        })
    };
    UnwindSections {
        text: section(".text"),
        eh_frame: section(".eh_frame"),
        eh_frame_hdr: section(".eh_frame_hdr"),
        debug_frame: section(".debug_frame"),
        got: elf
            .section_by_name(".got")
            .and_then(|s| Some(s.address()..s.address().checked_add(s.size())?)),
    }
}

#[cfg(test)]
mod tests {
    //! Hostile files: every file a profiled process maps is read here, so a truncated,
    //! corrupted or fake one must give an error or facts that hold for its bytes, never a
    //! panic (an overflow in a debug build) or a section outside the file.

    use super::*;
    use object::read::elf::{FileHeader, SectionHeader};
    use object::Endianness;
    use proptest::prelude::*;
    use proptest::sample::Index;

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
                eprintln!("NOTE: {LIBPYTHON}: {e}; skipped");
                None
            }
        })
        .as_deref()
    }

    fn bin_true() -> &'static [u8] {
        static CELL: OnceLock<Vec<u8>> = OnceLock::new();
        CELL.get_or_init(|| std::fs::read("/bin/true").expect("/bin/true"))
    }

    /// A C program with `_PyRuntime` only as the `.PyRuntime` section (no symbol at all), as
    /// a fully stripped 3.13+.
    fn pyruntime_section_binary() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("rt.c");
        std::fs::write(
            &c,
            "__attribute__((section(\".PyRuntime\"), used)) char runtime_state[64] = \"xdebugpy\";\n\
             void _PyEval_EvalFrameDefault(void) {}\nint main(void) { return 0; }\n",
        )
        .unwrap();
        let exe = dir.path().join("rt");
        let st = std::process::Command::new("cc")
            .args(["-O0", "-rdynamic", "-o"])
            .arg(&exe)
            .arg(&c)
            .status()
            .expect("cc");
        assert!(st.success());
        std::fs::read(&exe).unwrap()
    }

    #[test]
    fn py_runtime_from_the_pyruntime_section() {
        let data = pyruntime_section_binary();
        let elf = ElfFile64::<Endianness>::parse(&data[..]).unwrap();
        let section = elf.section_by_name(".PyRuntime").unwrap();
        assert!(!elf
            .dynamic_symbols()
            .chain(elf.symbols())
            .any(|s| s.name() == Ok("_PyRuntime")));
        let f = ElfFacts::parse(&data).unwrap();
        assert!(f.is_interpreter);
        assert_eq!(f.py_runtime, Some(section.address()));
        assert_eq!(
            f.symbols.get("_PyRuntime"),
            Some(&(section.address(), section.size()))
        );
    }

    #[test]
    fn py_version_constant_of_installed_interpreters() {
        // 3.11+ exports Py_Version: the version read from the file matches the directory name.
        let Ok(dir) = std::fs::read_dir("/root/.pyenv/versions") else {
            assert!(!ci(), "no pyenv interpreters");
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
            let f = read_cached(&File::open(&lib).unwrap()).unwrap();
            assert!(f.is_interpreter);
            let got = f.python_version.map(|v| v.to_string());
            assert_eq!(got.as_deref(), Some(v.as_str()), "{}", lib.display());
        }
    }

    /// Debian's own 3.13 – 3.15 (stripped, non-PIE, libpython inside), when the sid chroot of
    /// scripts/deps.sh is there: an interpreter, its version, `_PyRuntime` (in `.dynsym`, at the
    /// start of `.PyRuntime`), and a load bias of 0 for its first mapping.
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
            let f = ElfFacts::parse(&data).unwrap();
            assert!(f.is_interpreter);
            assert!(f
                .python_version
                .is_some_and(|v| v.minor_pair() == (3, minor)));
            assert_eq!(f.py_runtime, Some(section), "3.{minor}");
            let first = f.loads[0];
            assert_eq!(f.bias(first.1 & !0xfff, 0), Some(0));
        }
    }

    #[test]
    fn load_bias_of_pie_and_non_pie_mappings() {
        // A PIE file: text at p_offset 0x1000, p_vaddr 0x1000; mapped at 0x7f00_0000_0000.
        let pie = [
            (0, 0, 0x800),
            (0x1000, 0x1000, 0x5000),
            (0x6000, 0x7000, 0x100),
        ];
        let base = 0x7f00_0000_0000;
        assert_eq!(load_bias(&pie, base, 0), Some(base));
        assert_eq!(load_bias(&pie, base + 0x1000, 0x1000), Some(base));
        // The data segment, whose p_vaddr is a page ahead of its offset.
        assert_eq!(load_bias(&pie, base + 0x7000, 0x6000), Some(base));
        // Non-PIE: addresses in the file are the addresses in the process.
        let exe = [(0, 0x40_0000, 0x1000), (0x1000, 0x40_1000, 0x5000)];
        assert_eq!(load_bias(&exe, 0x40_1000, 0x1000), Some(0));
        assert_eq!(load_bias(&[], 0x1000, 0), None);
    }

    /// What a caller may rely on whatever the input: sections inside the file (reading them
    /// would panic otherwise), ranges that do not run backwards, only the wanted symbols.
    fn assert_plausible(f: &ElfFacts, len: usize) {
        let s = &f.sections;
        for sec in [&s.text, &s.eh_frame, &s.eh_frame_hdr, &s.debug_frame]
            .into_iter()
            .flatten()
        {
            assert!(sec.addr.start <= sec.addr.end);
            assert!(sec.file.start <= sec.file.end && sec.file.end <= len);
        }
        for r in [&s.got, &f.eval_range].into_iter().flatten() {
            assert!(r.start <= r.end);
        }
        assert!(f
            .symbols
            .keys()
            .all(|k| WANTED.contains(&k.as_str()) || PENDING_FUNCTIONS.contains(&k.as_str())));
        if let Some(v) = f.python_version {
            assert!(v.major == 2 || v.major == 3, "{v}");
        }
    }

    /// Byte ranges that steer parsing: headers, the section header table, symbol tables and
    /// their strings, notes, the dynamic section. Flipping bits in code or data changes
    /// nothing parsed.
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
            ".dynamic",
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

    /// File offsets of the u64 fields whose sums the parser computes: PT_LOAD offset, address
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
        let t = ElfFacts::parse(bin_true()).unwrap();
        assert!(!t.is_interpreter && t.python_version.is_none() && t.eval_range.is_none());
        assert_eq!(t.build_id.as_ref().map(|b| b.len()), Some(20));
        assert!(t.sections.text.is_some() && t.sections.eh_frame.is_some());
        assert!(!t.loads.is_empty());
        let Some(lib) = libpython() else { return };
        let p = ElfFacts::parse(lib).unwrap();
        assert!(p.is_interpreter);
        assert_eq!(p.python_version, Version::from_hex(0x030c_01f0));
        assert!(p.eval_range.as_ref().is_some_and(|r| r.start < r.end));
        assert!(p.symbols.contains_key("_Py_trampoline_func_start"));
        assert!(p.py_runtime.is_some());
        assert!(summed_fields(lib).len() >= 3 * 4 + 3 * 4 + 2 * 4);
        assert_plausible(&p, lib.len());
    }

    #[test]
    fn sigreturn_of_the_c_library() {
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libc");
        let f = read_cached(&File::open(libc).unwrap()).unwrap();
        let at = f.sigreturn().expect("__restore_rt");
        let off = vaddr_to_offset(&f.loads, at).unwrap() as usize;
        assert_eq!(f.bytes()[off..off + SIGRETURN.len()], SIGRETURN);
        // Read once: the same facts for the same file.
        assert!(Arc::ptr_eq(
            &f,
            &read_cached(&File::open(libc).unwrap()).unwrap()
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A file cut short (a copy interrupted, a download in progress), through a real file
        /// (an empty one included): the section headers sit at the end, so a prefix that
        /// loses them is not an ELF file we use.
        #[test]
        fn prefixes_of_bin_true(len in prop_oneof![0usize..512, 0usize..40_000]) {
            let data = bin_true();
            let len = len.min(data.len());
            let mut f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut f, &data[..len]).unwrap();
            let r = read_file(&f);
            prop_assert_eq!(r.is_ok(), len == data.len(), "{}-byte prefix", len);
        }

        #[test]
        fn prefixes_of_libpython(len in prop_oneof![0usize..70_000, any::<usize>()]) {
            let Some(lib) = libpython() else { return Ok(()) };
            let len = len % lib.len();
            prop_assert!(ElfFacts::parse(&lib[..len]).is_err(), "{}-byte prefix", len);
        }

        /// Random bytes, alone or behind a real ELF header (so parsing follows offsets into
        /// the garbage).
        #[test]
        fn random_bytes(mut bytes in proptest::collection::vec(any::<u8>(), 0..8192), real_header in any::<bool>()) {
            if real_header {
                let n = bytes.len().min(64);
                bytes[..n].copy_from_slice(&bin_true()[..n]);
            }
            if let Ok(f) = ElfFacts::parse(&bytes) {
                assert_plausible(&f, bytes.len());
            }
        }
    }

    proptest! {
        // Each case copies and parses the 30 MB libpython: few cases, each worth it.
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Bit flips in the structures the parser follows: an error or plausible facts.
        #[test]
        fn bit_flipped_libpython(flips in proptest::collection::vec((any::<Index>(), any::<Index>(), 0u8..8), 1..16)) {
            let Some(lib) = libpython() else { return Ok(()) };
            let ranges = structural_ranges(lib);
            let mut data = lib.to_vec();
            for (r, at, bit) in flips {
                let r = &ranges[r.index(ranges.len())];
                data[r.start + at.index(r.len())] ^= 1 << bit;
            }
            if let Ok(f) = ElfFacts::parse(&data) {
                assert_plausible(&f, data.len());
            }
        }

        /// Segment, section and symbol numbers set to anything, extremes included: the sums
        /// the parser makes of them overflow (a panic in a debug build before they were
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
            let f = ElfFacts::parse(&data);
            prop_assert!(f.as_ref().is_ok_and(|f| f.is_interpreter));
            assert_plausible(&f.unwrap(), data.len());
        }
    }
}
