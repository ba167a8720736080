//! Per-version CPython offsets: one small file per minor version (`offsets/vX_Y.rs`), checked
//! against each version's own headers by `tests/offsets.rs`, which compiles `tests/offsets.c`
//! (3.11+) and `tests/offsets_old.c` (2.7, 3.6 – 3.10) with `offsetof` and compares.

mod v2_7;
mod v3_10;
mod v3_11;
mod v3_12;
mod v3_13;
mod v3_6;
mod v3_7;
mod v3_8;
mod v3_9;

pub use v2_7::V2_7;
pub use v3_10::V3_10;
pub use v3_11::V3_11;
pub use v3_12::V3_12;
pub use v3_13::V3_13;
pub use v3_6::V3_6;
pub use v3_7::V3_7;
pub use v3_8::V3_8;
pub use v3_9::V3_9;

use perfpy_process::Version;

/// The hand-written tables, by minor version.
const TABLES: [(Version, Offsets); 8] = [
    (Version::new(2, 7), V2_7),
    (Version::new(3, 6), V3_6),
    (Version::new(3, 7), V3_7),
    (Version::new(3, 8), V3_8),
    (Version::new(3, 9), V3_9),
    (Version::new(3, 10), V3_10),
    (Version::new(3, 11), V3_11),
    (Version::new(3, 12), V3_12),
];

/// Offsets the walker and the code reader need (bytes; -1 where a field does not exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub runtime_interp_head: i32,
    pub interp_tstate_head: i32,
    pub tstate_next: i32,
    pub tstate_native_tid: i32,
    pub tstate_cframe: i32,
    pub tstate_current_frame: i32,
    pub frame_code: i32,
    pub frame_instr: i32,
    pub frame_previous: i32,
    pub frame_owner: i32,
    pub frame_is_entry: i32,
    pub owned_by_cstack: i32,
    /// `thread_id` (a pthread_t, the thread's fsbase): matched where `native_thread_id` is -1.
    pub tstate_thread_id: i32,
    /// 1 where frames are PyFrameObjects with an int `f_lasti` (≤ 3.10).
    pub lasti_int: i32,
    /// `f_localsplus` (≤ 3.10): the first local is `self` / `cls` in methods.
    pub frame_localsplus: i32,
    /// `co_varnames` (≤ 3.10): is the first local named `self` or `cls`?
    pub code_varnames: i32,
    pub code_name: i32,
    pub code_qualname: i32,
    pub code_filename: i32,
    pub code_firstlineno: i32,
    pub code_linetable: i32,
    pub code_adaptive: i32,
    pub unicode_ascii_data: i32,
    pub unicode_compact_data: i32,
    pub unicode_state: i32,
    pub bytes_data: i32,
    /// `PyASCIIObject.length` (2.7: `ob_size`) and `PyBytesObject.ob_size`: 16 with the GIL,
    /// further in a free-threaded build, whose object header is larger.
    pub unicode_length: i32,
    pub bytes_size: i32,
    /// `co_tlbc` (free-threaded 3.14+): the code's thread-local bytecode copies, which a frame's
    /// `instr_ptr` may point into; -1 where absent.
    pub code_tlbc: i32,
    /// 3.6 – 3.10: where a method's `self` is when a closure captures it. The interpreter moves
    /// an argument that is a cell variable into a new cell at frame setup and clears its local
    /// slot: cell `i` is local `co_nlocals + i`, and `co_cell2arg[i]` (entries of
    /// `cell2arg_entry` bytes; `co_cellvars` says how many) is the argument it holds. -1 where
    /// absent (2.7 keeps the argument in its slot; 3.11+ has `co_qualname`).
    pub code_nlocals: i32,
    pub code_cellvars: i32,
    pub code_cell2arg: i32,
    pub cell2arg_entry: i32,
}

impl Offsets {
    /// The hand-written table of 2.7 and 3.6 – 3.12. From 3.13 on the walker reads the target's
    /// own `_Py_DebugOffsets` ([`crate::debug_offsets`]); `V3_13` stays in the tree as the
    /// reference the table read from a 3.13 process is checked against.
    /// Any micro version of a minor version has its table.
    pub fn for_version(v: Version) -> Option<Offsets> {
        let minor = Version::new(v.major, v.minor);
        TABLES.iter().find(|(t, _)| *t == minor).map(|(_, o)| *o)
    }

    /// `(name, value)` of every field, in the order `tests/offsets.c` prints them.
    pub fn fields(&self) -> Vec<(&'static str, i32)> {
        vec![
            ("runtime_interp_head", self.runtime_interp_head),
            ("interp_tstate_head", self.interp_tstate_head),
            ("tstate_next", self.tstate_next),
            ("tstate_native_tid", self.tstate_native_tid),
            ("tstate_cframe", self.tstate_cframe),
            ("tstate_current_frame", self.tstate_current_frame),
            ("frame_code", self.frame_code),
            ("frame_instr", self.frame_instr),
            ("frame_previous", self.frame_previous),
            ("frame_owner", self.frame_owner),
            ("frame_is_entry", self.frame_is_entry),
            ("owned_by_cstack", self.owned_by_cstack),
            ("tstate_thread_id", self.tstate_thread_id),
            ("tstate_frame", self.tstate_current_frame),
            ("frame_back", self.frame_previous),
            ("frame_lasti", self.frame_instr),
            ("frame_localsplus", self.frame_localsplus),
            ("code_varnames", self.code_varnames),
            ("tuple_items", 24),
            ("type_name", 24),
            ("code_name", self.code_name),
            ("code_qualname", self.code_qualname),
            ("code_filename", self.code_filename),
            ("code_firstlineno", self.code_firstlineno),
            ("code_linetable", self.code_linetable),
            ("code_adaptive", self.code_adaptive),
            ("unicode_ascii_data", self.unicode_ascii_data),
            ("unicode_compact_data", self.unicode_compact_data),
            ("unicode_state", self.unicode_state),
            ("bytes_data", self.bytes_data),
            ("code_nlocals", self.code_nlocals),
            ("code_cellvars", self.code_cellvars),
            ("code_cell2arg", self.code_cell2arg),
            ("cell2arg_entry", self.cell2arg_entry),
        ]
    }
}
