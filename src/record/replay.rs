//! Capture and replay: what a recording read from its targets, saved once into a fixture, fed
//! again through the collector into a profile without root, eBPF or a live interpreter.
//!
//! `PERFPY_CAPTURE=DIR perfpy record …` (a debug switch, see `testdata/replay/capture.sh`)
//! writes into DIR, beside the usual output:
//!
//! - `stream.gz`: in the order the collector met them, the ring records (samples with their
//!   registers and user stack copy, mmap, comm, fork, exit), the eBPF walker's records, each
//!   process's executable mappings when they were read from `/proc`, the walker's
//!   registrations, every read of a target's memory (code objects, trampoline code) and, at the
//!   end, the perf maps of processes with anonymous code;
//! - `files.txt`: per mapped file with frames, its copy (in `PERFPY_CAPTURE_FILES`, else
//!   `DIR/files`, named by content so that captures share them) and the path the process
//!   mapped. A copy is the ELF file with zeroes except what is read of it (headers, unwind
//!   tables, symbol tables, notes, the `Py_Version` constant), gzip'd.
//!
//! `perfpy replay DIR` reads it back: the collector gets the same records, its memory reads
//! are answered from the fixture, its files are the reduced copies, and its pids are moved
//! above any real pid (`PID_BASE`) so that nothing of the machine it runs on leaks in.

use crate::ids::ProcessKey;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use object::{Object, ObjectSection, ObjectSymbol};

use crate::files::Files;
use crate::process::Process;
use crate::profile::FrameKey;
use crate::records::{self, Record};

use super::collect::Collector;

const RING: u8 = 1;
const WALKER: u8 = 2;
/// A walker record whose frames carry `self_class` too (captures before it are `WALKER`).
const WALKER_CLASS: u8 = 7;
const MEMORY: u8 = 3;
const MAPS: u8 = 4;
const PERF_MAP: u8 = 5;
const REGISTERED: u8 = 6;

/// Replayed pids are moved above the kernel's largest pid (2^22), so that no file of
/// `/proc` answers for them.
const PID_BASE: u32 = 0x4000_0000;

/// One executable mapping: start, end, file offset, path.
type MapLine = (u64, u64, u64, String);

/// Where the collector reads its targets from.
pub(super) enum Target {
    Live,
    /// Live, and everything read is written to a fixture as well.
    Capture(Box<Capture>),
    Replay(Replayed),
}

impl Target {
    /// Reading the live process (not a replay, nor a capture, which must record every read).
    pub(super) fn is_live(&self) -> bool {
        matches!(self, Target::Live)
    }

    /// `PERFPY_CAPTURE=DIR`: capture into DIR.
    pub(super) fn from_env() -> Result<Self> {
        match std::env::var_os("PERFPY_CAPTURE") {
            Some(dir) => Ok(Target::Capture(Box::new(Capture::create(Path::new(&dir))?))),
            None => Ok(Target::Live),
        }
    }

    /// Reads the executable mappings of `p` (from `/proc` or from the fixture).
    pub(super) fn refresh_maps(&mut self, p: &mut Process, files: &mut Files) -> bool {
        match self {
            Target::Live => p.refresh_maps(files),
            Target::Capture(c) => {
                let read = p.refresh_maps(files);
                if read {
                    c.maps(p);
                }
                read
            }
            Target::Replay(r) => {
                let Some(maps) = r.maps.get_mut(&p.pid).and_then(|q| q.pop_front()) else {
                    return false;
                };
                for (start, end, pgoff, path) in maps {
                    let known = p
                        .mapping(start)
                        .is_some_and(|k| k.start == start && k.end == end && k.pgoff == pgoff);
                    if !known {
                        p.add_mapping(files, start, end, pgoff, &path);
                    }
                }
                true
            }
        }
    }

    pub(super) fn capture(&self) -> Option<&Capture> {
        match self {
            Target::Capture(c) => Some(c),
            _ => None,
        }
    }
}

impl Target {
    /// Reads `pid`'s memory: live, live and written to the capture, or from the capture.
    pub(super) fn read(&self, pid: u32, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        use perfpy_process::{LiveMemory, ReadMemory};
        match self {
            Target::Live => LiveMemory(pid).read(addr, buf),
            Target::Capture(c) => {
                let n = LiveMemory(pid).read(addr, buf);
                let whole = matches!(n, Ok(n) if n == buf.len());
                c.memory(pid, addr, buf.len(), whole.then_some(&*buf));
                n
            }
            Target::Replay(r) => match r.memory.get(&(pid, addr, buf.len())) {
                Some(Some(bytes)) => {
                    buf.copy_from_slice(bytes);
                    Ok(buf.len())
                }
                // A read the recording could not make in full (the replay keeps whole reads).
                _ => Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
            },
        }
    }
}

/// The fixture being written.
pub(super) struct Capture {
    dir: PathBuf,
    /// Where the reduced files go (`PERFPY_CAPTURE_FILES`, else `DIR/files`).
    files: PathBuf,
    stream: RefCell<GzEncoder<std::io::BufWriter<std::fs::File>>>,
    /// Reads already written: (pid, address, length).
    reads: RefCell<HashSet<(u32, u64, usize)>>,
}

impl Capture {
    fn create(dir: &Path) -> Result<Self> {
        let files = match std::env::var_os("PERFPY_CAPTURE_FILES") {
            Some(f) => PathBuf::from(f),
            None => dir.join("files"),
        };
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::create_dir_all(&files))
            .with_context(|| format!("PERFPY_CAPTURE: cannot create {}", dir.display()))?;
        // files.txt names them from the capture's directory.
        let files = std::fs::canonicalize(&files)?;
        let f = std::fs::File::create(dir.join("stream.gz"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            stream: RefCell::new(GzEncoder::new(
                std::io::BufWriter::new(f),
                flate2::Compression::best(),
            )),
            reads: RefCell::default(),
        })
    }

    fn entry(&self, tag: u8, payload: &[u8]) {
        let mut s = self.stream.borrow_mut();
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        // A capture is a debugging aid: a failed write shows when the fixture is read.
        let _ = s.write_all(&head).and_then(|()| s.write_all(payload));
    }

    /// A ring record, once the collector handled it.
    pub(super) fn ring(&self, rec: &[u8]) {
        self.entry(RING, rec);
    }

    pub(super) fn walker(&self, s: &perfpy_bpf::PyStack) {
        let mut b = Vec::with_capacity(32 + s.frames.len() * 42);
        b.extend(s.pid.to_le_bytes());
        b.extend(s.tid.to_le_bytes());
        b.extend(s.time_ns.to_le_bytes());
        b.push(match s.truncated {
            None => 0,
            Some(perfpy_bpf::WalkerCut::FrameLimit) => 1,
            Some(perfpy_bpf::WalkerCut::LoopBudget) => 2,
        });
        b.push(s.no_thread_state as u8);
        b.push(s.read_error as u8);
        for f in &s.frames {
            b.extend(f.code.to_le_bytes());
            b.extend(f.instr.to_le_bytes());
            b.push(f.entry as u8);
            b.push(f.owner);
            b.extend(f.first_local.to_le_bytes());
            b.extend(f.ident.to_le_bytes());
            b.extend(f.self_class.to_le_bytes());
        }
        self.entry(WALKER_CLASS, &b);
    }

    fn memory(&self, pid: u32, addr: u64, len: usize, bytes: Option<&[u8]>) {
        if !self.reads.borrow_mut().insert((pid, addr, len)) {
            return;
        }
        let mut b = Vec::with_capacity(17 + bytes.map_or(0, <[u8]>::len));
        b.extend(pid.to_le_bytes());
        b.extend(addr.to_le_bytes());
        b.extend((len as u32).to_le_bytes());
        b.push(bytes.is_some() as u8);
        b.extend(bytes.unwrap_or_default());
        self.entry(MEMORY, &b);
    }

    fn maps(&self, p: &Process) {
        let mut b = p.pid.to_le_bytes().to_vec();
        for m in &p.maps {
            let path = m.file.as_ref().map_or("//anon", |f| f.path.as_str());
            b.extend(format!("{:x} {:x} {:x} {path}\n", m.start, m.end, m.pgoff).bytes());
        }
        self.entry(MAPS, &b);
    }

    pub(super) fn registered(&self, pid: u32, version: perfpy_process::Version, runtime: u64) {
        let mut b = pid.to_le_bytes().to_vec();
        b.extend([version.major, version.minor]);
        b.extend(runtime.to_le_bytes());
        self.entry(REGISTERED, &b);
    }

    /// Ends the capture: the perf maps and the reduced files.
    pub(super) fn finish(&self, c: &Collector) -> Result<()> {
        for p in c.procs.iter().filter(|p| p.has_anon) {
            if let Ok(bytes) =
                std::fs::read(format!("/proc/{}/root/tmp/perf-{}.map", p.pid, p.nspid))
                    .or_else(|_| std::fs::read(format!("/tmp/perf-{}.map", p.nspid)))
            {
                let mut b = p.pid.to_le_bytes().to_vec();
                b.extend(bytes);
                self.entry(PERF_MAP, &b);
            }
        }
        self.stream.borrow_mut().try_finish()?;
        let with_frames: HashSet<crate::ids::FileId> = c
            .profile
            .locations
            .iter()
            .filter_map(|k| match k {
                FrameKey::File { file, .. } => Some(*file),
                _ => None,
            })
            .collect();
        let mut list = String::new();
        for f in &c.files.list {
            let interpreter = f.elf.as_ref().is_some_and(|e| e.is_interpreter);
            // The vDSO is the replaying machine's; a file without frames is not read (the
            // interpreter's evaluation frames may all have been replaced by Python ones).
            if f.path == "[vdso]" || !(interpreter || with_frames.contains(&f.id)) {
                continue;
            }
            let bytes = std::fs::read(f.fd_path())?;
            let reduced = reduce_elf(&bytes);
            // Named by content: captures of the same file share one copy.
            let mut crc = flate2::Crc::new();
            crc.update(&reduced);
            let base = f.path.rsplit('/').next().unwrap_or("file");
            let name = format!("{base}-{:08x}-{:x}.gz", crc.sum(), reduced.len());
            let to = self.files.join(&name);
            if !to.exists() {
                let mut gz =
                    GzEncoder::new(std::fs::File::create(&to)?, flate2::Compression::best());
                gz.write_all(&reduced)?;
                gz.finish()?;
            }
            let rel = relative(&to, &std::fs::canonicalize(&self.dir)?);
            list.push_str(&format!("{}\t{}\n", rel.display(), f.path));
        }
        std::fs::write(self.dir.join("files.txt"), list)?;
        Ok(())
    }
}

/// `path` from `dir` (both absolute, canonical): `../files/x.gz`.
fn relative(path: &Path, dir: &Path) -> PathBuf {
    let common = path
        .components()
        .zip(dir.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in dir.components().skip(common) {
        rel.push("..");
    }
    rel.extend(path.components().skip(common));
    rel
}

/// Sections the collector and the symbolizer read whole. (The interpreter's `.symtab` too:
/// without it the evaluation function is looked for among the dynamic symbols only, where
/// 3.11's `PyEval_EvalFrameEx` comes first.)
const KEEP: &[&str] = &[
    ".eh_frame",
    ".eh_frame_hdr",
    ".debug_frame",
    ".dynsym",
    ".dynstr",
    ".symtab",
    ".strtab",
    ".gnu_debuglink",
    ".note.gnu.build-id",
    ".shstrtab",
    ".gnu.hash",
    ".hash",
];

/// `bytes` (an ELF file) with zeroes where nothing is read: its headers, the [`KEEP`]
/// sections and `Py_Version` stay. (Code is not read: framehop reads it for Mach-O only.)
fn reduce_elf(bytes: &[u8]) -> Vec<u8> {
    let Ok(elf) = object::read::elf::ElfFile64::<object::Endianness>::parse(bytes) else {
        return bytes.to_vec();
    };
    let mut out = vec![0u8; bytes.len()];
    let mut keep = |start: u64, len: u64| {
        let s = (start as usize).min(bytes.len());
        let e = (start.saturating_add(len) as usize).min(bytes.len());
        out[s..e].copy_from_slice(&bytes[s..e]);
    };
    use object::read::elf::FileHeader;
    let hdr = elf.elf_header();
    let endian = elf.endian();
    keep(0, 64);
    let phoff = hdr.e_phoff(endian);
    keep(
        phoff,
        u64::from(hdr.e_phnum(endian)) * u64::from(hdr.e_phentsize(endian)),
    );
    let shoff = hdr.e_shoff(endian);
    keep(
        shoff,
        u64::from(hdr.e_shnum(endian)) * u64::from(hdr.e_shentsize(endian)),
    );
    // Sections left out and not loaded (DWARF, the interpreter's symbol table) go from the
    // section table too: readers would take their zeroes for contents.
    let mut dropped = Vec::new();
    for s in elf.sections() {
        let name = s.name().unwrap_or_default();
        if KEEP.contains(&name) || name.starts_with(".note") {
            if let Some((off, size)) = s.file_range() {
                keep(off, size);
            }
        } else if s.index().0 != 0
            && matches!(s.flags(), object::SectionFlags::Elf { sh_flags }
                if sh_flags & u64::from(object::elf::SHF_ALLOC) == 0)
        {
            dropped.push(s.index().0);
        }
    }
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if sym.name_bytes() == Ok(b"Py_Version") {
            if let Some(off) = elf
                .sections()
                .find(|s| s.address() <= sym.address() && sym.address() < s.address() + s.size())
                .and_then(|s| Some(s.file_range()?.0 + (sym.address() - s.address())))
            {
                keep(off, 8);
            }
        }
    }
    let entsize = u64::from(hdr.e_shentsize(endian));
    for i in dropped {
        let at = (shoff + i as u64 * entsize) as usize;
        if let Some(h) = out.get_mut(at..at + entsize as usize) {
            h.fill(0);
        }
    }
    out
}

/// A fixture read back: what the collector's reads of its targets return.
pub(super) struct Replayed {
    memory: HashMap<(u32, u64, usize), Option<Vec<u8>>>,
    maps: HashMap<u32, VecDeque<Vec<MapLine>>>,
}

fn fake(pid: u32) -> u32 {
    if pid == 0 {
        0
    } else {
        pid | PID_BASE
    }
}

/// Reads the fixture's entries: (tag, payload).
fn entries(dir: &Path) -> Result<Vec<(u8, Vec<u8>)>> {
    let f = std::fs::File::open(dir.join("stream.gz"))
        .with_context(|| format!("{}: not a perfpy capture", dir.display()))?;
    let mut all = Vec::new();
    GzDecoder::new(f).read_to_end(&mut all)?;
    let mut out = Vec::new();
    let mut rest = &all[..];
    while !rest.is_empty() {
        if rest.len() < 5 {
            bail!("{}: stream.gz ends inside an entry", dir.display());
        }
        let len = u32::from_le_bytes(rest[1..5].try_into()?) as usize;
        let Some(payload) = rest.get(5..5 + len) else {
            bail!("{}: stream.gz ends inside an entry", dir.display());
        };
        out.push((rest[0], payload.to_vec()));
        rest = &rest[5 + len..];
    }
    Ok(out)
}

/// Little-endian reader of an entry's payload.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let Some((a, b)) = self.0.split_first_chunk::<N>() else {
            bail!("replay fixture: entry too short");
        };
        self.0 = b;
        Ok(*a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

fn walker_record(b: &[u8], with_class: bool) -> Result<perfpy_bpf::PyStack> {
    let mut r = Bytes(b);
    let pid = fake(r.u32()?);
    let tid = fake(r.u32()?);
    let time_ns = r.u64()?;
    let truncated = match r.u8()? {
        1 => Some(perfpy_bpf::WalkerCut::FrameLimit),
        2 => Some(perfpy_bpf::WalkerCut::LoopBudget),
        _ => None,
    };
    let no_thread_state = r.u8()? != 0;
    let read_error = r.u8()? != 0;
    let mut frames = Vec::new();
    while !r.0.is_empty() {
        frames.push(perfpy_bpf::PyFrameRef {
            code: r.u64()?,
            instr: r.u64()?,
            entry: r.u8()? != 0,
            owner: r.u8()?,
            first_local: r.u64()?,
            ident: r.u64()?,
            self_class: if with_class { r.u64()? } else { 0 },
        });
    }
    Ok(perfpy_bpf::PyStack {
        pid,
        tid,
        time_ns,
        frames,
        truncated,
        no_thread_state,
        read_error,
        offcpu: false,
    })
}

/// A ring record with its pids moved (see [`PID_BASE`]).
fn moved(rec: Record<'_>) -> Record<'_> {
    match rec {
        Record::Sample(mut s) => {
            s.pid = fake(s.pid);
            s.tid = fake(s.tid);
            Record::Sample(s)
        }
        Record::Mmap(mut m) => {
            m.pid = fake(m.pid);
            m.tid = fake(m.tid);
            Record::Mmap(m)
        }
        Record::Comm {
            pid,
            tid,
            exec,
            comm,
        } => Record::Comm {
            pid: fake(pid),
            tid: fake(tid),
            exec,
            comm,
        },
        Record::Fork { pid, ppid, tid } => Record::Fork {
            pid: fake(pid),
            ppid: fake(ppid),
            tid: fake(tid),
        },
        Record::Exit { pid, tid } => Record::Exit {
            pid: fake(pid),
            tid: fake(tid),
        },
        r => r,
    }
}

/// The reduced files, unpacked into a directory removed when dropped.
struct Unpacked(PathBuf);

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unpack(dir: &Path) -> Result<(Unpacked, HashMap<String, PathBuf>)> {
    let tmp = std::env::temp_dir().join(format!("perfpy-replay-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let tmp = Unpacked(tmp);
    let list = std::fs::read_to_string(dir.join("files.txt"))
        .with_context(|| format!("{}: no files.txt", dir.display()))?;
    let mut paths = HashMap::new();
    for line in list.lines() {
        let Some((name, path)) = line.split_once('\t') else {
            continue;
        };
        let mut bytes = Vec::new();
        GzDecoder::new(std::fs::File::open(dir.join(name))?).read_to_end(&mut bytes)?;
        let to = tmp.0.join(paths.len().to_string());
        std::fs::write(&to, bytes)?;
        paths.insert(path.to_string(), to);
    }
    Ok((tmp, paths))
}

/// Replays the capture in `dir` into `c` (made by the caller without walker, live target or
/// filter): returns the directory holding the unpacked files, to keep while they are read.
pub(super) fn feed(dir: &Path, c: &mut Collector) -> Result<impl Drop> {
    let (tmp, paths) = unpack(dir)?;
    c.files.replay_files = Some(paths);
    let entries = entries(dir)?;
    let mut replayed = Replayed {
        memory: HashMap::new(),
        maps: HashMap::new(),
    };
    for (tag, b) in &entries {
        if *tag == MEMORY {
            let mut r = Bytes(b);
            let (pid, addr, len) = (fake(r.u32()?), r.u64()?, r.u32()? as usize);
            let ok = r.u8()? != 0;
            replayed
                .memory
                .insert((pid, addr, len), ok.then(|| r.0.to_vec()));
        }
    }
    c.target = Target::Replay(replayed);
    let mut perf_maps = Vec::new();
    for (tag, b) in &entries {
        match *tag {
            RING => {
                if let Some(rec) = records::parse(b) {
                    c.handle(moved(rec));
                }
            }
            WALKER | WALKER_CLASS => {
                let s = walker_record(b, *tag == WALKER_CLASS)?;
                if let Some(py) = c.py.as_mut() {
                    py.pending.entry(s.tid).or_default().push_back(s);
                }
            }
            MAPS => {
                let mut r = Bytes(b);
                let pid = fake(r.u32()?);
                let lines = String::from_utf8_lossy(r.0)
                    .lines()
                    .filter_map(|l| {
                        let mut it = l.splitn(4, ' ');
                        let n = |s: Option<&str>| u64::from_str_radix(s?, 16).ok();
                        Some((
                            n(it.next())?,
                            n(it.next())?,
                            n(it.next())?,
                            it.next()?.into(),
                        ))
                    })
                    .collect();
                if let Target::Replay(r) = &mut c.target {
                    r.maps.entry(pid).or_default().push_back(lines);
                }
            }
            REGISTERED => {
                let mut r = Bytes(b);
                let pid = fake(r.u32()?);
                let version = perfpy_process::Version::new(r.u8()?, r.u8()?);
                let runtime = r.u64()?;
                let off = match perfpy_bpf::Offsets::for_version(version) {
                    Some(o) => o,
                    None => {
                        perfpy_bpf::debug_offsets::read(
                            &super::collect::PidMemory(&c.target, pid),
                            runtime,
                            version,
                        )?
                        .offsets
                    }
                };
                if let Some(py) = c.py.as_mut() {
                    py.procs.insert(pid, (off, version));
                }
                c.walked.insert(pid);
            }
            PERF_MAP => {
                let mut r = Bytes(b);
                perf_maps.push((fake(r.u32()?), r.0.to_vec()));
            }
            _ => {}
        }
    }
    for (pid, bytes) in perf_maps {
        let map = perfpy_symbolize::perfmap::PerfMap::parse(&bytes);
        for p in c.procs.iter_mut().filter(|p| p.pid == pid) {
            p.perf_map = Some(Ok(map.clone()));
        }
    }
    Ok(tmp)
}

/// `perfpy replay DIR`: the capture in DIR through the collector into a profile, written in
/// `format` to `out`. Needs no privilege: it reads only DIR.
pub fn run(dir: &Path, format: crate::output::Format, out: &mut dyn Write) -> Result<()> {
    let mut c = Collector::new(None, 1024, false);
    // The walker's records come from the capture.
    c.py = Some(super::collect::PyWalk {
        walker: None,
        reader: perfpy_bpf::CodeReader::default(),
        procs: HashMap::new(),
        pending: HashMap::new(),
        tried: HashSet::new(),
        offcpu_py: HashMap::new(),
    });
    let _files = feed(dir, &mut c)?;
    let procs: HashMap<ProcessKey, &Process> = c.procs.iter().map(|p| (p.key, p)).collect();
    let symbolized = crate::symbols::resolve(&c.profile, &c.files, &procs, false);
    let (samples, resolved) =
        crate::report::build(&c.profile, symbolized.resolved, &procs, &c.files, false);
    let report = crate::report::Report {
        locations: c.profile.locations.clone(),
        resolved,
        samples,
        period_ns: 10_000_000,
        start: std::time::SystemTime::UNIX_EPOCH,
        duration: std::time::Duration::ZERO,
        files: c.report_files(),
        command: format!("perfpy replay {}", dir.display()),
        offcpu: false,
    };
    use crate::output::Format;
    let name = format!("perfpy replay {}", dir.display());
    match format {
        Format::Pprof => crate::output::pprof::write(&report, out)?,
        Format::Collapsed => crate::output::collapsed::write(&report, out)?,
        Format::Flamegraph => crate::output::flamegraph::write(&report, &name, out)?,
        Format::Speedscope => crate::output::speedscope::write(&report, &name, out)?,
    }
    Ok(())
}
