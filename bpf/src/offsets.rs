//! Per-version CPython offsets, checked against each version's own headers by
//! `tests/offsets.rs` (which compiles `tests/offsets.c` with `offsetof`).

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
}

/// CPython 3.11.
pub const V3_11: Offsets = Offsets {
    runtime_interp_head: 40,
    interp_tstate_head: 16,
    tstate_next: 8,
    tstate_native_tid: 160,
    tstate_cframe: 56,
    tstate_current_frame: 8,
    frame_code: 32,
    frame_instr: 56,
    frame_previous: 48,
    frame_owner: 69,
    frame_is_entry: 68,
    owned_by_cstack: -1,
    code_name: 120,
    code_qualname: 128,
    code_filename: 112,
    code_firstlineno: 72,
    code_linetable: 136,
    code_adaptive: 184,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    unicode_state: 32,
    bytes_data: 32,
};

/// CPython 3.12.
pub const V3_12: Offsets = Offsets {
    runtime_interp_head: 40,
    interp_tstate_head: 72,
    tstate_next: 8,
    tstate_native_tid: 144,
    tstate_cframe: 56,
    tstate_current_frame: 0,
    frame_code: 0,
    frame_instr: 56,
    frame_previous: 8,
    frame_owner: 70,
    frame_is_entry: -1,
    owned_by_cstack: 3,
    code_name: 120,
    code_qualname: 128,
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    code_adaptive: 192,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    unicode_state: 32,
    bytes_data: 32,
};

/// CPython 3.13.
pub const V3_13: Offsets = Offsets {
    runtime_interp_head: 632,
    interp_tstate_head: 7344,
    tstate_next: 8,
    tstate_native_tid: 160,
    tstate_cframe: -1,
    tstate_current_frame: 72,
    frame_code: 0,
    frame_instr: 56,
    frame_previous: 8,
    frame_owner: 70,
    frame_is_entry: -1,
    owned_by_cstack: 3,
    code_name: 120,
    code_qualname: 128,
    code_filename: 112,
    code_firstlineno: 68,
    code_linetable: 136,
    code_adaptive: 200,
    unicode_ascii_data: 40,
    unicode_compact_data: 56,
    unicode_state: 32,
    bytes_data: 32,
};

impl Offsets {
    pub fn for_version(v: (u8, u8)) -> Option<Offsets> {
        match v {
            (3, 11) => Some(V3_11),
            (3, 12) => Some(V3_12),
            (3, 13) => Some(V3_13),
            _ => None,
        }
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
        ]
    }
}
