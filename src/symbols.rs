//! Symbolization after sampling, every distinct location once: the policy. Which locations are
//! named (not the interpreter's frames the report hides under Python code), the kind of each
//! frame, the labels of what nothing names, names kept across intervals. Naming itself —
//! kernel, files and their debug files, perf maps — is `perfpy_symbolize`'s.

use crate::ids::ProcessKey;
use std::collections::HashMap;

use perfpy_symbolize::perfmap::PerfMap;
use perfpy_symbolize::{ElfSource, Frame, Location, Sources, Symbol, SymbolizeError, Symbolizer};

use crate::files::Files;
use crate::process::Process;
use crate::profile::{FrameKey, Profile};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kernel,
    /// Native code; `interpreter` when it is CPython's own (libpython or the python executable).
    Native {
        interpreter: bool,
    },
    /// A Python function, named by a perf map (trampoline).
    Python,
    /// A Python function named by the eBPF walker (with its line).
    PythonEbpf,
    /// Generated code with a non-Python perf-map name, or nothing known.
    Other,
}

/// What symbolization gives: a name for every location, and the perf maps refused (pid, why).
pub struct Symbolized {
    pub resolved: Vec<Resolved>,
    pub refused_perf_maps: Vec<(u32, String)>,
    /// A signal cut symbolization short: some frames are addresses only.
    pub cut_short: bool,
}

#[derive(Clone, Debug)]
pub struct Resolved {
    /// Leaf (innermost inlined) first.
    pub frames: Vec<Frame>,
    pub kind: Kind,
}

/// Resolves all locations of `profile`. `procs` are all processes of the recording, by key.
///
/// The interpreter's own frames in stacks that have Python frames are left out of the report
/// unless `keep_interpreter` (see `report::build`), so they are not symbolized at all: for a
/// Python program that is most of the work (libpython's DWARF) and memory of symbolization.
pub fn resolve(
    profile: &Profile,
    files: &Files,
    procs: &HashMap<ProcessKey, &Process>,
    keep_interpreter: bool,
) -> Symbolized {
    let out = vec![None; profile.locations.len()];
    resolve_rest(
        profile,
        files,
        procs,
        keep_interpreter,
        out,
        &Symbolizer::new(),
    )
}

/// Resolves the locations of `profile` that `out` (one entry per location) does not name yet:
/// anonymous code by perf maps, the walker's Python frames and markers as they are, then the
/// kernel in one batch and files in one batch each (only the frames the report will show).
fn resolve_rest(
    profile: &Profile,
    files: &Files,
    procs: &HashMap<ProcessKey, &Process>,
    keep_interpreter: bool,
    mut out: Vec<Option<Resolved>>,
    sym: &Symbolizer,
) -> Symbolized {
    let targets = Targets { files, procs };
    let refused = name_anonymous(profile, &targets, &mut out, sym);
    name_as_recorded(profile, &mut out);
    let needed = shown_files(profile, files, &out, keep_interpreter);
    let mut cut_short = name_native(profile, &targets, &needed, &mut out, sym);
    cut_short |= crate::signals::aborted();
    let resolved = out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| one("[unknown]".into(), None, None, Kind::Other)))
        .collect();
    Symbolized {
        resolved,
        refused_perf_maps: refused,
        cut_short,
    }
}

/// The files and processes of the recording, as the symbolizer reads them: files through our
/// own descriptors, perf maps through `Process::perf_map` (the safe opener: they are the
/// targets' files).
struct Targets<'a> {
    files: &'a Files,
    procs: &'a HashMap<ProcessKey, &'a Process>,
}

impl Sources for Targets<'_> {
    fn elf(&self, file: u32) -> Option<ElfSource<'_>> {
        let f = &self.files.list[file as usize];
        Some(ElfSource {
            name: &f.path,
            path: f.fd_path(),
            debug: f.debug_fd_path(),
            facts: f.elf.as_deref()?,
            // CPython's own frames are named from its symbol table: their source lines are of
            // no use to a Python programmer, and libpython's DWARF costs ~15 ms and ~20 MiB.
            dwarf: !is_interpreter_file(f),
        })
    }

    fn perf_map(&self, process: u32) -> Result<PerfMap, SymbolizeError> {
        let Some(p) = self.procs.get(&ProcessKey(process)) else {
            return Ok(PerfMap::default());
        };
        p.perf_map().or_else(|e| {
            tracing::debug!(pid = p.pid, "perf map: {e}");
            // A perf map that is simply not there is the common case (no trampoline).
            if e.contains("no such file") {
                Ok(PerfMap::default())
            } else {
                Err(SymbolizeError::PerfMap {
                    pid: p.pid,
                    reason: e,
                })
            }
        })
    }

    fn aborted(&self) -> bool {
        crate::signals::aborted()
    }
}

/// A location named by one frame.
fn one(function: String, file: Option<String>, line: Option<u32>, kind: Kind) -> Resolved {
    Resolved {
        frames: vec![Frame {
            function,
            file,
            line,
        }],
        kind,
    }
}

/// Anonymous code (JIT, perf trampolines) by the perf map of its process, read once per
/// process. Returns the perf maps refused (pid, why).
fn name_anonymous(
    profile: &Profile,
    targets: &Targets<'_>,
    out: &mut [Option<Resolved>],
    sym: &Symbolizer,
) -> Vec<(u32, String)> {
    let (asked, locs): (Vec<usize>, Vec<Location>) = profile
        .locations
        .iter()
        .enumerate()
        .filter_map(|(i, k)| match *k {
            FrameKey::Anon { proc, addr } if out[i].is_none() => Some((
                i,
                Location::Anon {
                    process: proc.0,
                    addr,
                },
            )),
            _ => None,
        })
        .unzip();
    let named = sym.symbolize(&locs, targets);
    for ((i, loc), symbol) in asked.into_iter().zip(locs).zip(named.symbols) {
        out[i] = Some(match symbol {
            Symbol::Python { qualname, file } => one(qualname, Some(file), None, Kind::Python),
            Symbol::Generated(name) => one(name, None, None, Kind::Other),
            _ => {
                let Location::Anon { addr, .. } = loc else {
                    unreachable!("only anonymous locations were asked for")
                };
                one(format!("[unknown] {addr:#x}"), None, None, Kind::Other)
            }
        });
    }
    named
        .refused_perf_maps
        .into_iter()
        .map(|(key, e)| match e {
            SymbolizeError::PerfMap { pid, reason } => (pid, reason),
            e => (key, e.to_string()),
        })
        .collect()
}

/// What needs no symbolizer: the walker's Python frames, wait kinds and truncation markers.
fn name_as_recorded(profile: &Profile, out: &mut [Option<Resolved>]) {
    for (i, k) in profile.locations.iter().enumerate() {
        match *k {
            FrameKey::Py { func, line } => {
                let f = &profile.py_functions[func as usize];
                // A frame whose code could not be read has no file or line to show.
                let known = !f.filename.is_empty();
                out[i] = Some(one(
                    f.qualname.clone(),
                    known.then(|| f.filename.clone()),
                    known.then_some(line),
                    Kind::PythonEbpf,
                ));
            }
            FrameKey::Wait(w) => out[i] = Some(one(w.frame().into(), None, None, Kind::Other)),
            FrameKey::Truncated(cut) => {
                out[i] = Some(one(cut.marker().into(), None, None, Kind::Other))
            }
            _ => {}
        }
    }
}

/// Which file locations the report will show: all of them in stacks without Python frames,
/// all but the interpreter's in the others (and in off-CPU stacks, whose interpreter frames say
/// whether a wait was for the GIL).
fn shown_files(
    profile: &Profile,
    files: &Files,
    out: &[Option<Resolved>],
    keep_interpreter: bool,
) -> Vec<bool> {
    let mut needed = vec![keep_interpreter; profile.locations.len()];
    if keep_interpreter {
        return needed;
    }
    let is_python = |i: usize| {
        out[i]
            .as_ref()
            .is_some_and(|r| matches!(r.kind, Kind::Python | Kind::PythonEbpf))
    };
    let offcpu: std::collections::HashSet<u32> = profile.offcpu.keys().map(|k| k.stack).collect();
    for (id, stack) in profile.stacks.iter().enumerate() {
        let python = stack.iter().any(|l| is_python(*l as usize)) && !offcpu.contains(&(id as u32));
        for l in stack.iter() {
            let l = *l as usize;
            if let FrameKey::File { file, .. } = profile.locations[l] {
                needed[l] |= !python || !is_interpreter_file(&files.list[file.index()]);
            }
        }
    }
    needed
}

/// Kernel addresses in one batch, code of mapped files in one batch per file; the
/// interpreter's frames the report hides are not symbolized (`[interpreter]`). Returns whether
/// a signal cut it short.
fn name_native(
    profile: &Profile,
    targets: &Targets<'_>,
    needed: &[bool],
    out: &mut [Option<Resolved>],
    sym: &Symbolizer,
) -> bool {
    let mut asked = Vec::new();
    let mut locs = Vec::new();
    for (i, k) in profile.locations.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        match *k {
            FrameKey::Kernel(a) => locs.push(Location::Kernel(a)),
            FrameKey::File { file, offset } if needed[i] => locs.push(Location::File {
                file: file.0,
                offset,
            }),
            FrameKey::File { .. } => {
                out[i] = Some(one(
                    "[interpreter]".into(),
                    None,
                    None,
                    Kind::Native { interpreter: true },
                ));
                continue;
            }
            _ => continue,
        }
        asked.push(i);
    }
    let named = sym.symbolize(&locs, targets);
    for ((i, loc), symbol) in asked.into_iter().zip(locs).zip(named.symbols) {
        out[i] = Some(match loc {
            Location::Kernel(a) => Resolved {
                frames: or_unknown(symbol, || format!("[kernel] {a:#x}")),
                kind: Kind::Kernel,
            },
            Location::File { file, offset } => {
                file_frames(&targets.files.list[file as usize], symbol, offset)
            }
            Location::Anon { .. } => unreachable!("no anonymous location was asked for"),
        });
    }
    named.cut_short
}

/// The frames of a location in `file` as the report shows them.
fn file_frames(file: &crate::files::MappedFile, symbol: Symbol, offset: u64) -> Resolved {
    let short = || {
        file.path
            .rsplit('/')
            .next()
            .unwrap_or(&file.path)
            .trim_matches(|c| c == '[' || c == ']')
            .to_string()
    };
    let skipped = symbol == Symbol::Skipped;
    // Code without a symbol (stripped local functions, hand-written assembly) is named after
    // its file, so that its samples add up in one place.
    let mut frames = or_unknown(symbol, || {
        if skipped {
            format!("[{}] +{offset:#x}", short())
        } else {
            format!("[{}]", short())
        }
    });
    if file.path == "[vdso]" {
        // Its functions are named as libc's that call them (`clock_gettime`): the file
        // tells them apart.
        for f in &mut frames {
            f.file.get_or_insert_with(|| "[vdso]".to_string());
        }
    }
    Resolved {
        frames,
        kind: Kind::Native {
            interpreter: is_interpreter_file(file),
        },
    }
}

/// Names of locations kept from one interval to the next (`perfpy agent`, `perfpy top`): a
/// location named once is not named again, and a process's perf map is read again only when an
/// anonymous address it has not named appears. Keys stay valid across intervals: file ids,
/// process keys and Python function ids are never reused within a session.
pub struct NameCache {
    names: HashMap<FrameKey, (Resolved, u64)>,
    /// Intervals a name is kept unused (and, a tenth of them, the symbolizer's parsed files):
    /// [`NameCache::KEEP_UNUSED`], more
    /// for a consumer that takes many short intervals (`perfpy top` on a terminal).
    pub keep_unused: u64,
    /// Interval number, for [`NameCache::KEEP_UNUSED`].
    generation: u64,
    /// blazesym, with the files it parsed (kallsyms, symbol tables, DWARF): parsing them is
    /// most of the cost of naming a few new addresses (measured: kallsyms and libc's debug
    /// file took seconds per interval when parsed anew). Made anew every
    /// [`NameCache::SYMBOLIZER_INTERVALS`] intervals.
    symbolizer: Option<(Symbolizer, u64)>,
}

impl Default for NameCache {
    fn default() -> NameCache {
        NameCache {
            names: HashMap::new(),
            keep_unused: NameCache::KEEP_UNUSED,
            generation: 0,
            symbolizer: None,
        }
    }
}

/// What one interval's naming did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Incremental {
    /// Locations of the interval named from the cache.
    pub cached: usize,
    /// Locations named now.
    pub named: usize,
    /// Names in the cache after the interval.
    pub kept: usize,
}

impl NameCache {
    /// Names unused for this many intervals are forgotten: memory stays bounded on a machine
    /// whose processes come and go (`-a`), and a long-lived location costs one naming per
    /// this many intervals at most.
    pub const KEEP_UNUSED: u64 = 60;

    /// How many intervals one blazesym instance serves. What it parses (DWARF units, as
    /// addresses in them are looked up) stays until it is dropped: kept for ever, it grew by
    /// ~0.8 MiB a minute of `agent -a` (bench/, 10 minutes); made anew every interval, it cost
    /// twice the CPU. Every 6 intervals: the growth is cut each minute at 10 s intervals.
    /// Scaled with [`NameCache::keep_unused`] (a tenth of it) for consumers of short intervals.
    pub const SYMBOLIZER_INTERVALS: u64 = 6;

    fn symbolizer_intervals(&self) -> u64 {
        (self.keep_unused * Self::SYMBOLIZER_INTERVALS / Self::KEEP_UNUSED).max(1)
    }

    /// Whether a fresh name may stand for later intervals: not a placeholder that another
    /// stack may need named ("[interpreter]"), not an address a perf map did not name (yet).
    fn cacheable(r: &Resolved) -> bool {
        let f = r.frames.first().map(|f| f.function.as_str()).unwrap_or("");
        !(is_placeholder(r) || f.starts_with("[unknown]"))
    }
}

/// An interpreter frame left unnamed (see [`resolve`]).
fn is_placeholder(r: &Resolved) -> bool {
    r.frames
        .first()
        .is_some_and(|f| f.function == "[interpreter]")
}

/// [`resolve`] for one interval of a continuous profile: locations named in earlier intervals
/// come from `cache`, the others are named now and added to it.
pub fn resolve_incremental(
    profile: &Profile,
    files: &Files,
    procs: &HashMap<ProcessKey, &Process>,
    keep_interpreter: bool,
    cache: &mut NameCache,
) -> (Symbolized, Incremental) {
    cache.generation += 1;
    let generation = cache.generation;
    let out: Vec<Option<Resolved>> = profile
        .locations
        .iter()
        .map(|k| {
            cache.names.get_mut(k).map(|(r, used)| {
                *used = generation;
                r.clone()
            })
        })
        .collect();
    let fresh: Vec<bool> = out.iter().map(Option::is_none).collect();
    if cache
        .symbolizer
        .as_ref()
        .is_some_and(|(_, made)| generation - made >= cache.symbolizer_intervals())
    {
        cache.symbolizer = None;
    }
    let (sym, _) = cache
        .symbolizer
        .get_or_insert_with(|| (Symbolizer::new(), generation));
    let symbolized = resolve_rest(profile, files, procs, keep_interpreter, out, sym);
    // Placeholders cost nothing: not counted as named.
    let named = (0..fresh.len())
        .filter(|&i| fresh[i] && !is_placeholder(&symbolized.resolved[i]))
        .count();
    // A naming cut short by a signal left addresses: not names to keep.
    if !symbolized.cut_short {
        for (i, r) in symbolized.resolved.iter().enumerate() {
            if fresh[i] && NameCache::cacheable(r) {
                cache
                    .names
                    .insert(profile.locations[i], (r.clone(), generation));
            }
        }
    }
    let keep = cache.keep_unused;
    cache.names.retain(|_, (_, used)| generation - *used < keep);
    let stats = Incremental {
        cached: fresh.iter().filter(|f| !**f).count(),
        named,
        kept: cache.names.len(),
    };
    (symbolized, stats)
}

/// CPython's own code, and the dynamic loader's: under Python code its frames are the
/// interpreter's thread-local lookups (`__tls_get_addr`) and lazy binding, interpreter overhead
/// rather than user code.
fn is_interpreter_file(file: &crate::files::MappedFile) -> bool {
    let loader = file
        .path
        .rsplit('/')
        .next()
        .is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"));
    loader || file.elf.as_ref().is_some_and(|e| e.is_interpreter)
}

/// The frames of `symbol`, or one frame named `name()` when nothing named it.
fn or_unknown(symbol: Symbol, name: impl FnOnce() -> String) -> Vec<Frame> {
    match symbol {
        Symbol::Frames(f) if !f.is_empty() => f,
        _ => vec![Frame {
            function: name(),
            file: None,
            line: None,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Cut, PyFunction};

    #[test]
    fn a_location_named_once_is_not_named_again() {
        let mut profile = Profile::default();
        let func = profile.py_function(PyFunction {
            qualname: "Shape.area".into(),
            filename: "app.py".into(),
            first_line: 3,
        });
        let keys = [
            FrameKey::Py { func, line: 7 },
            FrameKey::Truncated(Cut::StackCopy),
            // A process we know nothing of: "[unknown] ...", not kept (its perf map may name
            // it later).
            FrameKey::Anon {
                proc: crate::ids::ProcessKey(9),
                addr: 0x1000,
            },
        ];
        let mut cache = NameCache::default();
        let files = Files::default();
        let procs = HashMap::new();
        let interval = |profile: &mut Profile, cache: &mut NameCache| {
            profile.reset_samples();
            let locs: Vec<u32> = keys.iter().map(|k| profile.location(*k)).collect();
            profile.add(crate::ids::ProcessKey(0), crate::ids::Tid(1), &locs);
            let (s, inc) = resolve_incremental(profile, &files, &procs, false, cache);
            assert_eq!(s.resolved[0].frames[0].function, "Shape.area");
            assert_eq!(s.resolved[0].frames[0].line, Some(7));
            assert!(s.resolved[2].frames[0].function.starts_with("[unknown]"));
            inc
        };
        let first = interval(&mut profile, &mut cache);
        assert_eq!((first.named, first.cached, first.kept), (3, 0, 2));
        let second = interval(&mut profile, &mut cache);
        assert_eq!((second.named, second.cached, second.kept), (1, 2, 2));
        // Unused for long enough: forgotten.
        for _ in 0..NameCache::KEEP_UNUSED {
            profile.reset_samples();
            resolve_incremental(&profile, &files, &procs, false, &mut cache);
        }
        assert_eq!(cache.names.len(), 0);
    }

    #[test]
    fn file_frames_are_labelled_by_their_file() {
        // Our own vDSO as a mapped file: a function it names carries the file `[vdso]` (libc
        // has functions of the same name); code nothing names is named after the file.
        use object::{Object, ObjectSymbol};
        let mut files = Files::default();
        let (f, _, _) = crate::files::tests::own_vdso(&mut files);
        let data = std::fs::read(f.fd_path()).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let sym = obj
            .dynamic_symbols()
            .find(|s| s.name() == Ok("__vdso_clock_gettime"))
            .unwrap();
        let (off, vaddr, _) = f.elf.as_ref().unwrap().loads[0];
        let mut profile = Profile::default();
        let keys = [FrameKey::File {
            file: f.id,
            offset: sym.address() - vaddr + off + 1,
        }];
        let locs: Vec<u32> = keys.iter().map(|k| profile.location(*k)).collect();
        profile.add(crate::ids::ProcessKey(0), crate::ids::Tid(1), &locs);
        let s = resolve(&profile, &files, &HashMap::new(), false);
        let named = &s.resolved[0];
        assert!(
            named.frames[0].function.contains("clock_gettime"),
            "{named:?}"
        );
        assert_eq!(named.frames[0].file.as_deref(), Some("[vdso]"));
        assert_eq!(named.kind, Kind::Native { interpreter: false });
        assert!(!s.cut_short);
        // Nothing named it: the file's name; a signal stopped naming first: its offset too.
        let unnamed = file_frames(&f, Symbol::Unnamed, 0x10);
        assert_eq!(unnamed.frames[0].function, "[vdso]");
        let skipped = file_frames(&f, Symbol::Skipped, 0x10);
        assert_eq!(skipped.frames[0].function, "[vdso] +0x10");
    }
}
