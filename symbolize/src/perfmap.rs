//! Perf maps: `/tmp/perf-PID.map`, one line per piece of generated code, `START SIZE NAME` with
//! START and SIZE in hex. CPython 3.12+ writes one line per perf trampoline, named
//! `py::QUALNAME:FILENAME`.
//!
//! The file is appended to while the process runs, so the last line may be torn: a line without
//! its newline is ignored. Lines that do not parse (binary garbage, empty names) are skipped.
//! Later lines win over earlier ones for the same start address (code regenerated in place).

use std::io::{BufRead, Read};

/// Longest line we accept; a longer one is skipped (a qualified name is never this long).
const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub start: u64,
    pub size: u64,
    pub name: String,
}

/// A Python function as named by a perf-map entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonName<'a> {
    /// Qualified name, e.g. `Class.method` or `outer.<locals>.inner`.
    pub qualname: &'a str,
    /// File name as the code object has it.
    pub file: &'a str,
}

/// Parses `py::QUALNAME:FILENAME`. The file name may itself contain `:`; qualified names do not.
pub fn python_name(name: &str) -> Option<PythonName<'_>> {
    let rest = name.strip_prefix("py::")?;
    let (qualname, file) = rest.split_once(':')?;
    if qualname.is_empty() {
        return None;
    }
    Some(PythonName { qualname, file })
}

/// The parsed entries of one perf map, sorted by start address.
#[derive(Clone, Debug, Default)]
pub struct PerfMap {
    entries: Vec<Entry>,
}

impl PerfMap {
    /// Parses the bytes of a perf map.
    pub fn parse(bytes: &[u8]) -> Self {
        Self::parse_reader(bytes)
    }

    fn parse_reader<R: BufRead>(mut r: R) -> Self {
        let mut entries = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            // Bounded read: a line longer than MAX_LINE is consumed in pieces and dropped.
            let n = match (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if line.last() != Some(&b'\n') {
                if n > MAX_LINE {
                    // Skip the rest of this over-long line.
                    let mut sink = Vec::new();
                    loop {
                        sink.clear();
                        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut sink) {
                            Ok(0) | Err(_) => break,
                            Ok(_) if sink.last() == Some(&b'\n') => break,
                            Ok(_) => {}
                        }
                    }
                    continue;
                }
                // A torn last line: the writer has not finished it.
                break;
            }
            if let Some(e) = parse_line(&line[..line.len() - 1]) {
                entries.push(e);
            }
        }
        // Stable sort keeps file order among equal starts; then keep the last of each start.
        entries.sort_by_key(|e| e.start);
        let mut dedup: Vec<Entry> = Vec::with_capacity(entries.len());
        for e in entries {
            match dedup.last_mut() {
                Some(last) if last.start == e.start => *last = e,
                _ => dedup.push(e),
            }
        }
        Self { entries: dedup }
    }

    /// The entry that covers `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.start <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr - e.start < e.size.max(1)).then_some(e)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn parse_line(line: &[u8]) -> Option<Entry> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut it = line.splitn(3, ' ');
    let start = parse_hex(it.next()?)?;
    let size = parse_hex(it.next()?)?;
    let name = it.next()?.trim();
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return None;
    }
    start.checked_add(size)?;
    Some(Entry {
        start,
        size,
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAP: &str = "7f8dcd296000 b py::<module>:/app/main.py\n\
7f8dcd29679b b py::A:<string>\n\
7f8dcd2967a6 b py::A.m:/srv/app/models.py\n\
7f8dcd2967b1 b py::outer.<locals>.inner:C:\\weird:name.py\n\
garbage line\n\
\u{1}\u{2}\n\
7f8dcd2967bc b py::torn_func:/app/x";

    #[test]
    fn parses_entries_and_drops_torn_last_line() {
        let m = PerfMap::parse(MAP.as_bytes());
        assert_eq!(m.len(), 4);
        let e = m.lookup(0x7f8dcd2967a6 + 5).unwrap();
        assert_eq!(e.name, "py::A.m:/srv/app/models.py");
        let p = python_name(&e.name).unwrap();
        assert_eq!(p.qualname, "A.m");
        assert_eq!(p.file, "/srv/app/models.py");
        // Past the end of the last complete entry: nothing (the torn entry was dropped).
        assert!(m.lookup(0x7f8dcd2967bc).is_none());
        assert!(m.lookup(0x7f8dcd2967b1 + 0xb).is_none());
        assert!(m.lookup(0x1000).is_none());
    }

    #[test]
    fn file_names_may_contain_colons() {
        let p = python_name("py::outer.<locals>.inner:C:\\weird:name.py").unwrap();
        assert_eq!(p.qualname, "outer.<locals>.inner");
        assert_eq!(p.file, "C:\\weird:name.py");
        assert!(python_name("not_python").is_none());
        assert!(python_name("py:::file").is_none());
    }

    #[test]
    fn later_entries_win() {
        let m = PerfMap::parse(b"1000 10 first\n1000 10 second\n0x2000 0x10 third\n");
        assert_eq!(m.lookup(0x1005).unwrap().name, "second");
        assert_eq!(m.lookup(0x2000).unwrap().name, "third");
    }

    #[test]
    fn overlong_lines_are_skipped() {
        let mut data = b"1000 10 ok\n2000 10 ".to_vec();
        data.extend(std::iter::repeat(b'x').take(MAX_LINE * 3));
        data.extend(b"\n3000 10 after\n");
        let m = PerfMap::parse(&data);
        assert_eq!(m.len(), 2);
        assert_eq!(m.lookup(0x3001).unwrap().name, "after");
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let m = PerfMap::parse(&data);
            for e in m.entries() {
                prop_assert!(m.lookup(e.start).is_some());
            }
        }

        #[test]
        fn roundtrips_well_formed_lines(
            items in proptest::collection::vec((0u64..1<<47, 1u64..4096, "[a-zA-Z_.<>]{1,40}"), 1..50)
        ) {
            let mut text = String::new();
            for (s, z, n) in &items {
                text.push_str(&format!("{s:x} {z:x} py::{n}:/f.py\n"));
            }
            let m = PerfMap::parse(text.as_bytes());
            let last_for = |start: u64| items.iter().rev().find(|(s, _, _)| *s == start).unwrap();
            for e in m.entries() {
                let (_, z, n) = last_for(e.start);
                prop_assert_eq!(e.size, *z);
                prop_assert_eq!(&e.name, &format!("py::{n}:/f.py"));
            }
        }
    }
}
