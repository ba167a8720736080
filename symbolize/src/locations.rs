//! The symbolization stage: normalised locations (a kernel address, an offset in a mapped ELF
//! file, an anonymous address in a process) in, frames out. Each kind is named in batches —
//! the kernel in one, each file in one, each process's perf map read once — so that the cost
//! is per distinct location and per file, not per sample.
//!
//! What is *shown* is the caller's policy: which locations to ask for, the labels of what
//! nothing names, the kind of each frame. This module only says what the files, the kernel and
//! the perf maps name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use perfpy_process::elf::ElfFacts;

use crate::perfmap::{python_name, PerfMap};
use crate::{Frame, SymbolizeError, Symbolizer};

/// A location captured at sample time, normalised so that naming it needs neither the process
/// nor the time: files and processes are the caller's ids ([`Sources`] resolves them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// A kernel address.
    Kernel(u64),
    /// An offset in a mapped file.
    File { file: u32, offset: u64 },
    /// An address in code that no file backs (a JIT, CPython's perf trampolines) of a process.
    Anon { process: u32, addr: u64 },
}

/// An ELF file to name code of, as the caller opened it for the run.
pub struct ElfSource<'a> {
    /// For logs: the path as the process named it.
    pub name: &'a str,
    /// Where this process can read it, whatever happened to the original (a descriptor of
    /// ours: `/proc/self/fd/N`).
    pub path: PathBuf,
    /// Its separate debug file, likewise (see [`crate::debug_file`]).
    pub debug: Option<PathBuf>,
    /// Its facts (load segments: file offsets to the virtual addresses of its debug file).
    pub facts: &'a ElfFacts,
    /// Whether to read DWARF (lines, inlined functions) or only the symbol tables.
    pub dwarf: bool,
}

/// What the caller knows of the files and processes that [`Location`]s name. Opening them is
/// the caller's: they are the targets' files and must be opened the safe way.
pub trait Sources {
    /// File `file`; `None` if it is not an ELF file (nothing names its code).
    fn elf(&self, file: u32) -> Option<ElfSource<'_>>;
    /// The perf map of process `process` (asked once per process and batch). An empty map for
    /// a process that has none; an error for one that could not be read.
    fn perf_map(&self, process: u32) -> Result<PerfMap, SymbolizeError>;
    /// Whether naming must stop now (a signal after sampling): checked before each batch.
    fn aborted(&self) -> bool;
}

/// What names one location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Symbol {
    /// Native or kernel code: its frames, the innermost inlined function first.
    Frames(Vec<Frame>),
    /// A perf-map entry `py::QUALNAME:FILE`: a Python function.
    Python { qualname: String, file: String },
    /// Another perf-map entry (generated code).
    Generated(String),
    /// Nothing names it: no symbol covers it, no perf-map entry, or its source failed.
    Unnamed,
    /// Not looked at: naming stopped before its batch ([`Sources::aborted`]).
    Skipped,
}

/// The result of [`Symbolizer::symbolize`].
pub struct Symbols {
    /// One per location asked for, in the same order.
    pub symbols: Vec<Symbol>,
    /// Perf maps that could not be read, by process: their addresses are [`Symbol::Unnamed`].
    pub refused_perf_maps: Vec<(u32, SymbolizeError)>,
    /// Naming stopped early: some locations are [`Symbol::Skipped`].
    pub cut_short: bool,
}

impl Symbolizer {
    /// Names `locations`: kernel addresses in one batch, each file's offsets in one batch,
    /// each process's anonymous addresses with its perf map, read once.
    pub fn symbolize(&self, locations: &[Location], sources: &impl Sources) -> Symbols {
        let mut out = Symbols {
            symbols: vec![Symbol::Unnamed; locations.len()],
            refused_perf_maps: Vec::new(),
            cut_short: false,
        };
        let mut kernel = Vec::new();
        let mut by_file: HashMap<u32, Vec<(usize, u64)>> = HashMap::new();
        // In the order of their first location: refused perf maps are reported in that order.
        let mut by_process: Vec<(u32, Vec<(usize, u64)>)> = Vec::new();
        let mut process_at: HashMap<u32, usize> = HashMap::new();
        for (i, l) in locations.iter().enumerate() {
            match *l {
                Location::Kernel(a) => kernel.push((i, a)),
                Location::File { file, offset } => {
                    by_file.entry(file).or_default().push((i, offset))
                }
                Location::Anon { process, addr } => {
                    let at = *process_at.entry(process).or_insert_with(|| {
                        by_process.push((process, Vec::new()));
                        by_process.len() - 1
                    });
                    by_process[at].1.push((i, addr));
                }
            }
        }
        for (process, addrs) in by_process {
            self.name_anonymous(process, &addrs, sources, &mut out);
        }
        self.name_kernel(&kernel, sources, &mut out);
        for (file, offsets) in by_file {
            self.name_file(file, &offsets, sources, &mut out);
        }
        out
    }

    /// Anonymous addresses of one process, by its perf map.
    fn name_anonymous(
        &self,
        process: u32,
        addrs: &[(usize, u64)],
        sources: &impl Sources,
        out: &mut Symbols,
    ) {
        let map = sources.perf_map(process).unwrap_or_else(|e| {
            out.refused_perf_maps.push((process, e));
            PerfMap::default()
        });
        for &(i, addr) in addrs {
            out.symbols[i] = match map.lookup(addr) {
                Some(e) => match python_name(&e.name) {
                    Some(py) => Symbol::Python {
                        qualname: py.qualname.to_string(),
                        file: py.file.to_string(),
                    },
                    None => Symbol::Generated(e.name.clone()),
                },
                None => Symbol::Unnamed,
            };
        }
    }

    /// Kernel addresses, in one batch.
    fn name_kernel(&self, kernel: &[(usize, u64)], sources: &impl Sources, out: &mut Symbols) {
        if kernel.is_empty() {
            return;
        }
        if sources.aborted() {
            out.cut_short = true;
            for &(i, _) in kernel {
                out.symbols[i] = Symbol::Skipped;
            }
            return;
        }
        let addrs: Vec<u64> = kernel.iter().map(|(_, a)| *a).collect();
        let t = Instant::now();
        let frames = self.symbolize_kernel(&addrs).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            vec![Vec::new(); addrs.len()]
        });
        tracing::debug!(addresses = addrs.len(), elapsed = ?t.elapsed(), "symbolized kernel");
        for (&(i, _), f) in kernel.iter().zip(frames) {
            out.symbols[i] = frames_or_unnamed(f);
        }
    }

    /// The offsets of one file, in one batch.
    fn name_file(
        &self,
        file: u32,
        offsets: &[(usize, u64)],
        sources: &impl Sources,
        out: &mut Symbols,
    ) {
        if sources.aborted() {
            out.cut_short = true;
            for &(i, _) in offsets {
                out.symbols[i] = Symbol::Skipped;
            }
            return;
        }
        let Some(elf) = sources.elf(file) else {
            return;
        };
        let offs: Vec<u64> = offsets.iter().map(|(_, o)| *o).collect();
        for (&(i, _), f) in offsets.iter().zip(self.file_frames(&elf, &offs)) {
            out.symbols[i] = frames_or_unnamed(f);
        }
    }

    /// The frames of `offsets` in `elf` (empty where nothing names one).
    fn file_frames(&self, elf: &ElfSource<'_>, offsets: &[u64]) -> Vec<Vec<Frame>> {
        let t = Instant::now();
        let Some(dbg) = &elf.debug else {
            let f = self
                .symbolize_elf(&elf.path, offsets, elf.dwarf)
                .unwrap_or_else(|e| {
                    tracing::debug!("{e}");
                    vec![Vec::new(); offsets.len()]
                });
            tracing::debug!(file = elf.name, addresses = offsets.len(), elapsed = ?t.elapsed(), "symbolized");
            return f;
        };
        // A stripped file with its separate debug file: by virtual address (the debug file's
        // code sections are empty), then, for what it does not name, the file's own dynamic
        // symbols.
        let vaddrs: Vec<u64> = offsets
            .iter()
            .map(|o| elf.facts.file_offset_to_vaddr(*o).unwrap_or(u64::MAX))
            .collect();
        let mut f = self
            .symbolize_debug_file(dbg, &vaddrs, elf.dwarf)
            .unwrap_or_else(|e| {
                tracing::debug!("{e}");
                vec![Vec::new(); offsets.len()]
            });
        tracing::debug!(file = elf.name, addresses = offsets.len(), elapsed = ?t.elapsed(), "symbolized with its debug file");
        if f.iter().any(Vec::is_empty) {
            let own = self
                .symbolize_elf(&elf.path, offsets, false)
                .unwrap_or_default();
            for (a, b) in f.iter_mut().zip(own) {
                if a.is_empty() {
                    *a = b;
                }
            }
        }
        f
    }
}

fn frames_or_unnamed(f: Vec<Frame>) -> Symbol {
    if f.is_empty() {
        Symbol::Unnamed
    } else {
        Symbol::Frames(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// File 0 is this test binary (DWARF of its own); process 1 has a perf map, process 2's
    /// is refused.
    struct Fake {
        abort: bool,
        exe: Option<perfpy_process::elf::ElfFile>,
    }

    impl Fake {
        fn new(abort: bool) -> Self {
            let exe = std::fs::File::open("/proc/self/exe").unwrap();
            Fake {
                abort,
                exe: perfpy_process::elf::read_file(&exe).ok(),
            }
        }
    }

    impl Sources for Fake {
        fn elf(&self, file: u32) -> Option<ElfSource<'_>> {
            (file == 0).then_some(())?;
            Some(ElfSource {
                name: "exe",
                path: "/proc/self/exe".into(),
                debug: None,
                facts: &self.exe.as_ref()?.facts,
                dwarf: true,
            })
        }
        fn perf_map(&self, process: u32) -> Result<PerfMap, SymbolizeError> {
            match process {
                1 => Ok(PerfMap::parse(
                    b"1000 100 py::Shape.area:/app/shapes.py\n2000 10 [jit] stub\n",
                )),
                _ => Err(SymbolizeError::PerfMap {
                    pid: process,
                    reason: "it is not a regular file".into(),
                }),
            }
        }
        fn aborted(&self) -> bool {
            self.abort
        }
    }

    #[test]
    fn anonymous_addresses_are_named_by_their_process_perf_map() {
        let locs = [
            Location::Anon {
                process: 1,
                addr: 0x1010,
            },
            Location::Anon {
                process: 1,
                addr: 0x2004,
            },
            Location::Anon {
                process: 1,
                addr: 0x3000,
            },
            Location::Anon {
                process: 2,
                addr: 0x1010,
            },
            Location::File {
                file: 7,
                offset: 0x10,
            },
        ];
        let s = Symbolizer::new().symbolize(&locs, &Fake::new(false));
        assert_eq!(
            s.symbols,
            [
                Symbol::Python {
                    qualname: "Shape.area".into(),
                    file: "/app/shapes.py".into()
                },
                Symbol::Generated("[jit] stub".into()),
                Symbol::Unnamed,
                Symbol::Unnamed,
                Symbol::Unnamed,
            ]
        );
        assert_eq!(s.refused_perf_maps.len(), 1);
        assert_eq!(s.refused_perf_maps[0].0, 2);
        assert!(!s.cut_short);
    }

    #[test]
    fn a_signal_skips_the_batches_not_started() {
        let locs = [
            Location::Kernel(0xffff_ffff_8100_0000),
            Location::File { file: 3, offset: 0 },
        ];
        let s = Symbolizer::new().symbolize(&locs, &Fake::new(true));
        assert_eq!(s.symbols, [Symbol::Skipped, Symbol::Skipped]);
        assert!(s.cut_short);
    }

    #[test]
    fn file_offsets_are_named_with_their_lines() {
        // A function of this test binary, by its file offset: named with file and line; an
        // offset no symbol covers, unnamed.
        let here = file_offsets_are_named_with_their_lines as *const () as usize as u64;
        let maps = perfpy_process::proc::maps(std::process::id()).unwrap();
        let m = maps
            .iter()
            .find(|m| m.start <= here && here < m.end)
            .unwrap();
        let locs = [
            Location::File {
                file: 0,
                offset: here - m.start + m.offset,
            },
            Location::File {
                file: 0,
                offset: u64::MAX / 2,
            },
        ];
        let s = Symbolizer::new().symbolize(&locs, &Fake::new(false));
        let Symbol::Frames(f) = &s.symbols[0] else {
            panic!("{:?}", s.symbols[0]);
        };
        let f = f.last().unwrap();
        assert!(
            f.function
                .contains("file_offsets_are_named_with_their_lines"),
            "{f:?}"
        );
        assert!(
            f.file.as_deref().unwrap_or("").ends_with("locations.rs"),
            "{f:?}"
        );
        assert_eq!(s.symbols[1], Symbol::Unnamed);
    }
}
