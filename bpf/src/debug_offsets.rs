//! CPython 3.13+ publishes the offsets a profiler needs inside the process itself:
//! `_Py_DebugOffsets`, the first member of `_PyRuntime` (cookie `xdebugpy`, `version`,
//! `free_threaded`, then one `uint64_t` per struct size or field offset). perfpy holds only the
//! *layout of that table* per minor version (the field order of `_Py_DebugOffsets` in
//! `Include/internal/pycore_runtime.h` for 3.13, `pycore_debug_offsets.h` for 3.14+); every
//! offset comes from the target, so a patch release that moves a field needs no new perfpy.
//!
//! The table is untrusted input (another process's memory): the cookie, the version and every
//! size and offset used are checked before anything is handed to the eBPF walker; a table that
//! fails is refused with the reason, never half used.

use crate::Offsets;
use perfpy_process::{ReadMemory, Version};

/// The `uint64_t` fields of `_Py_DebugOffsets` after the 8-byte cookie, in order, up to the last
/// one perfpy reads (`unicode_object.asciiobject_size`, or `compactunicodeobject_size` in 3.15).
/// `bpf/tests/it/debug_offsets.rs` checks each list against the version's own header.
const LAYOUT_3_13: &[&str] = &[
    "version",
    "free_threaded",
    "runtime_state.size",
    "runtime_state.finalizing",
    "runtime_state.interpreters_head",
    "interpreter_state.size",
    "interpreter_state.id",
    "interpreter_state.next",
    "interpreter_state.threads_head",
    "interpreter_state.gc",
    "interpreter_state.imports_modules",
    "interpreter_state.sysdict",
    "interpreter_state.builtins",
    "interpreter_state.ceval_gil",
    "interpreter_state.gil_runtime_state",
    "interpreter_state.gil_runtime_state_enabled",
    "interpreter_state.gil_runtime_state_locked",
    "interpreter_state.gil_runtime_state_holder",
    "thread_state.size",
    "thread_state.prev",
    "thread_state.next",
    "thread_state.interp",
    "thread_state.current_frame",
    "thread_state.thread_id",
    "thread_state.native_thread_id",
    "thread_state.datastack_chunk",
    "thread_state.status",
    "interpreter_frame.size",
    "interpreter_frame.previous",
    "interpreter_frame.executable",
    "interpreter_frame.instr_ptr",
    "interpreter_frame.localsplus",
    "interpreter_frame.owner",
    "code_object.size",
    "code_object.filename",
    "code_object.name",
    "code_object.qualname",
    "code_object.linetable",
    "code_object.firstlineno",
    "code_object.argcount",
    "code_object.localsplusnames",
    "code_object.localspluskinds",
    "code_object.co_code_adaptive",
    "pyobject.size",
    "pyobject.ob_type",
    "type_object.size",
    "type_object.tp_name",
    "type_object.tp_repr",
    "type_object.tp_flags",
    "tuple_object.size",
    "tuple_object.ob_item",
    "tuple_object.ob_size",
    "list_object.size",
    "list_object.ob_item",
    "list_object.ob_size",
    "dict_object.size",
    "dict_object.ma_keys",
    "dict_object.ma_values",
    "float_object.size",
    "float_object.ob_fval",
    "long_object.size",
    "long_object.lv_tag",
    "long_object.ob_digit",
    "bytes_object.size",
    "bytes_object.ob_size",
    "bytes_object.ob_sval",
    "unicode_object.size",
    "unicode_object.state",
    "unicode_object.length",
    "unicode_object.asciiobject_size",
];

/// 3.14 adds `threads_main`, the thread-local bytecode fields, `stackpointer` and the set object.
const LAYOUT_3_14: &[&str] = &[
    "version",
    "free_threaded",
    "runtime_state.size",
    "runtime_state.finalizing",
    "runtime_state.interpreters_head",
    "interpreter_state.size",
    "interpreter_state.id",
    "interpreter_state.next",
    "interpreter_state.threads_head",
    "interpreter_state.threads_main",
    "interpreter_state.gc",
    "interpreter_state.imports_modules",
    "interpreter_state.sysdict",
    "interpreter_state.builtins",
    "interpreter_state.ceval_gil",
    "interpreter_state.gil_runtime_state",
    "interpreter_state.gil_runtime_state_enabled",
    "interpreter_state.gil_runtime_state_locked",
    "interpreter_state.gil_runtime_state_holder",
    "interpreter_state.code_object_generation",
    "interpreter_state.tlbc_generation",
    "thread_state.size",
    "thread_state.prev",
    "thread_state.next",
    "thread_state.interp",
    "thread_state.current_frame",
    "thread_state.thread_id",
    "thread_state.native_thread_id",
    "thread_state.datastack_chunk",
    "thread_state.status",
    "interpreter_frame.size",
    "interpreter_frame.previous",
    "interpreter_frame.executable",
    "interpreter_frame.instr_ptr",
    "interpreter_frame.localsplus",
    "interpreter_frame.owner",
    "interpreter_frame.stackpointer",
    "interpreter_frame.tlbc_index",
    "code_object.size",
    "code_object.filename",
    "code_object.name",
    "code_object.qualname",
    "code_object.linetable",
    "code_object.firstlineno",
    "code_object.argcount",
    "code_object.localsplusnames",
    "code_object.localspluskinds",
    "code_object.co_code_adaptive",
    "code_object.co_tlbc",
    "pyobject.size",
    "pyobject.ob_type",
    "type_object.size",
    "type_object.tp_name",
    "type_object.tp_repr",
    "type_object.tp_flags",
    "tuple_object.size",
    "tuple_object.ob_item",
    "tuple_object.ob_size",
    "list_object.size",
    "list_object.ob_item",
    "list_object.ob_size",
    "set_object.size",
    "set_object.used",
    "set_object.table",
    "set_object.mask",
    "dict_object.size",
    "dict_object.ma_keys",
    "dict_object.ma_values",
    "float_object.size",
    "float_object.ob_fval",
    "long_object.size",
    "long_object.lv_tag",
    "long_object.ob_digit",
    "bytes_object.size",
    "bytes_object.ob_size",
    "bytes_object.ob_sval",
    "unicode_object.size",
    "unicode_object.state",
    "unicode_object.length",
    "unicode_object.asciiobject_size",
];

/// 3.15 adds thread-state fields (base frame, GIL, exceptions), `err_stackitem`, type and heap
/// type fields, and `sizeof(PyCompactUnicodeObject)`.
const LAYOUT_3_15: &[&str] = &[
    "version",
    "free_threaded",
    "runtime_state.size",
    "runtime_state.finalizing",
    "runtime_state.interpreters_head",
    "interpreter_state.size",
    "interpreter_state.id",
    "interpreter_state.next",
    "interpreter_state.threads_head",
    "interpreter_state.threads_main",
    "interpreter_state.gc",
    "interpreter_state.imports_modules",
    "interpreter_state.sysdict",
    "interpreter_state.builtins",
    "interpreter_state.ceval_gil",
    "interpreter_state.gil_runtime_state",
    "interpreter_state.gil_runtime_state_enabled",
    "interpreter_state.gil_runtime_state_locked",
    "interpreter_state.gil_runtime_state_holder",
    "interpreter_state.code_object_generation",
    "interpreter_state.tlbc_generation",
    "thread_state.size",
    "thread_state.prev",
    "thread_state.next",
    "thread_state.interp",
    "thread_state.current_frame",
    "thread_state.base_frame",
    "thread_state.last_profiled_frame",
    "thread_state.last_profiled_frame_seq",
    "thread_state.thread_id",
    "thread_state.native_thread_id",
    "thread_state.datastack_chunk",
    "thread_state.status",
    "thread_state.holds_gil",
    "thread_state.gil_requested",
    "thread_state.current_exception",
    "thread_state.exc_state",
    "err_stackitem.exc_value",
    "interpreter_frame.size",
    "interpreter_frame.previous",
    "interpreter_frame.executable",
    "interpreter_frame.instr_ptr",
    "interpreter_frame.localsplus",
    "interpreter_frame.owner",
    "interpreter_frame.stackpointer",
    "interpreter_frame.tlbc_index",
    "code_object.size",
    "code_object.filename",
    "code_object.name",
    "code_object.qualname",
    "code_object.linetable",
    "code_object.firstlineno",
    "code_object.argcount",
    "code_object.localsplusnames",
    "code_object.localspluskinds",
    "code_object.co_code_adaptive",
    "code_object.co_tlbc",
    "pyobject.size",
    "pyobject.ob_type",
    "type_object.size",
    "type_object.tp_name",
    "type_object.tp_repr",
    "type_object.tp_flags",
    "type_object.tp_basicsize",
    "type_object.tp_dictoffset",
    "heap_type_object.size",
    "heap_type_object.ht_cached_keys",
    "tuple_object.size",
    "tuple_object.ob_item",
    "tuple_object.ob_size",
    "list_object.size",
    "list_object.ob_item",
    "list_object.ob_size",
    "set_object.size",
    "set_object.used",
    "set_object.table",
    "set_object.mask",
    "dict_object.size",
    "dict_object.ma_keys",
    "dict_object.ma_values",
    "float_object.size",
    "float_object.ob_fval",
    "long_object.size",
    "long_object.lv_tag",
    "long_object.ob_digit",
    "bytes_object.size",
    "bytes_object.ob_size",
    "bytes_object.ob_sval",
    "unicode_object.size",
    "unicode_object.state",
    "unicode_object.length",
    "unicode_object.asciiobject_size",
    "unicode_object.compactunicodeobject_size",
];

/// The known layouts, by minor version.
const LAYOUTS: [(Version, &[&str]); 3] = [
    (Version::new(3, 13), LAYOUT_3_13),
    (Version::new(3, 14), LAYOUT_3_14),
    (Version::new(3, 15), LAYOUT_3_15),
];

/// The layout of `_Py_DebugOffsets` of CPython `v` (3.13+; any micro version), as far as perfpy
/// reads it.
pub fn layout(v: Version) -> Option<&'static [&'static str]> {
    let minor = Version::new(v.major, v.minor);
    LAYOUTS.iter().find(|(l, _)| *l == minor).map(|(_, l)| *l)
}

/// Whether the walker takes this version's offsets from the target (3.13+).
pub fn from_target(v: Version) -> bool {
    v.at_least(3, 13)
}

/// The cookie `_Py_DebugOffsets` starts with.
pub const COOKIE: &[u8; 8] = b"xdebugpy";

/// Largest plausible size of a runtime or interpreter state (they embed big arrays), and of
/// every other structure: beyond it a table is corrupt.
const MAX_STATE: u64 = 64 << 20;
const MAX_STRUCT: u64 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("perfpy does not know the layout of CPython {}.{}'s _Py_DebugOffsets (3.13 – 3.15 are known; docs/python.md says how to add a version)", .0.major, .0.minor)]
    NoLayout(Version),
    #[error("_Py_DebugOffsets at the start of _PyRuntime could not be read ({0} bytes)")]
    Unreadable(usize),
    #[error("_Py_DebugOffsets is {0} bytes long, {1} are needed")]
    Short(usize, usize),
    #[error("_PyRuntime does not start with the cookie \"xdebugpy\": not a CPython 3.13+ runtime, or a wrong address")]
    Cookie,
    #[error("_Py_DebugOffsets says version {found:#x}, the interpreter file says {expected}")]
    Version { found: u64, expected: String },
    #[error("_Py_DebugOffsets: free_threaded is {0}, neither 0 nor 1")]
    FreeThreadedValue(u64),
    #[error("free-threaded CPython (a 't' build) whose _Py_DebugOffsets gives no offset of the thread-local bytecode (co_tlbc, tlbc_index): its line numbers cannot be read; use --inject-python")]
    FreeThreaded,
    #[error("_Py_DebugOffsets: {field} = {value} is out of range ({why})")]
    OutOfRange {
        field: &'static str,
        value: u64,
        why: &'static str,
    },
}

/// A checked `_Py_DebugOffsets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugTable {
    /// `PY_VERSION_HEX` of the target.
    pub version: u64,
    pub free_threaded: bool,
    pub offsets: Offsets,
}

/// Bytes to read at `_PyRuntime` for version `v`.
pub fn table_len(v: Version) -> Option<usize> {
    layout(v).map(|l| 8 + 8 * l.len())
}

/// Reads and checks the table at `runtime` (the address of `_PyRuntime`) in a process's memory.
pub fn read(mem: &dyn ReadMemory, runtime: u64, v: Version) -> Result<DebugTable, TableError> {
    let len = table_len(v).ok_or(TableError::NoLayout(v))?;
    let mut buf = vec![0u8; len];
    if !mem.read_all(runtime, &mut buf) {
        return Err(TableError::Unreadable(len));
    }
    parse(&buf, v)
}

struct Fields<'a> {
    bytes: &'a [u8],
    layout: &'static [&'static str],
}

impl Fields<'_> {
    fn get(&self, name: &'static str) -> Option<u64> {
        let i = self.layout.iter().position(|n| *n == name)?;
        let at = 8 + 8 * i;
        Some(u64::from_ne_bytes(
            self.bytes.get(at..at + 8)?.try_into().ok()?,
        ))
    }
    /// A field the layout of every known version has.
    fn must(&self, name: &'static str) -> u64 {
        self.get(name).unwrap_or(0)
    }
}

/// Checks `off + width <= size` for a field of a structure of `size` bytes.
fn inside(f: &Fields, field: &'static str, width: u64, size: u64) -> Result<i32, TableError> {
    let off = f.must(field);
    let fits = off.checked_add(width).is_some_and(|end| end <= size);
    if !fits {
        return Err(TableError::OutOfRange {
            field,
            value: off,
            why: "past the end of its structure",
        });
    }
    i32::try_from(off).map_err(|_| TableError::OutOfRange {
        field,
        value: off,
        why: "too large",
    })
}

fn size(f: &Fields, field: &'static str, max: u64) -> Result<u64, TableError> {
    let s = f.must(field);
    if s == 0 || s > max {
        return Err(TableError::OutOfRange {
            field,
            value: s,
            why: "not a plausible structure size",
        });
    }
    Ok(s)
}

/// Checks a table read from a CPython `v` process (at least `table_len(v)` bytes).
pub fn parse(bytes: &[u8], v: Version) -> Result<DebugTable, TableError> {
    let f = fields(bytes, v)?;
    let (version, free_threaded) = header(&f, v)?;
    let sizes = Sizes::read(&f)?;
    let objects = object_lengths(&f, &sizes)?;
    let code_tlbc = code_tlbc(&f, &sizes, v, free_threaded)?;
    Ok(DebugTable {
        version,
        free_threaded,
        offsets: offsets(&f, &sizes, objects, code_tlbc)?,
    })
}

/// The table's fields by the layout of version `v`, once its length and cookie are right.
fn fields(bytes: &[u8], v: Version) -> Result<Fields<'_>, TableError> {
    let layout = layout(v).ok_or(TableError::NoLayout(v))?;
    let need = 8 + 8 * layout.len();
    if bytes.len() < need {
        return Err(TableError::Short(bytes.len(), need));
    }
    if &bytes[..8] != COOKIE {
        return Err(TableError::Cookie);
    }
    Ok(Fields { bytes, layout })
}

/// `version` (the target's `PY_VERSION_HEX`, which must be of the minor version `v` the
/// interpreter file gives) and `free_threaded`.
fn header(f: &Fields, v: Version) -> Result<(u64, bool), TableError> {
    let version = f.must("version");
    if (version >> 24, (version >> 16) & 0xff) != (v.major as u64, v.minor as u64) {
        return Err(TableError::Version {
            found: version,
            expected: format!("{}.{}", v.major, v.minor),
        });
    }
    let ft = f.must("free_threaded");
    if ft > 1 {
        return Err(TableError::FreeThreadedValue(ft));
    }
    Ok((version, ft == 1))
}

/// The sizes of the structures the offsets are checked against.
struct Sizes {
    runtime: u64,
    interp: u64,
    tstate: u64,
    frame: u64,
    code: u64,
    bytes_obj: u64,
    /// `PyASCIIObject` and `PyCompactUnicodeObject`: where a str's characters start.
    ascii: u64,
    compact: u64,
}

impl Sizes {
    fn read(f: &Fields) -> Result<Sizes, TableError> {
        let unicode = size(f, "unicode_object.size", MAX_STRUCT)?;
        let ascii = size(f, "unicode_object.asciiobject_size", unicode)?;
        let compact = match f.get("unicode_object.compactunicodeobject_size") {
            Some(_) => size(f, "unicode_object.compactunicodeobject_size", unicode)?,
            // PyCompactUnicodeObject is PyASCIIObject then utf8_length and utf8 (3.13, 3.14).
            None => ascii + 16,
        };
        Ok(Sizes {
            runtime: size(f, "runtime_state.size", MAX_STATE)?,
            interp: size(f, "interpreter_state.size", MAX_STATE)?,
            tstate: size(f, "thread_state.size", MAX_STRUCT)?,
            frame: size(f, "interpreter_frame.size", MAX_STRUCT)?,
            code: size(f, "code_object.size", MAX_STRUCT)?,
            bytes_obj: size(f, "bytes_object.size", MAX_STRUCT)?,
            ascii,
            compact,
        })
    }
}

/// Where a str's length, a bytes' size and a bytes' data are.
struct ObjectLengths {
    unicode_length: i32,
    bytes_size: i32,
    ob_sval: i32,
}

fn object_lengths(f: &Fields, sizes: &Sizes) -> Result<ObjectLengths, TableError> {
    // A str's length and a bytes' size sit after the object header: 16 bytes in with the GIL,
    // further in a free-threaded build.
    let unicode_length = inside(f, "unicode_object.length", 8, sizes.ascii)?;
    let ob_sval = inside(f, "bytes_object.ob_sval", 1, sizes.bytes_obj)?;
    let bytes_size = inside(f, "bytes_object.ob_size", 8, ob_sval as u64)?;
    for (field, off) in [
        ("unicode_object.length", unicode_length),
        ("bytes_object.ob_size", bytes_size),
    ] {
        if off < 16 {
            return Err(TableError::OutOfRange {
                field,
                value: off as u64,
                why: "inside the object header",
            });
        }
    }
    Ok(ObjectLengths {
        unicode_length,
        bytes_size,
        ob_sval,
    })
}

/// `co_tlbc`, or -1. Free-threaded 3.14+: a frame's instr_ptr may point into the thread's own
/// copy of the bytecode (co_tlbc); without its offset the lines cannot be read. 3.13t has no
/// such copies.
fn code_tlbc(
    f: &Fields,
    sizes: &Sizes,
    v: Version,
    free_threaded: bool,
) -> Result<i32, TableError> {
    if !(free_threaded && v.at_least(3, 14)) {
        return Ok(-1);
    }
    if f.must("code_object.co_tlbc") == 0 || f.must("interpreter_frame.tlbc_index") == 0 {
        return Err(TableError::FreeThreaded);
    }
    inside(f, "interpreter_frame.tlbc_index", 4, sizes.frame)?;
    inside(f, "code_object.co_tlbc", 8, sizes.code)
}

/// The walker's offsets, each checked to lie inside its structure.
fn offsets(
    f: &Fields,
    sizes: &Sizes,
    objects: ObjectLengths,
    code_tlbc: i32,
) -> Result<Offsets, TableError> {
    let Sizes {
        runtime,
        interp,
        tstate,
        frame,
        code,
        ascii,
        compact,
        ..
    } = *sizes;
    Ok(Offsets {
        runtime_interp_head: inside(f, "runtime_state.interpreters_head", 8, runtime)?,
        interp_tstate_head: inside(f, "interpreter_state.threads_head", 8, interp)?,
        tstate_next: inside(f, "thread_state.next", 8, tstate)?,
        tstate_native_tid: inside(f, "thread_state.native_thread_id", 8, tstate)?,
        tstate_cframe: -1,
        tstate_current_frame: inside(f, "thread_state.current_frame", 8, tstate)?,
        frame_code: inside(f, "interpreter_frame.executable", 8, frame)?,
        frame_instr: inside(f, "interpreter_frame.instr_ptr", 8, frame)?,
        frame_previous: inside(f, "interpreter_frame.previous", 8, frame)?,
        frame_owner: inside(f, "interpreter_frame.owner", 1, frame)?,
        frame_is_entry: -1,
        // Not in the table. 3.13: FRAME_OWNED_BY_CSTACK = 3 marks the entry frame of a
        // C-level evaluation call; 3.14 and 3.15 mark it FRAME_OWNED_BY_INTERPRETER = 3 (3.14
        // renumbers CSTACK to 4, 3.15 removes it). Owners from 3 up are not Python frames.
        owned_by_cstack: 3,
        tstate_thread_id: inside(f, "thread_state.thread_id", 8, tstate)?,
        lasti_int: 0,
        frame_localsplus: -1,
        code_varnames: -1,
        code_name: inside(f, "code_object.name", 8, code)?,
        code_qualname: inside(f, "code_object.qualname", 8, code)?,
        code_filename: inside(f, "code_object.filename", 8, code)?,
        code_firstlineno: inside(f, "code_object.firstlineno", 4, code)?,
        code_linetable: inside(f, "code_object.linetable", 8, code)?,
        code_adaptive: inside(f, "code_object.co_code_adaptive", 2, code)?,
        unicode_ascii_data: i32::try_from(ascii).unwrap_or(i32::MAX),
        unicode_compact_data: i32::try_from(compact).unwrap_or(i32::MAX),
        unicode_state: inside(f, "unicode_object.state", 4, ascii)?,
        bytes_data: objects.ob_sval,
        unicode_length: objects.unicode_length,
        bytes_size: objects.bytes_size,
        code_tlbc,
        code_nlocals: -1,
        code_cellvars: -1,
        code_cell2arg: -1,
        cell2arg_entry: -1,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The first 1024 bytes of `_PyRuntime` of real interpreters (testdata/debug_offsets/make.sh).
    const FIXTURES: [(&str, Version, &[u8]); 4] = [
        (
            "pyenv-3.13",
            Version::new(3, 13),
            include_bytes!("../../testdata/debug_offsets/pyenv-3.13.bin"),
        ),
        (
            "debian-3.13",
            Version::new(3, 13),
            include_bytes!("../../testdata/debug_offsets/debian-3.13.bin"),
        ),
        (
            "debian-3.14",
            Version::new(3, 14),
            include_bytes!("../../testdata/debug_offsets/debian-3.14.bin"),
        ),
        (
            "debian-3.15",
            Version::new(3, 15),
            include_bytes!("../../testdata/debug_offsets/debian-3.15.bin"),
        ),
    ];

    fn index(v: Version, name: &str) -> usize {
        8 + 8 * layout(v).unwrap().iter().position(|n| *n == name).unwrap()
    }

    fn set(b: &mut [u8], v: Version, name: &str, value: u64) {
        let i = index(v, name);
        b[i..i + 8].copy_from_slice(&value.to_ne_bytes());
    }

    #[test]
    fn real_tables_of_every_installed_version() {
        for (what, v, bytes) in FIXTURES {
            let t = parse(bytes, v).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                (t.version >> 16) as u16,
                (v.major as u16) << 8 | v.minor as u16
            );
            assert!(!t.free_threaded);
            let o = t.offsets;
            // What every 3.13+ build with the GIL has, whatever moved around it.
            // 3.14 adds `stackpointer` before `owner`.
            let owner = if v.at_least(3, 14) { 74 } else { 70 };
            assert_eq!(
                (o.frame_code, o.frame_previous, o.frame_instr, o.frame_owner),
                (0, 8, 56, owner),
                "{what}"
            );
            assert_eq!(
                (o.unicode_ascii_data, o.unicode_compact_data, o.bytes_data),
                (40, 56, 32),
                "{what}"
            );
            assert_eq!(o.owned_by_cstack, 3);
            assert_eq!(o.tstate_cframe, -1);
        }
    }

    /// pyenv's 3.13 gives exactly the table perfpy had by hand for 3.13 (checked against its
    /// headers by tests/offsets.rs).
    #[test]
    fn pyenv_313_agrees_with_the_table_in_the_tree() {
        let t = parse(FIXTURES[0].2, Version::new(3, 13)).unwrap();
        assert_eq!(t.offsets, crate::offsets::V3_13);
    }

    #[test]
    fn corrupted_tables_are_refused() {
        for (what, v, real) in FIXTURES {
            let bad = |f: &dyn Fn(&mut Vec<u8>)| {
                let mut b = real.to_vec();
                f(&mut b);
                parse(&b, v)
            };
            assert_eq!(bad(&|b| b[0] = b'y'), Err(TableError::Cookie), "{what}");
            assert!(matches!(
                bad(&|b| set(b, v, "version", 0x030c_00f0)),
                Err(TableError::Version { .. })
            ));
            assert!(matches!(
                parse(real, Version::new(3, if v.minor == 13 { 14 } else { 13 })),
                Err(TableError::Version { .. }) | Err(TableError::Cookie)
            ));
            assert_eq!(
                bad(&|b| set(b, v, "free_threaded", 7)),
                Err(TableError::FreeThreadedValue(7))
            );
            assert_eq!(
                parse(&real[..table_len(v).unwrap() - 1], v),
                Err(TableError::Short(
                    table_len(v).unwrap() - 1,
                    table_len(v).unwrap()
                ))
            );
            assert_eq!(
                parse(real, Version::new(3, 12)),
                Err(TableError::NoLayout(Version::new(3, 12)))
            );
            // Every size: zero and huge.
            for size in [
                "runtime_state.size",
                "interpreter_state.size",
                "thread_state.size",
                "interpreter_frame.size",
                "code_object.size",
                "bytes_object.size",
                "unicode_object.size",
                "unicode_object.asciiobject_size",
            ] {
                for value in [0, u64::MAX, 1 << 40] {
                    assert!(
                        matches!(
                            bad(&|b| set(b, v, size, value)),
                            Err(TableError::OutOfRange { .. })
                        ),
                        "{what}: {size} = {value}"
                    );
                }
            }
            // Every offset used: past its structure, at the top of u64, beyond i32.
            for off in [
                "runtime_state.interpreters_head",
                "interpreter_state.threads_head",
                "thread_state.next",
                "thread_state.native_thread_id",
                "thread_state.current_frame",
                "thread_state.thread_id",
                "interpreter_frame.executable",
                "interpreter_frame.instr_ptr",
                "interpreter_frame.previous",
                "interpreter_frame.owner",
                "code_object.name",
                "code_object.qualname",
                "code_object.filename",
                "code_object.firstlineno",
                "code_object.linetable",
                "code_object.co_code_adaptive",
                "unicode_object.state",
                "unicode_object.length",
                "bytes_object.ob_size",
                "bytes_object.ob_sval",
            ] {
                for value in [1 << 20, u64::MAX, u64::MAX - 3, 1 << 33] {
                    assert!(
                        matches!(
                            bad(&|b| set(b, v, off, value)),
                            Err(TableError::OutOfRange { .. })
                        ),
                        "{what}: {off} = {value}"
                    );
                }
            }
        }
    }

    /// A free-threaded 3.14 table, synthetic (no 't' build is installed here): the larger object
    /// header of a 't' build (32 bytes) moves every object field 16 bytes on; `co_tlbc` and
    /// `tlbc_index` given. Accepted, with those offsets; without `co_tlbc`, refused.
    pub(crate) fn free_threaded_314() -> Vec<u8> {
        let v = Version::new(3, 14);
        let mut b = FIXTURES[2].2.to_vec();
        let get = |b: &[u8], name: &str| {
            let i = index(v, name);
            u64::from_ne_bytes(b[i..i + 8].try_into().unwrap())
        };
        set(&mut b, v, "free_threaded", 1);
        for name in [
            "code_object.size",
            "code_object.filename",
            "code_object.name",
            "code_object.qualname",
            "code_object.linetable",
            "code_object.firstlineno",
            "code_object.co_code_adaptive",
            "unicode_object.size",
            "unicode_object.state",
            "unicode_object.length",
            "unicode_object.asciiobject_size",
            "bytes_object.size",
            "bytes_object.ob_size",
            "bytes_object.ob_sval",
        ] {
            let x = get(&b, name) + 16;
            set(&mut b, v, name, x);
        }
        let code_size = get(&b, "code_object.size");
        set(&mut b, v, "code_object.size", code_size + 8);
        set(&mut b, v, "code_object.co_tlbc", code_size);
        let frame_size = get(&b, "interpreter_frame.size");
        set(&mut b, v, "interpreter_frame.size", frame_size + 8);
        set(&mut b, v, "interpreter_frame.tlbc_index", 72);
        b
    }

    #[test]
    fn free_threaded_table() {
        let v = Version::new(3, 14);
        let b = free_threaded_314();
        let t = parse(&b, v).unwrap();
        assert!(t.free_threaded);
        let o = t.offsets;
        assert_eq!((o.unicode_length, o.bytes_size), (32, 32));
        assert_eq!((o.unicode_ascii_data, o.unicode_compact_data), (56, 72));
        assert!(o.code_tlbc > o.code_adaptive);
        // 3.14t without the thread-local bytecode's offsets: refused, with that reason.
        let mut bad = b.clone();
        set(&mut bad, v, "code_object.co_tlbc", 0);
        let e = parse(&bad, v).unwrap_err();
        assert_eq!(e, TableError::FreeThreaded);
        assert!(e.to_string().contains("free-threaded"));
        // A length inside the header: refused.
        let mut bad = b.clone();
        set(&mut bad, v, "unicode_object.length", 8);
        assert!(matches!(parse(&bad, v), Err(TableError::OutOfRange { .. })));
    }

    proptest::proptest! {
        /// Any bytes flipped anywhere in a real table: refused, or accepted with every offset
        /// inside its structure; never a panic.
        #[test]
        fn flipped_bytes_never_panic(which in 0usize..4, flips in proptest::collection::vec((0usize..1024, proptest::prelude::any::<u8>()), 1..8)) {
            let (_, v, real) = FIXTURES[which];
            let mut b = real.to_vec();
            for (i, x) in flips {
                b[i] ^= x;
            }
            if let Ok(t) = parse(&b, v) {
                let f = Fields { bytes: &b, layout: layout(v).unwrap() };
                let o = t.offsets;
                proptest::prop_assert!((o.tstate_current_frame as u64) + 8 <= f.must("thread_state.size"));
                proptest::prop_assert!((o.frame_owner as u64) < f.must("interpreter_frame.size"));
                proptest::prop_assert!((o.code_linetable as u64) + 8 <= f.must("code_object.size"));
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024), minor in 10u8..20) {
            let _ = parse(&bytes, Version::new(3, minor));
        }
    }
}
