//! `perfpy dump --locals`: each Python frame's local variables (arguments first), read from the
//! target's memory, never by running code in it: names from the code object, values from the
//! frame's `localsplus`, and for each value its type and a bounded representation of ints,
//! floats, strings, bytes, None and bools, the length of lists, tuples, dicts and sets.
//!
//! Where the layouts come from: ≤ 3.10 the walker's tables (`f_localsplus`, `co_varnames`);
//! 3.11 and 3.12 the three offsets below, checked against each version's headers by
//! `tests/it/dump.rs` (`testdata/locals_offsets.c`); 3.13+ the target's `_Py_DebugOffsets`.

use perfpy_bpf::code::{read_unicode, type_name};
use perfpy_bpf::Offsets;
use perfpy_process::{LiveMemory, ReadMemory};

/// Most locals shown per frame, and characters of a value's representation.
const MAX_LOCALS: u64 = 256;
const MAX_REPR: usize = 80;

/// 3.11 and 3.12 (same values in both): `_PyInterpreterFrame.localsplus`,
/// `PyCodeObject.co_localsplusnames`, `PyCodeObject.co_localspluskinds`.
pub const LOCALS_3_11: (u64, u64, u64) = (72, 96, 104);

/// Where a version keeps a frame's locals and their names.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Offset of the locals array in a frame.
    frame_locals: u64,
    /// Offset of the names tuple in a code object (`co_varnames` or `co_localsplusnames`).
    code_names: u64,
    /// Offset of `co_localspluskinds` (3.11+), whose 0x10 (hidden) entries are skipped and
    /// 0x40/0x80 (cell, free) entries hold a cell.
    code_kinds: Option<u64>,
    /// 3.14+: entries are `_PyStackRef`s (tag bits to mask).
    tagged: bool,
    version: (u8, u8),
    /// Offset of a tuple's items: 24, 32 from 3.14 (which caches the tuple's hash before them).
    tuple_items: u64,
}

impl Layout {
    /// `debug_field` reads a field of the target's `_Py_DebugOffsets` (3.13+).
    pub fn new(
        version: (u8, u8),
        o: &Offsets,
        debug_field: &dyn Fn(&str) -> Option<u64>,
    ) -> Option<Layout> {
        let pos = |v: i32| u64::try_from(v).ok();
        match version {
            (2, _) | (3, 0..=10) => Some(Layout {
                frame_locals: pos(o.frame_localsplus)?,
                code_names: pos(o.code_varnames)?,
                code_kinds: None,
                tagged: false,
                version,
                tuple_items: 24,
            }),
            (3, 11 | 12) => Some(Layout {
                frame_locals: LOCALS_3_11.0,
                code_names: LOCALS_3_11.1,
                code_kinds: Some(LOCALS_3_11.2),
                tagged: false,
                version,
                tuple_items: 24,
            }),
            _ => {
                // Offsets from another process: small, or refused.
                let small = |v: u64| (v < 4096).then_some(v);
                Some(Layout {
                    frame_locals: small(debug_field("interpreter_frame.localsplus")?)?,
                    code_names: small(debug_field("code_object.localsplusnames")?)?,
                    code_kinds: Some(small(debug_field("code_object.localspluskinds")?)?),
                    tagged: version >= (3, 14),
                    version,
                    tuple_items: if version >= (3, 14) {
                        small(debug_field("tuple_object.ob_item")?)?
                    } else {
                        24
                    },
                })
            }
        }
    }
}

pub struct Local {
    pub name: String,
    pub type_name: String,
    pub repr: String,
}

fn u64_at(pid: u32, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    LiveMemory(pid)
        .read_all(addr, &mut b)
        .then(|| u64::from_ne_bytes(b))
}

fn i64_at(pid: u32, addr: u64) -> Option<i64> {
    u64_at(pid, addr).map(|v| v as i64)
}

/// The locals of the frame at `frame` running code object `code`.
pub fn locals(pid: u32, o: &Offsets, l: &Layout, frame: u64, code: u64) -> Vec<Local> {
    let mut out = Vec::new();
    let Some(names) = u64_at(pid, code + l.code_names).filter(|n| *n != 0) else {
        return out;
    };
    // A tuple: ob_size at 16, then its items.
    let n = i64_at(pid, names + 16)
        .unwrap_or(0)
        .clamp(0, MAX_LOCALS as i64) as u64;
    let kinds = l
        .code_kinds
        .and_then(|k| u64_at(pid, code + k))
        .and_then(|b| {
            let mut v = vec![0u8; n as usize];
            // A bytes object: its data at `bytes_data`.
            LiveMemory(pid)
                .read_all(b + o.bytes_data as u64, &mut v)
                .then_some(v)
        });
    for i in 0..n {
        let kind = kinds.as_ref().map_or(0, |k| k[i as usize]);
        if kind & 0x10 != 0 {
            continue;
        }
        let Some(name) = u64_at(pid, names + l.tuple_items + 8 * i)
            .and_then(|s| read_unicode(&LiveMemory(pid), o, s))
        else {
            continue;
        };
        let Some(mut v) = u64_at(pid, frame + l.frame_locals + 8 * i) else {
            continue;
        };
        if l.tagged {
            if v & 3 == 3 {
                out.push(Local {
                    name,
                    type_name: "int".into(),
                    repr: format!("{}", (v as i64) >> 2),
                });
                continue;
            }
            v &= !3;
        }
        if v == 0 {
            continue; // not bound yet
        }
        if kind & 0xc0 != 0 {
            // A cell: its content at ob_ref (16). A cell not made yet holds the value itself.
            if type_of(pid, v).as_deref() == Some("cell") {
                match u64_at(pid, v + 16) {
                    Some(c) if c != 0 => v = c,
                    _ => continue,
                }
            }
        }
        let ty = type_of(pid, v).unwrap_or_else(|| "?".into());
        let repr = repr(pid, o, l.version, &ty, v).unwrap_or_else(|| format!("<{ty} at {v:#x}>"));
        out.push(Local {
            name,
            type_name: ty,
            repr,
        });
    }
    out
}

fn type_of(pid: u32, obj: u64) -> Option<String> {
    let ty = u64_at(pid, obj + 8)?;
    type_name(&LiveMemory(pid), ty)
}

fn bounded(mut s: String) -> String {
    if s.chars().count() > MAX_REPR {
        s = s.chars().take(MAX_REPR).collect::<String>() + "...";
    }
    s
}

/// A bounded `repr`-like text of a value of a simple type; None for other types.
fn repr(pid: u32, o: &Offsets, version: (u8, u8), ty: &str, v: u64) -> Option<String> {
    let len_at = |off: u64| i64_at(pid, v + off);
    Some(match ty {
        "NoneType" => "None".into(),
        "float" => {
            let mut b = [0u8; 8];
            LiveMemory(pid).read_all(v + 16, &mut b).then_some(())?;
            format!("{:?}", f64::from_ne_bytes(b))
        }
        "int" | "long" | "bool" => {
            let n = int_value(pid, version, ty, v)?;
            match (ty, n) {
                ("bool", 0) => "False".into(),
                ("bool", _) => "True".into(),
                _ => n.to_string(),
            }
        }
        "str" => {
            let s: String = read_unicode(&LiveMemory(pid), o, v)?
                .chars()
                .take(MAX_REPR + 1)
                .collect();
            let d = format!("{s:?}");
            format!("'{}'", bounded(d[1..d.len() - 1].to_string()))
        }
        "bytes" => {
            let n = len_at(o.bytes_size as u64)?;
            let take = n.clamp(0, MAX_REPR as i64) as usize;
            let mut b = vec![0u8; take];
            LiveMemory(pid)
                .read_all(v + o.bytes_data as u64, &mut b)
                .then_some(())?;
            let mut s: String = b
                .iter()
                .flat_map(|c| std::ascii::escape_default(*c))
                .map(char::from)
                .collect();
            if (take as i64) < n {
                s.push_str("...");
            }
            format!("b'{s}'")
        }
        "list" | "tuple" => format!("<{ty} of length {}>", len_at(16)?),
        "dict" => format!("<dict of length {}>", len_at(16)?),
        "set" | "frozenset" => format!("<{ty} of length {}>", len_at(24)?),
        _ => return None,
    })
}

/// An int's value when it fits in an i64 (2.7's `int`: `ob_ival`; 3.12+: `lv_tag`, digits
/// from 24; before: `ob_size`, digits from 24; 30-bit digits).
fn int_value(pid: u32, version: (u8, u8), ty: &str, v: u64) -> Option<i64> {
    if version.0 == 2 && ty != "long" {
        return i64_at(pid, v + 16); // PyIntObject's ob_ival
    }
    let (ndigits, negative) = if version >= (3, 12) {
        let tag = u64_at(pid, v + 16)?;
        (tag >> 3, tag & 3 == 2)
    } else {
        let size = i64_at(pid, v + 16)?;
        (size.unsigned_abs(), size < 0)
    };
    if ndigits > 2 {
        return None;
    }
    let mut val: i64 = 0;
    for i in (0..ndigits).rev() {
        let mut b = [0u8; 4];
        LiveMemory(pid)
            .read_all(v + 24 + 4 * i, &mut b)
            .then_some(())?;
        val = (val << 30) | (u32::from_ne_bytes(b) & 0x3fff_ffff) as i64;
    }
    Some(if negative { -val } else { val })
}
