//! ELF facts of the interpreter file: symbols (`.dynsym` then `.symtab`), load segments,
//! `Py_Version`.

use std::collections::HashMap;

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Object, ObjectSymbol};

pub struct ElfFacts {
    /// Symbol name → (virtual address as in the file, size).
    pub symbols: HashMap<String, (u64, u64)>,
    /// p_vaddr of the first PT_LOAD.
    pub first_load_vaddr: u64,
    /// PT_LOAD segments: (p_offset, p_vaddr, p_filesz).
    #[allow(dead_code)]
    pub loads: Vec<(u64, u64, u64)>,
    pub is_interpreter: bool,
    pub py_version_hex: Option<u32>,
    /// Virtual address (as in the file) of `mov rax, 15; syscall` in an executable segment:
    /// libc's `__restore_rt`, which returns from a signal handler through `rt_sigreturn`.
    pub sigreturn: Option<u64>,
}

/// `mov rax, 15 (rt_sigreturn); syscall`: glibc's and musl's `__restore_rt`.
const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// Symbols we care about; reading all of a big `.symtab` into a map would cost tens of MB.
const WANTED: &[&str] = &[
    "_PyEval_EvalFrameDefault",
    "PyEval_EvalFrameEx",
    "Py_Version",
    "PyGILState_Ensure",
    "PyGILState_Release",
    "PyGILState_Check",
    "PyInterpreterState_Main",
    "PyRun_SimpleString",
    "Py_AddPendingCall",
    "_PyEval_AddPendingCall",
    "_PyEval_MakePendingCalls",
    "make_pending_calls",
    "_pop_pending_call",
    "_push_pending_call",
    "PyThread_acquire_lock_timed",
    "PyThread_acquire_lock",
    "PyThread_release_lock",
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

/// [`read_file`], once per file (device, inode, size, modification time): `-a` meets the same
/// interpreter and libc in every process it looks at, and parsing libpython takes milliseconds.
pub fn read_cached(file: &std::fs::File) -> std::io::Result<std::sync::Arc<ElfFacts>> {
    use std::os::unix::fs::MetadataExt;
    type Key = (u64, u64, u64, i64, i64);
    static CACHE: std::sync::OnceLock<std::sync::Mutex<HashMap<Key, std::sync::Arc<ElfFacts>>>> =
        std::sync::OnceLock::new();
    let m = file.metadata()?;
    let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(f) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let facts = std::sync::Arc::new(read_file(file)?);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    // Bounded: a machine has a handful of interpreters and C libraries.
    if c.len() >= 256 {
        c.clear();
    }
    c.insert(key, facts.clone());
    Ok(facts)
}

/// The facts of an ELF file already opened (through [`crate::target_files`]: it is a target's).
pub fn read_file(file: &std::fs::File) -> std::io::Result<ElfFacts> {
    // SAFETY: read-only private mapping of a regular file we only read; an executable or
    // library is not modified in place while mapped by a running process.
    let map = unsafe { memmap2::Mmap::map(file) }?;
    parse(&map)
}

/// The facts of an ELF image in memory. Any bytes are accepted: a file that is not a 64-bit
/// ELF, or whose headers point outside it, is an error; addresses and sizes are never trusted
/// to add up without overflow.
pub fn parse(data: &[u8]) -> std::io::Result<ElfFacts> {
    let elf = ElfFile64::<object::Endianness>::parse(data)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let endian = elf.endian();
    let loads: Vec<(u64, u64, u64)> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
        .map(|ph| (ph.p_offset(endian), ph.p_vaddr(endian), ph.p_filesz(endian)))
        .collect();
    let mut symbols = HashMap::new();
    for s in elf.dynamic_symbols().chain(elf.symbols()) {
        let Ok(name) = s.name() else { continue };
        if s.address() == 0 || !WANTED.contains(&name) || symbols.contains_key(name) {
            continue;
        }
        symbols.insert(name.to_string(), (s.address(), s.size()));
    }
    // CPython 3.13+ also puts `_PyRuntime` in a section of its own, `.PyRuntime`, so that a
    // profiler finds it in a binary stripped of every symbol.
    if !symbols.contains_key("_PyRuntime") {
        use object::{ObjectSection, SectionKind};
        if let Some(s) = elf
            .section_by_name(".PyRuntime")
            .filter(|s| s.address() != 0 && s.kind() != SectionKind::UninitializedData)
        {
            symbols.insert("_PyRuntime".to_string(), (s.address(), s.size()));
        }
    }
    let is_interpreter = symbols.contains_key("_PyEval_EvalFrameDefault")
        || symbols.contains_key("PyEval_EvalFrameEx");
    let py_version_hex = symbols.get("Py_Version").and_then(|(vaddr, _)| {
        let off = vaddr_to_offset(&loads, *vaddr)?;
        let off = usize::try_from(off).ok()?;
        Some(u32::from_le_bytes(
            data.get(off..off.checked_add(4)?)?.try_into().ok()?,
        ))
    });
    // Only libc needs it (and the interpreter is big): looked for where there is no
    // interpreter.
    let sigreturn = if is_interpreter {
        None
    } else {
        find_sigreturn(&elf, data)
    };
    Ok(ElfFacts {
        symbols,
        first_load_vaddr: loads.first().map(|l| l.1).unwrap_or(0),
        loads,
        is_interpreter,
        py_version_hex,
        sigreturn,
    })
}

fn find_sigreturn(elf: &ElfFile64<object::Endianness>, data: &[u8]) -> Option<u64> {
    let endian = elf.endian();
    elf.elf_program_headers().iter().find_map(|ph| {
        if ph.p_type(endian) != object::elf::PT_LOAD || ph.p_flags(endian) & object::elf::PF_X == 0
        {
            return None;
        }
        let off = usize::try_from(ph.p_offset(endian)).ok()?;
        let len = usize::try_from(ph.p_filesz(endian)).ok()?;
        let seg = data.get(off..off.checked_add(len)?)?;
        let at = seg.windows(SIGRETURN.len()).position(|w| w == SIGRETURN)?;
        ph.p_vaddr(endian).checked_add(at as u64)
    })
}

/// File offset of a virtual address through the PT_LOAD segment that holds it; `None` when
/// no segment does (or the segment's numbers overflow: a corrupt header).
fn vaddr_to_offset(loads: &[(u64, u64, u64)], vaddr: u64) -> Option<u64> {
    loads.iter().find_map(|&(o, v, sz)| {
        let inside = v <= vaddr && vaddr < v.checked_add(sz)?;
        inside.then(|| o.checked_add(vaddr - v)).flatten()
    })
}

/// `(major, minor)` from a file name: `libpython3.9.so.1.0`, `python2.7`, `python3.13t`.
pub fn version_from_name(path: &str) -> Option<(u8, u8)> {
    let name = path.rsplit('/').next()?;
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let mut it = rest.splitn(3, '.');
    let major: u8 = it.next()?.parse().ok()?;
    let minor: String = it
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    //! Hostile interpreter files: `discover` reads every file a process maps whose name says
    //! python, so a truncated, corrupted or fake one must give an error or facts that are true
    //! of the bytes, never a panic (an overflow in a debug build) or a read out of bounds.

    use super::*;
    use object::{Object, ObjectSection};
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::ops::Range;
    use std::sync::OnceLock;

    const LIBPYTHON: &str = "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0";
    /// `PY_VERSION_HEX` of 3.12.1 final.
    const PY_3_12_1: u32 = 0x030c_01f0;

    fn ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
    }

    /// A real file, read once per test binary; `None` (with a note) when it is not installed
    /// outside CI, where a missing fixture is a failure.
    fn fixture(
        path: &'static str,
        cell: &'static OnceLock<Option<Vec<u8>>>,
    ) -> Option<&'static [u8]> {
        cell.get_or_init(|| match std::fs::read(path) {
            Ok(d) => Some(d),
            Err(e) if ci() => panic!("{path}: {e}"),
            Err(e) => {
                eprintln!("NOTE: {path}: {e}; skipped");
                None
            }
        })
        .as_deref()
    }

    fn libpython() -> Option<&'static [u8]> {
        static CELL: OnceLock<Option<Vec<u8>>> = OnceLock::new();
        fixture(LIBPYTHON, &CELL)
    }

    fn bin_true() -> &'static [u8] {
        static CELL: OnceLock<Vec<u8>> = OnceLock::new();
        CELL.get_or_init(|| std::fs::read("/bin/true").expect("/bin/true"))
    }

    /// The byte ranges that steer parsing: ELF and program headers, section headers, the
    /// symbol tables and their strings, the dynamic section. Flipping bits elsewhere (code,
    /// data) changes nothing the parser looks at.
    fn structural_ranges(data: &[u8]) -> Vec<Range<usize>> {
        let elf = ElfFile64::<object::Endianness>::parse(data).unwrap();
        let hdr = elf.elf_header();
        let e = elf.endian();
        let phoff = hdr.e_phoff.get(e) as usize;
        let shoff = hdr.e_shoff.get(e) as usize;
        let mut out = vec![
            0..64,
            phoff..phoff + 56 * hdr.e_phnum.get(e) as usize,
            shoff..shoff + 64 * hdr.e_shnum.get(e) as usize,
        ];
        for name in [
            ".dynsym",
            ".dynstr",
            ".dynamic",
            ".symtab",
            ".strtab",
            ".note.gnu.build-id",
        ] {
            if let Some((o, s)) = elf.section_by_name(name).and_then(|s| s.file_range()) {
                out.push(o as usize..(o + s) as usize);
            }
        }
        out
    }

    /// File offsets of the `st_value` fields of `Py_Version` in `.dynsym` and `.symtab`.
    fn py_version_value_fields(data: &[u8]) -> Vec<usize> {
        let elf = ElfFile64::<object::Endianness>::parse(data).unwrap();
        let mut out = Vec::new();
        for (table, syms) in [
            (".dynsym", elf.dynamic_symbols()),
            (".symtab", elf.symbols()),
        ] {
            let Some((off, _)) = elf.section_by_name(table).and_then(|s| s.file_range()) else {
                continue;
            };
            for s in syms.filter(|s| s.name() == Ok("Py_Version")) {
                // Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64.
                out.push(off as usize + 24 * s.index().0 + 8);
            }
        }
        out
    }

    /// `_PyRuntime` from the `.PyRuntime` section when no symbol has it (a fully stripped 3.13+).
    #[test]
    fn py_runtime_from_the_pyruntime_section() {
        let dir = std::env::temp_dir().join(format!("perfpy-inject-rt-{}", std::process::id()));
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
        let elf = ElfFile64::<object::Endianness>::parse(&data[..]).unwrap();
        let section = elf.section_by_name(".PyRuntime").unwrap();
        let f = parse(&data).unwrap();
        assert!(f.is_interpreter);
        assert_eq!(
            f.symbols.get("_PyRuntime"),
            Some(&(section.address(), section.size()))
        );
    }

    #[test]
    fn real_files_parse() {
        // The baseline the property tests below depart from: without it "never panics" could
        // pass on a parser that rejects everything.
        let t = parse(bin_true()).unwrap();
        assert!(!t.is_interpreter && t.py_version_hex.is_none() && !t.loads.is_empty());
        let Some(lib) = libpython() else { return };
        let p = parse(lib).unwrap();
        assert!(p.is_interpreter);
        assert_eq!(p.py_version_hex, Some(PY_3_12_1));
        assert!(p.symbols.contains_key("_Py_trampoline_func_start"));
        assert_eq!(
            py_version_value_fields(lib).len(),
            2,
            "Py_Version in .dynsym and .symtab"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A file cut short (a copy interrupted, a download in progress) never yields a fact
        /// the whole file does not state: section headers sit at the end, so any prefix that
        /// loses them is an error.
        #[test]
        fn prefixes_of_bin_true(len in 0usize..40_000) {
            let data = bin_true();
            let len = len.min(data.len());
            let r = parse(&data[..len]);
            if len < data.len() {
                prop_assert!(r.is_err(), "a {len}-byte prefix parsed");
            } else {
                prop_assert!(r.is_ok());
            }
        }

        /// Random bytes, and random bytes behind a real ELF header (so parsing gets past the
        /// magic and follows offsets into the garbage).
        #[test]
        fn random_bytes(mut bytes in proptest::collection::vec(any::<u8>(), 0..8192), real_header in any::<bool>()) {
            if real_header {
                let n = bytes.len().min(64);
                bytes[..n].copy_from_slice(&bin_true()[..n]);
            }
            if let Ok(f) = parse(&bytes) {
                prop_assert!(f.symbols.keys().all(|k| WANTED.contains(&k.as_str())));
            }
        }

        /// The same for the interpreter, cut in its headers or anywhere in its 30 MB.
        #[test]
        fn prefixes_of_libpython(len in prop_oneof![0usize..70_000, any::<usize>()]) {
            let Some(lib) = libpython() else { return Ok(()) };
            let len = len % lib.len();
            prop_assert!(parse(&lib[..len]).is_err(), "a {len}-byte prefix parsed");
        }
    }

    proptest! {
        // Each case copies and parses the 30 MB libpython: few cases, each worth it.
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Bit flips in the structures the parser follows: an error or facts, never a panic
        /// (out-of-range offsets, counts and addresses; names cut or joined).
        #[test]
        fn bit_flipped_libpython(flips in proptest::collection::vec((any::<Index>(), any::<Index>(), 0u8..8), 1..16)) {
            let Some(lib) = libpython() else { return Ok(()) };
            let ranges = structural_ranges(lib);
            let mut data = lib.to_vec();
            for (r, at, bit) in flips {
                let r = &ranges[r.index(ranges.len())];
                data[r.start + at.index(r.len())] ^= 1 << bit;
            }
            let _ = parse(&data);
        }

        /// `Py_Version` at any address, load segments with any offset, address and size: the
        /// sums that turn its address into a file offset overflow (a panic in a debug build
        /// before they were checked); the interpreter is still recognised.
        #[test]
        fn py_version_anywhere(
            value in prop_oneof![any::<u64>(), (0u64..0x1000).prop_map(|d| u64::MAX - d), 0x379000u64..0x4cc000],
            seg in any::<Index>(),
            field in 0usize..3,
            seg_value in prop_oneof![any::<u64>(), (0u64..0x1000).prop_map(|d| u64::MAX - d), 0u64..0x1000],
        ) {
            let Some(lib) = libpython() else { return Ok(()) };
            let mut data = lib.to_vec();
            for at in py_version_value_fields(lib) {
                data[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            let elf = ElfFile64::<object::Endianness>::parse(lib).unwrap();
            let e = elf.endian();
            let loads: Vec<u64> = elf
                .elf_program_headers()
                .iter()
                .enumerate()
                .filter(|(_, ph)| ph.p_type(e) == object::elf::PT_LOAD)
                .map(|(i, _)| elf.elf_header().e_phoff.get(e) + 56 * i as u64)
                .collect();
            // Elf64_Phdr: p_offset at 8, p_vaddr at 16, p_filesz at 32.
            let at = (loads[seg.index(loads.len())] + [8, 16, 32][field]) as usize;
            data[at..at + 8].copy_from_slice(&seg_value.to_le_bytes());
            let f = parse(&data).unwrap();
            prop_assert!(f.is_interpreter);
        }
    }
}
