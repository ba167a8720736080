//! One profiled process as the sampler sees it: its executable mappings (from `/proc/PID/maps`
//! at first sight, then MMAP2 records, re-read when an address falls outside all of them), its
//! threads' names, and what is needed later to name its frames after it is gone (its files stay
//! open in [`Files`], its root directory stays open for the perf map).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use framehop::x86_64::{CacheX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};

use perfpy_process::{proc, Version};
use perfpy_symbolize::perfmap::PerfMap;

use crate::files::{Files, MappedFile, SectionData};
use crate::ids::{FileId, ProcessKey, Tid};
use crate::profile::FrameKey;
use crate::unwind::TrampolineCache;

/// The root directory of a process, in which the files it names are opened.
pub enum Root {
    /// Ours (same directory, same mount namespace).
    Ours,
    /// Another one (a container, a chroot, a private /tmp), held open.
    Foreign(OwnedFd),
    /// Not known (the process was gone before it could be opened, or released).
    Unknown,
}

impl Root {
    /// A descriptor to resolve the process's paths in, if its root is known.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        static SLASH: std::sync::OnceLock<Option<File>> = std::sync::OnceLock::new();
        match self {
            Root::Ours => SLASH
                .get_or_init(|| File::open("/").ok())
                .as_ref()
                .map(|f| f.as_fd()),
            Root::Foreign(fd) => Some(fd.as_fd()),
            Root::Unknown => None,
        }
    }
}

#[derive(Clone)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub pgoff: u64,
    /// The file behind the mapping; `None` for anonymous code (JIT, perf trampolines).
    pub file: Option<Arc<MappedFile>>,
}

pub struct Process {
    pub pid: u32,
    /// Distinguishes successive processes that reuse one pid within a recording.
    pub key: ProcessKey,
    pub comm: String,
    pub threads: HashMap<Tid, String>,
    /// Executable mappings sorted by start.
    pub maps: Vec<Mapping>,
    pub unwinder: UnwinderX86_64<SectionData>,
    /// framehop's rule cache (~12 KiB), made at the first unwinding, dropped at `release`.
    pub cache: Option<Box<CacheX86_64>>,
    pub trampolines: TrampolineCache,
    /// Per thread: the native frames under its outermost Python frame (that frame's function),
    /// from its last sample whose unwinding reached the outermost frame. A Python stack deeper
    /// than the stack copy ends with the same frames.
    pub roots: HashMap<u32, (FrameKey, Vec<FrameKey>)>,
    /// Its root directory, in which every file it names is opened (see
    /// `perfpy_inject::target_files`): held open when it is not ours (containers, chroots,
    /// private /tmp) so that the perf map in it can be read after the process exits.
    pub root: Root,
    /// Its user ids while alive: files it writes must be its own.
    pub uids: Vec<u32>,
    /// Some frame of this process is in anonymous code (named by its perf map, if any).
    pub has_anon: bool,
    /// Some stack of this process went through a perf trampoline (for the summary: a
    /// trampoline the eBPF walker did not need).
    pub trampoline_seen: bool,
    /// The perf map as read when the process was released (its root is closed then), or why
    /// it was not read.
    pub perf_map: Option<Result<PerfMap, String>>,
    /// The pid as the process itself sees it (its perf map is named after this one).
    pub nspid: u32,
    pub alive: bool,
    last_refresh: Option<Instant>,
    /// Uses CPython (some mapping holds the evaluation loop).
    pub is_python: bool,
    pub python_version: Option<Version>,
    /// Container id from the cgroup path (docker, containerd, cri-o, podman), if any.
    pub container_id: Option<String>,
    /// The file of its lowest file-backed executable mapping (start, file id): the program's
    /// executable (PIE or not, it is mapped below the libraries), the profile's main file.
    pub main_file: Option<(u64, FileId)>,
    /// The process it was forked from, until it execs: the same memory then, where its code
    /// objects can still be read once it exited.
    pub parent: Option<u32>,
}

impl Process {
    pub fn new(pid: u32, key: ProcessKey) -> Self {
        let root = match File::open(format!("/proc/{pid}/root")) {
            Ok(f) if same_root(pid, &f) => Root::Ours,
            Ok(f) => Root::Foreign(OwnedFd::from(f)),
            Err(_) => Root::Unknown,
        };
        // Read once: its user ids and its pid as it sees itself come from it.
        let status = proc::status(pid).unwrap_or_default();
        Self {
            pid,
            key,
            comm: proc::comm(pid, pid).unwrap_or_default(),
            threads: HashMap::new(),
            maps: Vec::new(),
            unwinder: UnwinderX86_64::new(),
            cache: None,
            trampolines: TrampolineCache::default(),
            roots: HashMap::new(),
            root,
            uids: status.uids,
            has_anon: false,
            trampoline_seen: false,
            perf_map: None,
            nspid: status.nspid.unwrap_or(pid),
            alive: true,
            last_refresh: None,
            is_python: false,
            python_version: None,
            container_id: proc::container_id(pid),
            main_file: None,
            parent: None,
        }
    }

    /// A child created by fork: the parent's address space, its own identity.
    pub fn forked(parent: &Process, pid: u32, key: ProcessKey) -> Self {
        let mut p = Self::new(pid, key);
        if p.comm.is_empty() {
            p.comm = parent.comm.clone();
        }
        p.maps = parent.maps.clone();
        p.unwinder = parent.unwinder.clone();
        p.is_python = parent.is_python;
        p.python_version = parent.python_version;
        p.main_file = parent.main_file;
        p.parent = Some(parent.pid);
        p
    }

    /// Exec: a new address space.
    pub fn exec(&mut self, comm: String) {
        self.comm = comm;
        self.maps.clear();
        self.unwinder = UnwinderX86_64::new();
        self.cache = None;
        self.trampolines = TrampolineCache::default();
        self.roots.clear();
        self.is_python = false;
        self.python_version = None;
        self.last_refresh = None;
        self.main_file = None;
        self.parent = None;
    }

    pub fn mapping(&self, addr: u64) -> Option<&Mapping> {
        let i = self.maps.partition_point(|m| m.start <= addr);
        let m = self.maps.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Adds an executable mapping, replacing what it overlaps.
    pub fn add_mapping(&mut self, files: &mut Files, start: u64, end: u64, pgoff: u64, path: &str) {
        if end <= start {
            return;
        }
        // File-backed (a path, `/memfd:…` included); anonymous code has no file (the kernel
        // names it `//anon` in MMAP records of perf events).
        let file = if path.starts_with('/') && path != "//anon" {
            files.open_for_mapping(self.pid, self.root.fd(), &self.uids, (start, end), path)
        } else if path == "[vdso]" {
            files.vdso(self.pid, start, end)
        } else {
            None
        };
        let overlapping: Vec<u64> = self
            .maps
            .iter()
            .filter(|m| m.start < end && start < m.end)
            .map(|m| m.start)
            .collect();
        if !overlapping.is_empty() {
            for s in &overlapping {
                self.unwinder.remove_module(*s);
            }
            self.maps.retain(|m| !(m.start < end && start < m.end));
        }
        if let Some(f) = &file {
            if self.main_file.map_or(true, |(s, _)| start < s) {
                self.main_file = Some((start, f.id));
            }
            if let Some(elf) = &f.elf {
                self.is_python |= elf.is_interpreter;
                if elf.is_interpreter && self.python_version.is_none() {
                    self.python_version = elf
                        .python_version
                        .or_else(|| Version::from_file_name(&f.path));
                }
                if let Some(bias) = f.bias(start, pgoff) {
                    let s = elf.sections.clone();
                    let info = ExplicitModuleSectionInfo {
                        base_svma: 0,
                        text_svma: s.text.as_ref().map(|t| t.0.clone()),
                        text: s.text.map(|t| t.1),
                        eh_frame_svma: s.eh_frame.as_ref().map(|t| t.0.clone()),
                        eh_frame: s.eh_frame.map(|t| t.1),
                        eh_frame_hdr_svma: s.eh_frame_hdr.as_ref().map(|t| t.0.clone()),
                        eh_frame_hdr: s.eh_frame_hdr.map(|t| t.1),
                        debug_frame: s.debug_frame,
                        got_svma: s.got,
                        stubs_svma: None,
                        stub_helper_svma: None,
                        unwind_info: None,
                        text_segment_svma: None,
                        text_segment: None,
                    };
                    self.unwinder
                        .add_module(Module::new(f.path.clone(), start..end, bias, info));
                }
            }
        }
        let i = self.maps.partition_point(|m| m.start < start);
        self.maps.insert(
            i,
            Mapping {
                start,
                end,
                pgoff,
                file,
            },
        );
    }

    /// Reads the executable mappings from `/proc/PID/maps`, at most every 100 ms. Returns
    /// whether it read them.
    pub fn refresh_maps(&mut self, files: &mut Files) -> bool {
        if !self.alive {
            return false;
        }
        if let Some(t) = self.last_refresh {
            if t.elapsed() < Duration::from_millis(100) {
                return false;
            }
        }
        self.last_refresh = Some(Instant::now());
        let Ok(maps) = proc::maps(self.pid) else {
            return false;
        };
        for m in maps {
            if !m.exec {
                continue;
            }
            let known = self
                .mapping(m.start)
                .is_some_and(|k| k.start == m.start && k.end == m.end && k.pgoff == m.offset);
            if !known {
                self.add_mapping(files, m.start, m.end, m.offset, &m.path);
            }
        }
        true
    }

    /// Frees what only a live process needs (mappings, unwind tables, its root directory) once
    /// it has exited and its last samples are in: with `-a`, thousands of short-lived processes
    /// must not each keep memory and a file descriptor. Its perf map, if its frames need it, is
    /// read now.
    pub fn release(&mut self) {
        if matches!(self.root, Root::Foreign(_)) && self.has_anon {
            self.perf_map = Some(self.read_perf_map());
        }
        if matches!(self.root, Root::Foreign(_)) {
            self.root = Root::Unknown;
        }
        self.maps = Vec::new();
        self.unwinder = UnwinderX86_64::new();
        self.cache = None;
        self.trampolines = TrampolineCache::default();
        self.roots = HashMap::new();
        self.threads.shrink_to_fit();
    }

    /// The perf map of this process (`/tmp/perf-<pid as the process sees it>.map` in its
    /// root): read once, safely (it is the target's file: see `perfpy_inject::target_files`).
    pub fn perf_map(&self) -> Result<PerfMap, String> {
        match &self.perf_map {
            Some(r) => r.clone(),
            None => self.read_perf_map(),
        }
    }

    fn read_perf_map(&self) -> Result<PerfMap, String> {
        use perfpy_inject::target_files::{read_in_root, Rules};
        let Some(root) = self.root.fd() else {
            return Err("its root directory could not be opened while it ran".into());
        };
        let rules = Rules::perf_map(&self.uids);
        read_in_root(
            root,
            &self.perf_map_path(),
            &rules,
            &crate::signals::ABORT_READS,
        )
        .map(|bytes| PerfMap::parse(&bytes))
        .map_err(|e| e.to_string())
    }

    /// The perf map's path as the process names it.
    pub fn perf_map_path(&self) -> std::path::PathBuf {
        format!("/tmp/perf-{}.map", self.nspid).into()
    }

    /// Where `_PyRuntime` (3.7+) or `interp_head` (2.7, 3.6) is in this process: from the
    /// interpreter file's symbols, read once per file (a new process costs no ELF parsing).
    pub fn py_runtime_address(&self) -> Option<u64> {
        self.maps.iter().find_map(|m| {
            let f = m.file.as_ref()?;
            let vaddr = f.elf.as_ref().filter(|e| e.is_interpreter)?.py_runtime?;
            Some(vaddr.wrapping_add(f.bias(m.start, m.pgoff)?))
        })
    }

    /// What naming an interval's frames and labelling its samples needs of this process, for
    /// a thread of its own while sampling goes on (`record::interval`): its identity, names
    /// and perf map (or its root directory, duplicated, to read it in); no mappings or unwind
    /// tables.
    pub fn naming_copy(&self) -> Process {
        let root = match &self.root {
            Root::Ours => Root::Ours,
            Root::Foreign(fd) => fd.try_clone().map_or(Root::Unknown, Root::Foreign),
            Root::Unknown => Root::Unknown,
        };
        Process {
            pid: self.pid,
            key: self.key,
            comm: self.comm.clone(),
            threads: self.threads.clone(),
            maps: Vec::new(),
            unwinder: UnwinderX86_64::new(),
            cache: None,
            trampolines: TrampolineCache::default(),
            roots: HashMap::new(),
            root,
            uids: self.uids.clone(),
            has_anon: self.has_anon,
            trampoline_seen: self.trampoline_seen,
            perf_map: self.perf_map.clone(),
            nspid: self.nspid,
            alive: self.alive,
            last_refresh: None,
            is_python: self.is_python,
            python_version: self.python_version,
            container_id: self.container_id.clone(),
            main_file: self.main_file,
            parent: self.parent,
        }
    }

    pub fn thread_name(&mut self, tid: Tid) -> String {
        if let Some(n) = self.threads.get(&tid) {
            return n.clone();
        }
        let n = proc::comm(self.pid, tid.0).unwrap_or_else(|| self.comm.clone());
        self.threads.insert(tid, n.clone());
        n
    }
}

/// Whether `pid`'s root directory (`root`, opened from `/proc/PID/root`) is ours, in our mount
/// namespace: then its paths are our paths and nothing needs to stay open.
fn same_root(pid: u32, root: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let same =
        |a: std::io::Result<std::fs::Metadata>, b: std::io::Result<std::fs::Metadata>| match (a, b)
        {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
    same(root.metadata(), std::fs::metadata("/"))
        && same(
            std::fs::metadata(format!("/proc/{pid}/ns/mnt")),
            std::fs::metadata("/proc/self/ns/mnt"),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_with_a_file_name_that_is_not_utf8() {
        // File names are bytes, and so is /proc/PID/maps: one library with such a name once
        // made every mapping of the process unreadable (no unwinding, no symbols for it).
        use std::os::unix::ffi::OsStrExt;
        struct Sleeper(std::process::Child);
        impl Drop for Sleeper {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join(std::ffi::OsStr::from_bytes(b"lib\xff.so"));
        let libz = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib64/libz.so.1",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libz");
        std::fs::copy(libz, &lib).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("300")
            .env("LD_PRELOAD", &lib)
            .spawn()
            .unwrap();
        let sleeper = Sleeper(child);
        let pid = sleeper.0.id();
        let name = lib.to_string_lossy().into_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/maps")).unwrap())
            .contains(&name)
        {
            assert!(Instant::now() < deadline, "{name} never mapped");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut files = Files::default();
        let mut p = Process::new(pid, crate::ids::ProcessKey(0));
        assert!(p.refresh_maps(&mut files));
        // The odd library is there, opened (through map_files) and parsed, and so is the rest.
        let odd = p
            .maps
            .iter()
            .find(|m| m.file.as_ref().is_some_and(|f| f.path == name));
        assert!(
            odd.is_some_and(|m| m.file.as_ref().unwrap().elf.is_some()),
            "{name} not among the mappings"
        );
        assert!(p
            .maps
            .iter()
            .any(|m| m.file.as_ref().is_some_and(|f| f.path.ends_with("/sleep"))));
    }

    #[test]
    fn own_process_maps_and_unwinder_modules() {
        let mut files = Files::default();
        let mut p = Process::new(std::process::id(), crate::ids::ProcessKey(0));
        assert!(p.refresh_maps(&mut files));
        let here = own_process_maps_and_unwinder_modules as *const () as u64;
        let m = p.mapping(here).expect("our own code is mapped");
        let f = m.file.as_ref().expect("file-backed");
        assert!(f.elf.is_some());
        assert_eq!(p.nspid, std::process::id());
    }
}
