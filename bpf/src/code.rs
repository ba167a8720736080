//! Code objects to names, files and lines, read once per (process, code object) from the
//! target's memory and cached.

use std::collections::HashMap;

use crate::{Offsets, PyFrameRef};

/// What the reader needs of another process's memory (a live process, or a fixture in tests).
pub trait RemoteMemory {
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool;
}

pub struct LiveMemory;

impl RemoteMemory for LiveMemory {
    fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> bool {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the local iovec covers `buf`; the kernel checks the remote side.
        let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
        n == buf.len() as isize
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrameInfo {
    pub qualname: String,
    pub filename: String,
    pub line: u32,
    pub first_line: u32,
}

struct Code {
    /// `co_name` and `co_filename` pointers when read: a code object freed and another
    /// allocated at the same address has other ones (checked at most once a second).
    identity: (u64, u64),
    checked: std::cell::Cell<std::time::Instant>,
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

#[derive(Default)]
pub struct CodeReader {
    cache: HashMap<(u32, u64), Option<std::rc::Rc<Code>>>,
    /// (pid, type object) → its name.
    types: HashMap<(u32, u64), Option<String>>,
}

/// `tp_name` of a type object: a C string; for builtin types `module.Name`, keep `Name`.
fn type_name(m: &dyn RemoteMemory, pid: u32, ty: u64) -> Option<String> {
    let p = u64_at(m, pid, ty + 24)?;
    let mut buf = [0u8; 128];
    // Read what is readable: the name may sit near the end of a mapping.
    let mut n = buf.len();
    while n >= 8 && !m.read(pid, p, &mut buf[..n]) {
        n /= 2;
    }
    let s = &buf[..n];
    let end = s.iter().position(|&c| c == 0)?;
    let name = std::str::from_utf8(&s[..end]).ok()?;
    let short = name.rsplit('.').next().unwrap_or(name);
    (!short.is_empty()).then(|| short.to_string())
}

fn u64_at(m: &dyn RemoteMemory, pid: u32, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    m.read(pid, addr, &mut b).then(|| u64::from_ne_bytes(b))
}

fn i32_at(m: &dyn RemoteMemory, pid: u32, addr: u64) -> Option<i32> {
    let mut b = [0u8; 4];
    m.read(pid, addr, &mut b).then(|| i32::from_ne_bytes(b))
}

/// Reads a `str` object (compact ASCII or compact UCS-1/2/4; a byte string on 2.7).
fn read_unicode(m: &dyn RemoteMemory, pid: u32, o: &Offsets, obj: u64) -> Option<String> {
    let len = u64_at(m, pid, obj + 16)?;
    if o.unicode_state < 0 {
        // 2.7: PyStringObject, bytes at ob_sval.
        if len > MAX_STRING {
            return None;
        }
        let mut buf = vec![0u8; len as usize];
        m.read(pid, obj + o.unicode_ascii_data as u64, &mut buf).then_some(())?;
        return Some(String::from_utf8_lossy(&buf).into_owned());
    }
    let state = i32_at(m, pid, obj + o.unicode_state as u64)? as u32;
    let kind = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !compact || len > MAX_STRING || !(1..=4).contains(&kind) {
        return None;
    }
    let data = obj + if ascii { o.unicode_ascii_data } else { o.unicode_compact_data } as u64;
    let mut buf = vec![0u8; (len * kind as u64) as usize];
    if !m.read(pid, data, &mut buf) {
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

fn read_bytes(m: &dyn RemoteMemory, pid: u32, o: &Offsets, obj: u64) -> Option<Vec<u8>> {
    let len = u64_at(m, pid, obj + 16)?;
    if len > MAX_TABLE {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    m.read(pid, obj + o.bytes_data as u64, &mut buf).then_some(buf)
}

fn read_code(m: &dyn RemoteMemory, pid: u32, o: &Offsets, code: u64) -> Option<Code> {
    let p = |off: i32| u64_at(m, pid, code + off as u64);
    // Before 3.11 there is no co_qualname: the name.
    let qualname = read_unicode(m, pid, o, p(if o.code_qualname >= 0 { o.code_qualname } else { o.code_name })?)?;
    let filename = read_unicode(m, pid, o, p(o.code_filename)?)?;
    let first_line = i32_at(m, pid, code + o.code_firstlineno as u64)?;
    let linetable = read_bytes(m, pid, o, p(o.code_linetable)?).unwrap_or_default();
    let self_kind = if o.code_varnames >= 0 {
        let first = p(o.code_varnames)
            .and_then(|t| (u64_at(m, pid, t + 16)? > 0).then_some(t))
            .and_then(|t| u64_at(m, pid, t + 24))
            .and_then(|n| read_unicode(m, pid, o, n));
        match first.as_deref() {
            Some("self") => 1,
            Some("cls") => 2,
            _ => 0,
        }
    } else {
        0
    };
    Some(Code {
        identity: (p(o.code_name)?, p(o.code_filename)?),
        checked: std::cell::Cell::new(std::time::Instant::now()),
        qualname,
        self_kind,
        filename,
        first_line,
        linetable,
        start: if o.code_adaptive >= 0 { code + o.code_adaptive as u64 } else { 0 },
    })
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
        line += if signed { pair[1] as i8 as i32 } else { pair[1] as i32 };
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
        line += ld as i32;
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
                line += svarint(table, &mut i);
                varint(table, &mut i);
                varint(table, &mut i);
                varint(table, &mut i);
            }
            13 => line += svarint(table, &mut i),
            10..=12 => {
                line += (code - 10) as i32;
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

impl CodeReader {
    /// Names a frame of process `pid`. `None` when the code object cannot be read.
    pub fn resolve(&mut self, mem: &dyn RemoteMemory, pid: u32, o: &Offsets, version: (u8, u8), f: &PyFrameRef) -> Option<PyFrameInfo> {
        if f.code == 0 {
            return None;
        }
        // Revalidate a cached entry at most once a second: the address may now hold another
        // code object (the old one freed). The same two pointers mean the same object.
        if let Some(Some(c)) = self.cache.get(&(pid, f.code)) {
            if c.checked.get().elapsed() >= std::time::Duration::from_secs(1) {
                let now = (
                    u64_at(mem, pid, f.code + o.code_name as u64).unwrap_or(0),
                    u64_at(mem, pid, f.code + o.code_filename as u64).unwrap_or(0),
                );
                if now == c.identity {
                    c.checked.set(std::time::Instant::now());
                } else {
                    self.cache.remove(&(pid, f.code));
                }
            }
        }
        let code = match self.cache.get(&(pid, f.code)) {
            Some(Some(c)) => c.clone(),
            _ => {
                // A failure is not cached: the object may be readable at the next sample.
                let c = std::rc::Rc::new(read_code(mem, pid, o, f.code)?);
                self.cache.insert((pid, f.code), Some(c.clone()));
                c
            }
        };
        // 3.11/3.12 point at the last instruction started (prev_instr), 3.13 at the current
        // one; before 3.11 the frame holds f_lasti, in bytes (≤ 3.9) or code units (3.10).
        let line = match version {
            (3, v) if v >= 11 => {
                if f.instr >= code.start {
                    line_of(&code.linetable, code.first_line, (f.instr - code.start) / 2)
                } else {
                    code.first_line
                }
            }
            (3, 10) => {
                let lasti = f.instr as i64;
                if lasti < 0 {
                    code.first_line
                } else {
                    line_of_310(&code.linetable, code.first_line, lasti as u64 * 2)
                }
            }
            (major, _) => {
                let lasti = f.instr as i64;
                if lasti < 0 {
                    code.first_line
                } else {
                    line_of_lnotab(&code.linetable, code.first_line, lasti as u64, major >= 3)
                }
            }
        };
        // ≤ 3.10: `Class.method` from the class of `self` / `cls`.
        let mut qualname = code.qualname.clone();
        if code.self_kind != 0 && f.first_local != 0 {
            let ty = if code.self_kind == 1 { u64_at(mem, pid, f.first_local + 8) } else { Some(f.first_local) };
            if let Some(ty) = ty {
                let name = self.types.entry((pid, ty)).or_insert_with(|| type_name(mem, pid, ty)).clone();
                if let Some(name) = name {
                    qualname = format!("{name}.{qualname}");
                }
            }
        }
        Some(PyFrameInfo {
            qualname,
            filename: code.filename.clone(),
            line: line.max(0) as u32,
            first_line: code.first_line.max(0) as u32,
        })
    }

    /// Forgets a process (it exited; its addresses may be reused).
    pub fn forget(&mut self, pid: u32) {
        self.cache.retain(|(p, _), _| *p != pid);
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

    /// Memory made of one repeated random block: pointers lead anywhere (cycles, huge lengths).
    struct Garbage(Vec<u8>);

    impl RemoteMemory for Garbage {
        fn read(&self, _pid: u32, addr: u64, buf: &mut [u8]) -> bool {
            if addr < 0x1000 || buf.len() > 1 << 16 {
                return false;
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.0[(addr as usize).wrapping_add(i) % self.0.len()];
            }
            true
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_memory_never_panics(block in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..512), code in proptest::prelude::any::<u64>(), instr in proptest::prelude::any::<u64>(), local in proptest::prelude::any::<u64>()) {
            let mem = Garbage(block);
            let mut r = CodeReader::default();
            for v in [(2u8, 7u8), (3, 6), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13)] {
                let o = Offsets::for_version(v).unwrap();
                let f = PyFrameRef { code, instr, entry: false, owner: 0, first_local: local };
                if let Some(i) = r.resolve(&mem, 1, &o, v, &f) {
                    proptest::prop_assert!(i.qualname.len() <= 2 * MAX_STRING as usize + 260);
                }
            }
        }
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
    fn location_table_forms() {
        // Short form (code 0..9, 1 extra byte), one-line forms (10..12, 2 extra bytes),
        // no-column (13, svarint), long (14), none (15).
        let t = [
            0x80 | (13 << 3) | 1, 2 << 1,     // units 0-1: line +2 (first+2)
            0x80 | (11 << 3), 0, 0,           // unit 2: line +1
            0x80 | (0 << 3) | 2, 0,           // units 3-5: same line
            0x80 | (14 << 3), (3 << 1) | 1, 0, 0, 0, // unit 6: line -3
            0x80 | (15 << 3) | 1,             // units 7-8: no location
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
