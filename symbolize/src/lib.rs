//! Turning addresses into frames.
//!
//! * native code: ELF symbols, DWARF file:line and inlined functions, through blazesym, keyed by
//!   *file offset* so that the caller does not need the process any more (a process that exited
//!   during the recording is still symbolized: the caller keeps the file open and hands us a path
//!   such as `/proc/self/fd/N`);
//! * kernel code: `/proc/kallsyms` through blazesym;
//! * code generated at run time and described by a perf map (`/tmp/perf-PID.map`), in particular
//!   CPython's perf trampolines, whose entries read `py::QUALNAME:FILENAME`: see [`perfmap`];
//! * stripped files through their separate debug files: see [`debug_file`].
//!
//! [`Symbolizer::symbolize`] is the stage as the profiler uses it: normalised [`Location`]s
//! in, a [`Symbol`] for each out (see [`locations`]).

pub mod debug_file;
pub mod locations;
pub mod perfmap;

pub use locations::{ElfSource, Location, Sources, Symbol, Symbols};

use std::path::Path;

use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer as Blaze};

/// One frame as a user reads it: a function, and where it is if known.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SymbolizeError {
    #[error("cannot symbolize {path}: {source}; the file may have changed since it was mapped")]
    Elf {
        path: String,
        #[source]
        source: blazesym::Error,
    },
    #[error("cannot read kernel symbols: {0}; run as root or set kernel.kptr_restrict=0")]
    Kernel(#[source] blazesym::Error),
    /// A process's perf map could not be read (the caller reads it, the safe way: it is the
    /// target's file); `reason` says why, as the summary shows it.
    #[error("{reason}")]
    PerfMap { pid: u32, reason: String },
}

/// Symbolizer for native and kernel addresses. Create one per recording: blazesym caches the
/// parsed files inside it, so each file is parsed once whatever the number of addresses.
pub struct Symbolizer {
    inner: Blaze,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let inner = Blaze::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            // Separate debug files are found by the caller, in the root of the process that
            // mapped the file (a container's, a chroot's), by build id or debug link: a search
            // of our own /usr/lib/debug could read a file of the same name from another system.
            .set_debug_dirs(Some::<[&Path; 0]>([]))
            .build();
        Self { inner }
    }

    /// Symbolizes file offsets of the ELF file at `path`. Returns, per offset, its frames
    /// innermost (inlined leaf) first, the function that contains the code last; an empty vector
    /// where the offset is not covered by any symbol. With `dwarf`, debug information (the
    /// file's own or through its debug link) adds source lines and inlined functions, at the
    /// cost of parsing it (tens of ms and MB for a big library); without, the symbol tables
    /// name functions.
    pub fn symbolize_elf(
        &self,
        path: &Path,
        file_offsets: &[u64],
        dwarf: bool,
    ) -> Result<Vec<Vec<Frame>>, SymbolizeError> {
        self.elf(path, Input::FileOffset(file_offsets), dwarf)
    }

    /// Symbolizes virtual addresses (as in the file's symbol table) with the separate debug
    /// file at `path` (found by build id or debug link; its code sections are empty, so file
    /// offsets of the original file mean nothing in it). Same result as
    /// [`Symbolizer::symbolize_elf`].
    pub fn symbolize_debug_file(
        &self,
        path: &Path,
        vaddrs: &[u64],
        dwarf: bool,
    ) -> Result<Vec<Vec<Frame>>, SymbolizeError> {
        self.elf(path, Input::VirtOffset(vaddrs), dwarf)
    }

    /// One blazesym batch over the ELF file at `path`, by file offset or virtual address.
    fn elf(
        &self,
        path: &Path,
        input: Input<&[u64]>,
        dwarf: bool,
    ) -> Result<Vec<Vec<Frame>>, SymbolizeError> {
        let mut elf = Elf::new(path);
        elf.debug_syms = dwarf;
        let syms = self
            .inner
            .symbolize(&Source::Elf(elf), input)
            .map_err(|source| SymbolizeError::Elf {
                path: path.display().to_string(),
                source,
            })?;
        Ok(syms.into_iter().map(frames_of).collect())
    }

    /// Symbolizes kernel addresses with `/proc/kallsyms`.
    pub fn symbolize_kernel(&self, addrs: &[u64]) -> Result<Vec<Vec<Frame>>, SymbolizeError> {
        let kernel = Kernel {
            // vmlinux would add lines, but looking for it on every run costs seconds; the
            // function names are what users read in a CPU profile.
            vmlinux: blazesym::MaybeDefault::None,
            ..Default::default()
        };
        let src = Source::Kernel(kernel);
        let syms = self
            .inner
            .symbolize(&src, Input::AbsAddr(addrs))
            .map_err(SymbolizeError::Kernel)?;
        Ok(syms.into_iter().map(frames_of).collect())
    }
}

fn frames_of(sym: Symbolized<'_>) -> Vec<Frame> {
    let Some(sym) = sym.as_sym() else {
        return Vec::new();
    };
    let loc = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| match ci {
        Some(ci) => (Some(ci.to_path().display().to_string()), ci.line),
        None => (None, None),
    };
    let mut out = Vec::with_capacity(1 + sym.inlined.len());
    // blazesym lists inlined functions outermost first; each carries the location inside
    // itself, and the symbol's own code info is the location inside the outer function.
    for f in sym.inlined.iter().rev() {
        let (file, line) = loc(f.code_info.as_ref());
        out.push(Frame {
            function: f.name.to_string(),
            file,
            line,
        });
    }
    let (file, line) = loc(sym.code_info.as_deref());
    out.push(Frame {
        function: sym.name.to_string(),
        file,
        line,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_symbols_resolve() {
        // The address of a well known kernel function, read from kallsyms, comes back named.
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let addr = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let a = u64::from_str_radix(it.next()?, 16).ok()?;
                let _t = it.next()?;
                (it.next()? == "do_sys_openat2").then_some(a)
            })
            .next();
        let Some(addr) = addr.filter(|a| *a != 0) else {
            panic!("/proc/kallsyms hides addresses: run the tests as root");
        };
        let s = Symbolizer::new();
        let f = s.symbolize_kernel(&[addr + 4]).unwrap();
        assert_eq!(f[0].last().unwrap().function, "do_sys_openat2");
    }

    #[test]
    fn own_executable_symbolizes_with_lines() {
        // This test binary has DWARF: a function of ours must come back with file and line.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let here = own_executable_symbolizes_with_lines as *const () as usize as u64;
        let (start, off) = maps
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                let range = it.next()?;
                let _perms = it.next()?;
                let off = u64::from_str_radix(it.next()?, 16).ok()?;
                let (a, b) = range.split_once('-')?;
                let (a, b) = (
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                );
                (a <= here && here < b).then_some((a, off))
            })
            .unwrap();
        let s = Symbolizer::new();
        let frames = s.symbolize_elf(&exe, &[here - start + off], true).unwrap();
        let f = frames[0].last().unwrap();
        assert!(
            f.function.contains("own_executable_symbolizes_with_lines"),
            "{f:?}"
        );
        assert!(f.file.as_deref().unwrap_or("").ends_with("lib.rs"), "{f:?}");
        assert!(f.line.is_some());
    }
}
