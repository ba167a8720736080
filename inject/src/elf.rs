//! ELF facts of the interpreter file: symbols (`.dynsym` then `.symtab`), load segments,
//! `Py_Version`.

use std::collections::HashMap;
use std::path::Path;

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
}

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

pub fn read(path: &Path) -> std::io::Result<ElfFacts> {
    let file = std::fs::File::open(path)?;
    // SAFETY: read-only private mapping of a regular file we only read; an executable or
    // library is not modified in place while mapped by a running process.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    let elf = ElfFile64::<object::Endianness>::parse(&map[..])
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
    let is_interpreter = symbols.contains_key("_PyEval_EvalFrameDefault")
        || symbols.contains_key("PyEval_EvalFrameEx");
    let py_version_hex = symbols.get("Py_Version").and_then(|(vaddr, _)| {
        let (o, v, _) = loads
            .iter()
            .find(|(_, v, sz)| *v <= *vaddr && *vaddr < v + sz)?;
        let off = (o + (vaddr - v)) as usize;
        Some(u32::from_le_bytes(map.get(off..off + 4)?.try_into().ok()?))
    });
    Ok(ElfFacts {
        symbols,
        first_load_vaddr: loads.first().map(|l| l.1).unwrap_or(0),
        loads,
        is_interpreter,
        py_version_hex,
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
