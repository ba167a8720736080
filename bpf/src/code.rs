//! Code objects to names, files and lines, read once per (process, code object) from the
//! target's memory and cached.

use std::collections::HashMap;

use perfpy_process::Version;

use crate::{Offsets, PyFrameRef};

pub use perfpy_process::ReadMemory;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrameInfo {
    pub qualname: String,
    pub filename: String,
    pub line: u32,
    pub first_line: u32,
}

struct Code {
    /// `co_name ^ rotl(co_filename, 1)` of the pointers when read ([`identity`]): a code
    /// object freed and another allocated at the same address has other ones.
    identity: u64,
    qualname: String,
    /// ≤ 3.10: the first local is `self` (1) or `cls` (2): the class names the method.
    self_kind: u8,
    filename: String,
    first_line: i32,
    linetable: Vec<u8>,
    /// Absolute address of the first instruction.
    start: u64,
}

const MAX_STRING: u64 = 4096;
const MAX_TABLE: u64 = 1 << 20;

/// What a frame whose code object was replaced before it could be read is named: never the
/// name of the object that took its address.
pub const UNREADABLE: &str = "[unreadable code object]";

#[derive(Default)]
pub struct CodeReader {
    /// (pid, address, identity) → the code object: an address reused by another code object
    /// is another entry, so that late records of the first one still find it.
    cache: HashMap<(u32, u64, u64), std::rc::Rc<Code>>,
    /// (pid, type object) → its name.
    types: HashMap<(u32, u64), Option<String>>,
}

/// The identity of a code object as the walker computes it at the sample, from its `co_name`
/// and `co_filename` pointers (both interned strings, alive as long as the code object).
pub fn identity(name: u64, file: u64) -> u64 {
    name ^ file.rotate_left(1)
}

/// `tp_name` of a type object: a C string; for builtin types `module.Name`, keep `Name`.
pub fn type_name(m: &dyn ReadMemory, ty: u64) -> Option<String> {
    type_name_at(m, ty, 24)
}

/// `tp_name` at `at` in the type object (after its `PyVarObject` header).
fn type_name_at(m: &dyn ReadMemory, ty: u64, at: i32) -> Option<String> {
    let p = u64_at(m, field(ty, at)?)?;
    let mut buf = [0u8; 128];
    // Read what is readable: the name may sit near the end of a mapping.
    let mut n = buf.len();
    while n >= 8 && !m.read_all(p, &mut buf[..n]) {
        n /= 2;
    }
    let s = &buf[..n];
    let end = s.iter().position(|&c| c == 0)?;
    let name = std::str::from_utf8(&s[..end]).ok()?;
    let short = name.rsplit('.').next().unwrap_or(name);
    (!short.is_empty()).then(|| short.to_string())
}

/// 2.7: `cl_name` of an old-style class (`class C:`), a `classobj`: its instances' type is
/// `instance` (the class hangs off each instance, `in_class`), and a class is no type.
/// PyClassObject: head (16), cl_bases, cl_dict, cl_name; PyStringObject: head (16), ob_size,
/// ob_shash, ob_sstate (4), ob_sval.
fn old_class_name(m: &dyn ReadMemory, class: u64) -> Option<String> {
    let s = u64_at(m, field(class, 32)?)?;
    let len = u64_at(m, field(s, 16)?)?;
    if !(1..=256).contains(&len) {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    m.read_all(field(s, 36)?, &mut buf).then_some(())?;
    String::from_utf8(buf).ok()
}

/// The address of a field at `off` from `base`: none past the end of the address space (a
/// garbage pointer near 2^64 would otherwise overflow).
fn field(base: u64, off: i32) -> Option<u64> {
    base.checked_add_signed(off.into())
}

fn u64_at(m: &dyn ReadMemory, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    m.read_all(addr, &mut b).then(|| u64::from_ne_bytes(b))
}

fn i32_at(m: &dyn ReadMemory, addr: u64) -> Option<i32> {
    let mut b = [0u8; 4];
    m.read_all(addr, &mut b).then(|| i32::from_ne_bytes(b))
}

/// Reads a `str` object (compact ASCII or compact UCS-1/2/4; a byte string on 2.7), at most
/// 4096 characters. Also used by `perfpy dump --locals`.
pub fn read_unicode(m: &dyn ReadMemory, o: &Offsets, obj: u64) -> Option<String> {
    let len = u64_at(m, field(obj, o.unicode_length)?)?;
    if o.unicode_state < 0 {
        // 2.7: PyStringObject, bytes at ob_sval.
        if len > MAX_STRING {
            return None;
        }
        let mut buf = vec![0u8; len as usize];
        m.read_all(field(obj, o.unicode_ascii_data)?, &mut buf)
            .then_some(())?;
        return Some(String::from_utf8_lossy(&buf).into_owned());
    }
    let state = i32_at(m, field(obj, o.unicode_state)?)? as u32;
    let kind = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !compact || len > MAX_STRING || !(1..=4).contains(&kind) {
        return None;
    }
    let data = field(
        obj,
        if ascii {
            o.unicode_ascii_data
        } else {
            o.unicode_compact_data
        },
    )?;
    let mut buf = vec![0u8; (len * kind as u64) as usize];
    if !m.read_all(data, &mut buf) {
        return None;
    }
    Some(match kind {
        1 => buf.iter().map(|&b| b as char).collect(),
        2 => buf
            .chunks_exact(2)
            .map(|c| char::from_u32(u16::from_ne_bytes([c[0], c[1]]) as u32).unwrap_or('?'))
            .collect(),
        _ => buf
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('?'))
            .collect(),
    })
}

fn read_bytes(m: &dyn ReadMemory, o: &Offsets, obj: u64) -> Option<Vec<u8>> {
    let len = u64_at(m, field(obj, o.bytes_size)?)?;
    if len > MAX_TABLE {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    m.read_all(field(obj, o.bytes_data)?, &mut buf)
        .then_some(buf)
}

/// Reads the code object at `code`. `is(obj, names)`: whether `obj`'s type is named one of
/// `names` (memory reused by other objects must not be read as a code object or a string).
fn read_code(
    m: &dyn ReadMemory,
    o: &Offsets,
    code: u64,
    is: &mut dyn FnMut(u64, &[&str]) -> bool,
) -> Option<Code> {
    let p = |off: i32| u64_at(m, field(code, off)?);
    if !is(code, &["code"]) {
        return None;
    }
    let mut string = |obj: u64| is(obj, &["str"]).then(|| read_unicode(m, o, obj))?;
    // Before 3.11 there is no co_qualname: the name.
    let qualname = string(p(if o.code_qualname >= 0 {
        o.code_qualname
    } else {
        o.code_name
    })?)?;
    let filename = string(p(o.code_filename)?)?;
    let first_line = i32_at(m, field(code, o.code_firstlineno)?)?;
    // 2.7's co_lnotab is a byte string, `str`.
    let linetable = p(o.code_linetable)
        .filter(|&t| is(t, &["bytes", "str"]))
        .and_then(|t| read_bytes(m, o, t))
        .unwrap_or_default();
    let self_kind = if o.code_varnames >= 0 {
        let first = p(o.code_varnames)
            .and_then(|t| (u64_at(m, field(t, 16)?)? > 0).then_some(t))
            .and_then(|t| u64_at(m, field(t, 24)?))
            .and_then(|n| read_unicode(m, o, n));
        match first.as_deref() {
            Some("self") => 1,
            Some("cls") => 2,
            _ => 0,
        }
    } else {
        0
    };
    Some(Code {
        identity: identity(p(o.code_name)?, p(o.code_filename)?),
        qualname,
        self_kind,
        filename,
        first_line,
        linetable,
        start: if o.code_adaptive >= 0 {
            field(code, o.code_adaptive)?
        } else {
            0
        },
    })
}

/// Free-threaded 3.14+: the start of the copy of the bytecode `instr` runs in. `co_tlbc` is a
/// `_PyCodeArray` (`Py_ssize_t size; char *entries[]`, entry 0 being `co_code_adaptive`, the
/// others each thread's own copy): the nearest entry at or below `instr`.
fn tlbc_base(m: &dyn ReadMemory, o: &Offsets, code: u64, instr: u64) -> Option<u64> {
    const MAX_COPIES: u64 = 1024;
    let arr = u64_at(m, field(code, o.code_tlbc)?)?;
    let n = u64_at(m, arr)?;
    if n == 0 || n > MAX_COPIES {
        return None;
    }
    let mut buf = vec![0u8; n as usize * 8];
    if !m.read_all(arr.checked_add(8)?, &mut buf) {
        return None;
    }
    buf.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .filter(|&e| e != 0 && e <= instr)
        .max()
}

fn varint(t: &[u8], i: &mut usize) -> u32 {
    let mut b = *t.get(*i).unwrap_or(&0) as u32;
    *i += 1;
    let mut v = b & 63;
    let mut shift = 6;
    while b & 64 != 0 && shift < 32 {
        b = *t.get(*i).unwrap_or(&0) as u32;
        *i += 1;
        v |= (b & 63) << shift;
        shift += 6;
    }
    v
}

fn svarint(t: &[u8], i: &mut usize) -> i32 {
    let v = varint(t, i);
    if v & 1 == 1 {
        -((v >> 1) as i32)
    } else {
        (v >> 1) as i32
    }
}

/// The line at byte offset `lasti` in a `co_lnotab` (2.7 – 3.9): pairs of (byte increment,
/// line increment), the line increment signed from 3.6 on.
pub fn line_of_lnotab(table: &[u8], first_line: i32, lasti: u64, signed: bool) -> i32 {
    let mut line = first_line;
    let mut addr = 0u64;
    for pair in table.chunks_exact(2) {
        addr += pair[0] as u64;
        if addr > lasti {
            break;
        }
        // Saturating: a garbage first line or table must not overflow.
        line = line.saturating_add(if signed {
            pair[1] as i8 as i32
        } else {
            pair[1] as i32
        });
    }
    line
}

/// The line at byte offset `offset` in a 3.10 `co_linetable`: pairs of (byte delta, line delta),
/// a line delta of -128 meaning no line.
pub fn line_of_310(table: &[u8], first_line: i32, offset: u64) -> i32 {
    let mut line = first_line;
    let mut end = 0u64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end = start + pair[0] as u64;
        let ld = pair[1] as i8;
        if ld == -128 {
            continue;
        }
        line = line.saturating_add(ld as i32);
        if start <= offset && offset < end {
            return line;
        }
    }
    line
}

/// The line of code unit `unit` in a 3.11+ location table (`Objects/locations.md`).
pub fn line_of(table: &[u8], first_line: i32, unit: u64) -> i32 {
    let mut line = first_line;
    let mut addr = 0u64;
    let mut i = 0usize;
    while i < table.len() {
        let b = table[i];
        i += 1;
        if b & 0x80 == 0 {
            continue;
        }
        let code = (b >> 3) & 15;
        let len = (b & 7) as u64 + 1;
        match code {
            15 => {}
            14 => {
                line = line.saturating_add(svarint(table, &mut i));
                varint(table, &mut i);
                varint(table, &mut i);
                varint(table, &mut i);
            }
            13 => line = line.saturating_add(svarint(table, &mut i)),
            10..=12 => {
                line = line.saturating_add((code - 10) as i32);
                i += 2;
            }
            _ => i += 1,
        }
        if unit < addr + len {
            return line;
        }
        addr += len;
    }
    line
}

/// The line frame `f` is at. 3.11/3.12 point at the last instruction started (prev_instr),
/// 3.13 at the current one; before 3.11 the frame holds f_lasti, in bytes (≤ 3.9) or code units
/// (3.10).
fn line(mem: &dyn ReadMemory, o: &Offsets, version: Version, code: &Code, f: &PyFrameRef) -> i32 {
    if version.at_least(3, 11) {
        let start = if o.code_tlbc >= 0 {
            tlbc_base(mem, o, f.code, f.instr).unwrap_or(code.start)
        } else {
            code.start
        };
        return if f.instr >= start {
            line_of(&code.linetable, code.first_line, (f.instr - start) / 2)
        } else {
            code.first_line
        };
    }
    let lasti = f.instr as i64;
    if lasti < 0 {
        code.first_line
    } else if version.at_least(3, 10) {
        line_of_310(&code.linetable, code.first_line, lasti as u64 * 2)
    } else {
        line_of_lnotab(
            &code.linetable,
            code.first_line,
            lasti as u64,
            version.major >= 3,
        )
    }
}

impl CodeReader {
    /// Names a frame of process `pid`. `None` when the code object cannot be read; named
    /// [`UNREADABLE`] when the address holds another code object than the one the walker saw.
    pub fn resolve(
        &mut self,
        mem: &dyn ReadMemory,
        pid: u32,
        o: &Offsets,
        version: Version,
        f: &PyFrameRef,
    ) -> Option<PyFrameInfo> {
        if f.code == 0 {
            return None;
        }
        let code = self.code(mem, pid, o, f)?;
        if f.ident != 0 && code.identity != f.ident {
            // Freed and replaced since the sample: its name is gone.
            return Some(PyFrameInfo {
                qualname: UNREADABLE.into(),
                filename: "[unknown]".into(),
                line: 0,
                first_line: 0,
            });
        }
        let line = line(mem, o, version, &code, f);
        let qualname = self.qualname(mem, pid, version, &code, f);
        Some(PyFrameInfo {
            qualname,
            filename: code.filename.clone(),
            line: line.max(0) as u32,
            first_line: code.first_line.max(0) as u32,
        })
    }

    /// The code object of frame `f`, read once per process, address and identity: the one the
    /// walker saw (`f.ident`) if it was read while alive, else what the address holds now
    /// (cached under its own identity; the caller compares). Frames not from the walker
    /// (`ident` 0: `perfpy dump` reads a live frame) take what the address holds.
    fn code(
        &mut self,
        mem: &dyn ReadMemory,
        pid: u32,
        o: &Offsets,
        f: &PyFrameRef,
    ) -> Option<std::rc::Rc<Code>> {
        let ident = if f.ident != 0 {
            f.ident
        } else {
            let p = |off: i32| u64_at(mem, field(f.code, off)?);
            identity(p(o.code_name)?, p(o.code_filename)?)
        };
        if let Some(c) = self.cache.get(&(pid, f.code, ident)) {
            return Some(c.clone());
        }
        // A failure is not cached: the object may be readable at the next sample.
        let c = std::rc::Rc::new(read_code(mem, o, f.code, &mut |obj, names| {
            self.is_a(mem, pid, o, obj, names)
        })?);
        self.cache.insert((pid, f.code, c.identity), c.clone());
        Some(c)
    }

    /// Whether the type of `obj` may be one of `names`: false only when its name is read and
    /// is another (a type that cannot be read proves nothing, and replays captured before this
    /// check hold no such reads), each type's name read once per process. The type pointer
    /// ends the object header, whose size the string's length offset gives (larger in a
    /// free-threaded build); `tp_name` follows `ob_size`.
    fn is_a(
        &mut self,
        mem: &dyn ReadMemory,
        pid: u32,
        o: &Offsets,
        obj: u64,
        names: &[&str],
    ) -> bool {
        let Some(ty) = field(obj, o.unicode_length - 8).and_then(|a| u64_at(mem, a)) else {
            return true;
        };
        let name = self
            .types
            .entry((pid, ty))
            .or_insert_with(|| type_name_at(mem, ty, o.unicode_length + 8));
        name.as_deref().map_or(true, |n| names.contains(&n))
    }

    /// The function's qualified name; ≤ 3.10, `Class.method` from the class of `self` / `cls`.
    fn qualname(
        &mut self,
        mem: &dyn ReadMemory,
        pid: u32,
        version: Version,
        code: &Code,
        f: &PyFrameRef,
    ) -> String {
        let qualname = code.qualname.clone();
        if code.self_kind == 0 || f.first_local == 0 {
            return qualname;
        }
        let py2 = version.major == 2;
        let name = if code.self_kind == 1 {
            // What the walker read at the sample: `self` itself may be gone. Frames not from
            // the walker (ident 0) are live: read it now, as the walker does.
            let class = if f.ident != 0 {
                f.self_class
            } else {
                self.class_of(mem, py2, f.first_local).unwrap_or(0)
            };
            (class != 0)
                .then(|| self.class_name(mem, pid, class, py2))
                .flatten()
        } else {
            self.class_name(mem, pid, f.first_local, py2)
        };
        match name {
            Some(name) => format!("{name}.{qualname}"),
            None => qualname,
        }
    }

    /// What names the class of a live `obj`: its type; a 2.7 old-style instance's `in_class`
    /// (PyInstanceObject: the object header, in_class). The walker's `class_of`.
    fn class_of(&mut self, mem: &dyn ReadMemory, py2: bool, obj: u64) -> Option<u64> {
        let ty = u64_at(mem, field(obj, 8)?)?;
        if py2 && type_name(mem, ty).as_deref() == Some("instance") {
            return u64_at(mem, field(obj, 16)?);
        }
        Some(ty)
    }

    /// The name of a class object: a type, or 2.7's old-style class (a `classobj`: its
    /// instances' type is `instance`, the class hangs off each instance), each class's name
    /// read once per process. Classes live long: read after the sample, they are still there.
    fn class_name(
        &mut self,
        mem: &dyn ReadMemory,
        pid: u32,
        class: u64,
        py2: bool,
    ) -> Option<String> {
        let mut named = |class: u64, old: bool| {
            self.types
                .entry((pid, class))
                .or_insert_with(|| {
                    if old {
                        old_class_name(mem, class)
                    } else {
                        type_name(mem, class)
                    }
                })
                .clone()
        };
        if !py2 {
            return named(class, false);
        }
        let meta = u64_at(mem, field(class, 8)?)?;
        let old = named(meta, false).is_some_and(|n| n == "classobj");
        // An `instance` type here: the walker could not tell the instance's class.
        named(class, old).filter(|n| n != "instance")
    }

    /// Forgets a process (it exited; its addresses may be reused).
    pub fn forget(&mut self, pid: u32) {
        self.cache.retain(|(p, _, _), _| *p != pid);
        self.types.retain(|(p, _), _| *p != pid);
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets of version `v` (3.13: the tree's reference table, what its debug table gives).
    fn table(v: Version) -> Offsets {
        if v == Version::new(3, 13) {
            crate::offsets::V3_13
        } else {
            Offsets::for_version(v).unwrap()
        }
    }

    /// Memory made of one repeated random block: pointers lead anywhere (cycles, huge lengths).
    struct Garbage(Vec<u8>);

    impl ReadMemory for Garbage {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            if addr < 0x1000 || buf.len() > 1 << 16 {
                return Ok(0);
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.0[(addr as usize).wrapping_add(i) % self.0.len()];
            }
            Ok(buf.len())
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_memory_never_panics(block in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..512), code in proptest::prelude::any::<u64>(), instr in proptest::prelude::any::<u64>(), local in proptest::prelude::any::<u64>()) {
            let mem = Garbage(block);
            let mut r = CodeReader::default();
            for v in VERSIONS {
                let o = table(v);
                let f = PyFrameRef { code, instr, entry: false, owner: 0, first_local: local, ident: 0, self_class: 0 };
                if let Some(i) = r.resolve(&mem, 1, &o, v, &f) {
                    proptest::prop_assert!(i.qualname.len() <= 2 * MAX_STRING as usize + 260);
                }
            }
        }
    }

    pub(super) const VERSIONS: [Version; 7] = [
        Version::new(2, 7),
        Version::new(3, 6),
        Version::new(3, 9),
        Version::new(3, 10),
        Version::new(3, 11),
        Version::new(3, 12),
        Version::new(3, 13),
    ];

    /// A process's memory as a few objects at fixed addresses; reads outside them fail (an
    /// unmapped pointer). Records the largest read asked for: the reader allocates its buffer
    /// before reading, so that is its largest allocation.
    #[derive(Default, Clone)]
    pub(super) struct Objects {
        pub(super) regions: std::collections::BTreeMap<u64, Vec<u8>>,
        largest_read: std::cell::Cell<usize>,
    }

    impl ReadMemory for Objects {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.largest_read
                .set(self.largest_read.get().max(buf.len()));
            let Some((&start, bytes)) = self.regions.range(..=addr).next_back() else {
                return Ok(0);
            };
            let from = (addr - start) as usize;
            match bytes.get(from..from.saturating_add(buf.len())) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(buf.len())
                }
                None => Ok(0),
            }
        }
    }

    pub(super) const CODE: u64 = 0x10_0000;
    pub(super) const NAME: u64 = 0x20_0000;
    pub(super) const FILE: u64 = 0x21_0000;
    pub(super) const TABLE: u64 = 0x22_0000;
    pub(super) const VARNAMES: u64 = 0x23_0000;
    pub(super) const SELF_STR: u64 = 0x24_0000;
    pub(super) const INSTANCE: u64 = 0x30_0000;
    pub(super) const TYPE: u64 = 0x31_0000;
    pub(super) const TYPE_NAME: u64 = 0x32_0000;
    /// The types of code objects, strings and byte strings (2.7: `str`), each followed by its
    /// name: the reader checks the objects it reads are what they should be.
    pub(super) const CODE_TYPE: u64 = 0x40_0000;
    pub(super) const STR_TYPE: u64 = 0x41_0000;
    pub(super) const BYTES_TYPE: u64 = 0x42_0000;
    pub(super) const UNMAPPED: u64 = 0x7000_0000;

    impl Objects {
        pub(super) fn put(&mut self, addr: u64, at: i32, bytes: &[u8]) {
            let r = self.regions.get_mut(&addr).unwrap();
            let at = at as usize;
            r[at..at + bytes.len()].copy_from_slice(bytes);
        }
        pub(super) fn ptr(&mut self, addr: u64, at: i32, value: u64) {
            self.put(addr, at, &value.to_ne_bytes());
        }
        /// Sets the type of object `addr` (its last header field, before the length).
        pub(super) fn typed(&mut self, addr: u64, o: &Offsets, ty: u64) {
            self.ptr(addr, o.unicode_length - 8, ty);
        }
        /// A type object named `name` at `addr`, its name right after it.
        pub(super) fn type_object(&mut self, addr: u64, o: &Offsets, name: &str) {
            let mut b = vec![0u8; 256];
            let at = o.unicode_length as usize + 8;
            b[at..at + 8].copy_from_slice(&(addr + 128).to_ne_bytes());
            b[128..128 + name.len()].copy_from_slice(name.as_bytes());
            self.regions.insert(addr, b);
        }
        /// A `str` (compact ASCII; a byte string on 2.7) holding `text`.
        pub(super) fn string(&mut self, addr: u64, o: &Offsets, text: &str) {
            let data = o.unicode_ascii_data as usize;
            self.regions.insert(addr, vec![0; data + text.len() + 1]);
            self.typed(addr, o, STR_TYPE);
            self.ptr(addr, o.unicode_length, text.len() as u64);
            if o.unicode_state >= 0 {
                // kind 1 (bits 2-4), compact (bit 5), ascii (bit 6).
                self.put(
                    addr,
                    o.unicode_state,
                    &(1u32 << 2 | 1 << 5 | 1 << 6).to_ne_bytes(),
                );
            }
            self.put(addr, data as i32, text.as_bytes());
        }

        /// The code object of `Klass.method` in `/app/x.py`, first line 10, whose first
        /// instruction is on line 12 (a `self` method before 3.11), and the frame running it.
        pub(super) fn method(v: Version) -> (Objects, Offsets, PyFrameRef) {
            Objects::method_with(v, table(v))
        }

        fn method_with(v: Version, o: Offsets) -> (Objects, Offsets, PyFrameRef) {
            let mut m = Objects::default();
            m.type_object(CODE_TYPE, &o, "code");
            m.type_object(STR_TYPE, &o, "str");
            m.type_object(BYTES_TYPE, &o, if v.major == 2 { "str" } else { "bytes" });
            m.regions.insert(CODE, vec![0; 512]);
            m.typed(CODE, &o, CODE_TYPE);
            m.string(
                NAME,
                &o,
                if o.code_qualname >= 0 {
                    "Klass.method"
                } else {
                    "method"
                },
            );
            m.ptr(CODE, o.code_name, NAME);
            if o.code_qualname >= 0 {
                m.ptr(CODE, o.code_qualname, NAME);
            }
            m.string(FILE, &o, "/app/x.py");
            m.ptr(CODE, o.code_filename, FILE);
            m.put(CODE, o.code_firstlineno, &10i32.to_ne_bytes());
            // Line +2 for the first instruction, in each version's table format.
            let table: &[u8] = if v.at_least(3, 11) {
                &[0x80 | (13 << 3), 2 << 1]
            } else if v == Version::new(3, 10) {
                &[2, 2]
            } else {
                &[0, 2]
            };
            m.regions
                .insert(TABLE, vec![0; o.bytes_data as usize + table.len()]);
            m.ptr(TABLE, o.bytes_size, table.len() as u64);
            m.put(TABLE, o.bytes_data, table);
            m.typed(TABLE, &o, BYTES_TYPE);
            m.ptr(CODE, o.code_linetable, TABLE);
            let mut first_local = 0;
            if o.code_varnames >= 0 {
                m.regions.insert(VARNAMES, vec![0; 32]);
                m.ptr(VARNAMES, 16, 1);
                m.ptr(VARNAMES, 24, SELF_STR);
                m.string(SELF_STR, &o, "self");
                m.ptr(CODE, o.code_varnames, VARNAMES);
                m.regions.insert(INSTANCE, vec![0; 16]);
                m.ptr(INSTANCE, 8, TYPE);
                m.regions.insert(TYPE, vec![0; 32]);
                m.ptr(TYPE, 24, TYPE_NAME);
                // Padded as in a real mapping: the reader reads up to 128 bytes at once.
                let mut name = b"mod.Klass\0".to_vec();
                name.resize(128, 0);
                m.regions.insert(TYPE_NAME, name);
                first_local = INSTANCE;
            }
            let instr = if o.code_adaptive >= 0 {
                CODE + o.code_adaptive as u64
            } else {
                0
            };
            (
                m,
                o,
                PyFrameRef {
                    code: CODE,
                    instr,
                    entry: false,
                    owner: 0,
                    first_local,
                    ident: 0,
                    self_class: 0,
                },
            )
        }
    }

    /// Free-threaded 3.14 (synthetic table and memory: no 't' build is installed here): strings
    /// and bytes behind the larger object header; a frame running in a thread's own copy of
    /// the bytecode (`co_tlbc`) gets the line of its offset in that copy.
    #[test]
    fn free_threaded_code_objects_and_thread_local_bytecode() {
        let v = Version::new(3, 14);
        let o = crate::debug_offsets::parse(&crate::debug_offsets::tests::free_threaded_314(), v)
            .unwrap()
            .offsets;
        let (mut m, o, mut f) = Objects::method_with(v, o);
        // Line 12 for unit 0, then line 15 for units 1 - 4.
        let table = [0x80 | (13 << 3), 2 << 1, 0x80 | (13 << 3) | 3, 3 << 1];
        m.regions
            .insert(TABLE, vec![0; o.bytes_data as usize + table.len()]);
        m.ptr(TABLE, o.bytes_size, table.len() as u64);
        m.put(TABLE, o.bytes_data, &table);
        m.typed(TABLE, &o, BYTES_TYPE);
        // co_tlbc: two copies, the main one and a thread's own, below the code object.
        const TLBC: u64 = 0x50_0000;
        const COPY: u64 = 0x0F_0000;
        m.regions.insert(TLBC, vec![0; 24]);
        m.ptr(TLBC, 0, 2);
        m.ptr(TLBC, 8, CODE + o.code_adaptive as u64);
        m.ptr(TLBC, 16, COPY);
        m.ptr(CODE, o.code_tlbc, TLBC);
        let i = resolve(&m, &o, v, &f).unwrap();
        assert_eq!(
            (i.qualname.as_str(), i.filename.as_str(), i.line),
            ("Klass.method", "/app/x.py", 12)
        );
        f.instr = COPY + 3 * 2;
        assert_eq!(resolve(&m, &o, v, &f).unwrap().line, 15);
        f.instr = CODE + o.code_adaptive as u64 + 2;
        assert_eq!(resolve(&m, &o, v, &f).unwrap().line, 15);
        // A garbage co_tlbc: the main copy's offsets, no panic.
        m.ptr(TLBC, 0, u64::MAX);
        f.instr = COPY + 6;
        assert_eq!(resolve(&m, &o, v, &f).unwrap().line, 10);
    }

    fn resolve(m: &Objects, o: &Offsets, v: Version, f: &PyFrameRef) -> Option<PyFrameInfo> {
        CodeReader::default().resolve(m, 1, o, v, f)
    }

    #[test]
    fn well_formed_code_objects_of_every_version() {
        // The baseline of the hostile cases below: the same objects, intact, name the frame.
        for v in VERSIONS {
            let (m, o, f) = Objects::method(v);
            let want = PyFrameInfo {
                qualname: "Klass.method".into(),
                filename: "/app/x.py".into(),
                line: 12,
                first_line: 10,
            };
            assert_eq!(resolve(&m, &o, v, &f), Some(want), "{v:?}");
        }
    }

    #[test]
    fn cyclic_pointers_end() {
        // Objects that point back at themselves or each other (memory reused by other
        // objects): each read is one hop, so the reader ends; a name it cannot read is no
        // name, and a class it cannot name leaves the method unqualified.
        for v in VERSIONS {
            let (base, o, f) = Objects::method(v);
            let mut cases: Vec<(&str, Objects)> = Vec::new();
            let mut m = base.clone();
            m.ptr(CODE, o.code_filename, CODE);
            cases.push(("filename is the code object", m));
            let mut m = base.clone();
            m.ptr(CODE, o.code_linetable, CODE);
            cases.push(("line table is the code object", m));
            if o.code_varnames >= 0 {
                let mut m = base.clone();
                m.ptr(VARNAMES, 24, VARNAMES);
                cases.push(("first variable name is the tuple", m));
                let mut m = base.clone();
                m.ptr(INSTANCE, 8, INSTANCE);
                cases.push(("self is its own type", m));
                let mut m = base.clone();
                m.ptr(TYPE, 24, TYPE);
                cases.push(("tp_name is the type", m));
            }
            for (what, m) in cases {
                let i = resolve(&m, &o, v, &f);
                let ok = i.as_ref().map_or(true, |i| {
                    i.qualname.ends_with("method")
                        && i.qualname.len() <= 2 * MAX_STRING as usize + 260
                });
                assert!(ok, "{v:?} {what}: {i:?}");
            }
            // A cycle through the name: the code object read as a string, whatever it says.
            let mut m = base.clone();
            m.ptr(
                CODE,
                if o.code_qualname >= 0 {
                    o.code_qualname
                } else {
                    o.code_name
                },
                CODE,
            );
            let _ = resolve(&m, &o, v, &f);
        }
    }

    #[test]
    fn unreadable_pointers() {
        for v in VERSIONS {
            let (base, o, f) = Objects::method(v);
            let name_field = if o.code_qualname >= 0 {
                o.code_qualname
            } else {
                o.code_name
            };
            // No name or no file: no frame info (the caller keeps the frame anonymous).
            for field in [name_field, o.code_filename] {
                let mut m = base.clone();
                m.ptr(CODE, field, UNMAPPED);
                assert_eq!(resolve(&m, &o, v, &f), None, "{v:?}");
            }
            // A string's header readable, its characters not (cut by the end of a mapping).
            for s in [NAME, FILE] {
                let mut m = base.clone();
                m.ptr(s, 16, 64);
                assert_eq!(resolve(&m, &o, v, &f), None, "{v:?}");
            }
            // No line table: the first line.
            let mut m = base.clone();
            m.ptr(CODE, o.code_linetable, UNMAPPED);
            assert_eq!(resolve(&m, &o, v, &f).map(|i| i.line), Some(10), "{v:?}");
            // Before 3.11, no varnames, no self or no type: the method's own name.
            if o.code_varnames >= 0 {
                for (obj, at) in [
                    (CODE, o.code_varnames),
                    (VARNAMES, 24),
                    (INSTANCE, 8),
                    (TYPE, 24),
                ] {
                    let mut m = base.clone();
                    m.ptr(obj, at, UNMAPPED);
                    let i = resolve(&m, &o, v, &f).unwrap();
                    assert_eq!(i.qualname, "method", "{v:?} {obj:#x}+{at}");
                }
            }
            // The code object itself unreadable, or at the top of the address space where
            // field addresses overflow.
            let mut f2 = f;
            f2.code = UNMAPPED;
            assert_eq!(resolve(&base, &o, v, &f2), None);
            for d in [1u64, 8, 100, 4096] {
                f2.code = u64::MAX - d;
                assert_eq!(resolve(&base, &o, v, &f2), None);
            }
        }
    }

    #[test]
    fn pointers_near_the_top_of_the_address_space() {
        // Every pointer the reader follows set to just below 2^64, where base + offset
        // overflows: nothing readable there, no panic.
        for v in VERSIONS {
            let (base, o, f) = Objects::method(v);
            let name_field = if o.code_qualname >= 0 {
                o.code_qualname
            } else {
                o.code_name
            };
            let mut fields = vec![
                (CODE, name_field),
                (CODE, o.code_filename),
                (CODE, o.code_linetable),
            ];
            if o.code_varnames >= 0 {
                fields.extend([
                    (CODE, o.code_varnames),
                    (VARNAMES, 24),
                    (INSTANCE, 8),
                    (TYPE, 24),
                ]);
            }
            for (obj, at) in fields {
                for d in [0u64, 7, 15, 31, 100] {
                    let mut m = base.clone();
                    m.ptr(obj, at, u64::MAX - d);
                    let _ = resolve(&m, &o, v, &f);
                }
            }
            let mut f2 = f;
            f2.first_local = u64::MAX - 3;
            let _ = resolve(&base, &o, v, &f2);
        }
    }

    /// Length fields near the caps and far past them, the boundaries most of all.
    fn length() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            any::<u64>(),
            (0u64..3).prop_map(|d| MAX_STRING - 1 + d),
            (0u64..3).prop_map(|d| MAX_TABLE - 1 + d),
            (0u64..16).prop_map(|d| u64::MAX - d),
            // Lengths whose product with a string's kind (1, 2, 4) overflows.
            (2u64..5).prop_map(|k| u64::MAX / k + 1),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any length in a name, file name or line table, any kind in a string's state: a
        /// length over the cap is refused before anything is allocated, so no read (and no
        /// buffer) is larger than the largest cap.
        #[test]
        fn huge_lengths_are_refused_before_allocating(
            vi in 0usize..VERSIONS.len(),
            name_len in proptest::option::of(length()),
            file_len in proptest::option::of(length()),
            table_len in length(),
            state in proptest::option::of(proptest::prelude::any::<u32>()),
        ) {
            // `None`: the field as the intact object has it.
            let v = VERSIONS[vi];
            let (mut m, o, f) = Objects::method(v);
            if let Some(n) = name_len {
                m.ptr(NAME, 16, n);
            }
            if let Some(n) = file_len {
                m.ptr(FILE, 16, n);
            }
            m.ptr(TABLE, 16, table_len);
            if let (Some(s), true) = (state, o.unicode_state >= 0) {
                m.put(NAME, o.unicode_state, &s.to_ne_bytes());
            }
            let i = resolve(&m, &o, v, &f);
            let largest = m.largest_read.get() as u64;
            proptest::prop_assert!(largest <= MAX_TABLE.max(4 * MAX_STRING), "a {}-byte read", largest);
            if name_len.unwrap_or(0) > MAX_STRING || file_len.unwrap_or(0) > MAX_STRING {
                proptest::prop_assert_eq!(i, None);
            } else if name_len.is_none() && file_len.is_none() && state.is_none() && table_len > MAX_TABLE {
                // The table is dropped; the frame is still named, at its first line.
                let i = i.unwrap();
                proptest::prop_assert_eq!((i.qualname.as_str(), i.line), ("Klass.method", 10));
            }
        }

        /// Every pointer field of every object pointing at any of the objects (itself
        /// included), nowhere, or near 2^64; any length: the reader ends, allocates within
        /// its caps and returns bounded names.
        #[test]
        fn pointer_graphs_with_cycles(
            vi in 0usize..VERSIONS.len(),
            targets in proptest::collection::vec(0usize..12, 8),
            lens in proptest::collection::vec(length(), 3),
        ) {
            let v = VERSIONS[vi];
            let (mut m, o, mut f) = Objects::method(v);
            let addrs = [CODE, NAME, FILE, TABLE, VARNAMES, SELF_STR, INSTANCE, TYPE, TYPE_NAME, UNMAPPED, u64::MAX - 7, 0];
            let name_field = if o.code_qualname >= 0 { o.code_qualname } else { o.code_name };
            let mut fields = vec![(CODE, name_field), (CODE, o.code_filename), (CODE, o.code_linetable)];
            if o.code_varnames >= 0 {
                fields.extend([(CODE, o.code_varnames), (VARNAMES, 24), (INSTANCE, 8), (TYPE, 24)]);
            }
            for (&(obj, at), &t) in fields.iter().zip(&targets) {
                m.ptr(obj, at, addrs[t]);
            }
            for (obj, len) in [NAME, FILE, TABLE].into_iter().zip(lens) {
                m.ptr(obj, 16, len);
            }
            f.code = addrs[targets[7] % 9];
            let mut r = CodeReader::default();
            for _ in 0..2 {
                if let Some(i) = r.resolve(&m, 1, &o, v, &f) {
                    proptest::prop_assert!(i.qualname.len() <= 2 * MAX_STRING as usize + 260);
                    proptest::prop_assert!(i.filename.len() <= 4 * MAX_STRING as usize);
                }
            }
            proptest::prop_assert!(m.largest_read.get() as u64 <= MAX_TABLE.max(4 * MAX_STRING));
        }

        /// Line tables of any bytes with any first line and position: no overflow (garbage
        /// tables and first lines come from memory being reused).
        #[test]
        fn line_tables_of_any_bytes(
            table in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            first in proptest::prelude::any::<i32>(),
            at in proptest::prelude::any::<u64>(),
        ) {
            let _ = line_of(&table, first, at % 1024);
            let _ = line_of(&table, first, at);
            let _ = line_of_310(&table, first, at % 1024);
            let _ = line_of_lnotab(&table, first, at % 1024, true);
            let _ = line_of_lnotab(&table, first, at, false);
        }
    }

    #[test]
    fn line_numbers_saturate() {
        // A first line at the ends of i32 and a table moving past them: pinned to the end,
        // not wrapped to the other sign.
        assert_eq!(line_of(&[0x80 | (13 << 3), 2 << 1], i32::MAX, 0), i32::MAX);
        assert_eq!(
            line_of(&[0x80 | (13 << 3), (2 << 1) | 1], i32::MIN, 0),
            i32::MIN
        );
        assert_eq!(line_of_310(&[2, 2], i32::MAX - 1, 0), i32::MAX);
        assert_eq!(
            line_of_lnotab(&[0, 0x7f, 0, 0x7f], i32::MAX - 100, 0, true),
            i32::MAX
        );
        assert_eq!(line_of_lnotab(&[0, 0xff], i32::MAX, 0, false), i32::MAX);
    }

    #[test]
    fn lnotab_and_310_tables() {
        // lnotab: (+6 bytes, +1 line), (+4 bytes, -2 lines signed / +254 unsigned)
        let t = [6u8, 1, 4, 0xfe];
        assert_eq!(line_of_lnotab(&t, 10, 0, true), 10);
        assert_eq!(line_of_lnotab(&t, 10, 6, true), 11);
        assert_eq!(line_of_lnotab(&t, 10, 10, true), 9);
        assert_eq!(line_of_lnotab(&t, 10, 10, false), 265);
        // 3.10: [0,4) line+1, [4,8) no line, [8,10) line+2
        let t = [4u8, 1, 4, 0x80, 2, 2];
        assert_eq!(line_of_310(&t, 10, 0), 11);
        assert_eq!(line_of_310(&t, 10, 8), 13);
    }

    #[test]
    #[allow(clippy::identity_op)] // `0 << 3`: form 0 spelled out like the others.
    fn location_table_forms() {
        // Short form (code 0..9, 1 extra byte), one-line forms (10..12, 2 extra bytes),
        // no-column (13, svarint), long (14), none (15).
        let t = [
            0x80 | (13 << 3) | 1,
            2 << 1, // units 0-1: line +2 (first+2)
            0x80 | (11 << 3),
            0,
            0, // unit 2: line +1
            0x80 | (0 << 3) | 2,
            0, // units 3-5: same line
            0x80 | (14 << 3),
            (3 << 1) | 1,
            0,
            0,
            0,                    // unit 6: line -3
            0x80 | (15 << 3) | 1, // units 7-8: no location
        ];
        assert_eq!(line_of(&t, 10, 0), 12);
        assert_eq!(line_of(&t, 10, 1), 12);
        assert_eq!(line_of(&t, 10, 2), 13);
        assert_eq!(line_of(&t, 10, 5), 13);
        assert_eq!(line_of(&t, 10, 6), 10);
        assert_eq!(line_of(&t, 10, 8), 10);
        // Garbage never panics.
        assert!(line_of(&[0xff; 7], 1, 100) >= 1 - 1000);
        line_of(&[0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 0, 3);
    }
}

#[cfg(test)]
mod identity_tests {
    //! The identity the walker captured at the sample against what the address holds when
    //! user space reads it, and the class of `self` as the walker read it (synthetic memory).
    use super::tests::*;
    use super::*;

    /// What the walker records for the frame of `Klass.method` while it runs.
    fn sampled(v: Version) -> (Objects, Offsets, PyFrameRef) {
        let (m, o, mut f) = Objects::method(v);
        f.ident = identity(NAME, FILE);
        f.self_class = if o.code_varnames >= 0 { TYPE } else { 0 };
        (m, o, f)
    }

    /// The code object at CODE freed and another one, `other` in `/app/y.py`, put there.
    fn replace(m: &mut Objects, o: &Offsets) {
        const NAME2: u64 = 0x25_0000;
        const FILE2: u64 = 0x26_0000;
        m.string(NAME2, o, "other");
        m.string(FILE2, o, "/app/y.py");
        m.ptr(CODE, o.code_name, NAME2);
        if o.code_qualname >= 0 {
            m.ptr(CODE, o.code_qualname, NAME2);
        }
        m.ptr(CODE, o.code_filename, FILE2);
    }

    #[test]
    fn a_code_object_replaced_before_it_was_read_is_never_named_as_the_other() {
        for v in VERSIONS {
            let (mut m, o, f) = sampled(v);
            let mut early = CodeReader::default();
            assert!(early
                .resolve(&m, 1, &o, v, &f)
                .unwrap()
                .qualname
                .ends_with("method"));
            replace(&mut m, &o);
            // Read for the first time after the replacement: unreadable, not `other`.
            let i = CodeReader::default().resolve(&m, 1, &o, v, &f).unwrap();
            assert_eq!((i.qualname.as_str(), i.line), (UNREADABLE, 0), "{v:?}");
            // Read while it was alive: a late record of it still gets its name, and the new
            // object's own frames get theirs.
            let i = early.resolve(&m, 1, &o, v, &f).unwrap();
            assert!(
                i.qualname.ends_with("method") && i.filename == "/app/x.py",
                "{v:?}"
            );
            let mut g = f;
            g.ident = identity(0x25_0000, 0x26_0000);
            let i = early.resolve(&m, 1, &o, v, &g).unwrap();
            assert!(
                i.qualname.ends_with("other") && i.filename == "/app/y.py",
                "{v:?}"
            );
        }
    }

    #[test]
    fn memory_that_is_no_code_object_or_string_is_not_named() {
        for v in VERSIONS {
            let (base, o, f) = sampled(v);
            // The code object's type, or its name's, is something else.
            for (obj, ty) in [(CODE, STR_TYPE), (NAME, CODE_TYPE), (FILE, BYTES_TYPE)] {
                if v.major == 2 && ty == BYTES_TYPE {
                    continue; // 2.7's byte strings are `str`
                }
                let mut m = base.clone();
                m.typed(obj, &o, ty);
                assert_eq!(
                    CodeReader::default().resolve(&m, 1, &o, v, &f),
                    None,
                    "{v:?}"
                );
            }
            // A line table that is not a byte string: no lines, the name stays.
            let mut m = base.clone();
            m.typed(TABLE, &o, CODE_TYPE);
            let i = CodeReader::default().resolve(&m, 1, &o, v, &f).unwrap();
            assert_eq!(i.line, 10, "{v:?}");
        }
    }

    #[test]
    fn the_class_of_self_is_the_one_the_walker_read() {
        for v in VERSIONS.into_iter().filter(|v| !v.at_least(3, 11)) {
            let (mut m, o, f) = sampled(v);
            // `self` freed and its memory reused by an object of another class.
            const OTHER: u64 = 0x33_0000;
            const OTHER_NAME: u64 = 0x34_0000;
            m.regions.insert(OTHER, vec![0; 32]);
            m.ptr(OTHER, 24, OTHER_NAME);
            let mut name = b"Other\0".to_vec();
            name.resize(128, 0);
            m.regions.insert(OTHER_NAME, name);
            m.ptr(INSTANCE, 8, OTHER);
            let i = CodeReader::default().resolve(&m, 1, &o, v, &f).unwrap();
            assert_eq!(i.qualname, "Klass.method", "{v:?}");
            // Nothing read at the sample: the method's own name, not a guess.
            let g = PyFrameRef { self_class: 0, ..f };
            let i = CodeReader::default().resolve(&m, 1, &o, v, &g).unwrap();
            assert_eq!(i.qualname, "method", "{v:?}");
        }
    }
}
