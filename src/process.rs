//! One profiled process as the sampler sees it: its executable mappings (from `/proc/PID/maps`
//! at first sight, then MMAP2 records, re-read when an address falls outside all of them), its
//! threads' names, and what is needed later to name its frames after it is gone (its files stay
//! open in [`Files`], its root directory stays open for the perf map).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use framehop::x86_64::{CacheX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};

use crate::files::{Files, MappedFile, SectionData};
use crate::unwind::TrampolineCache;

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
    pub key: u32,
    pub comm: String,
    pub threads: HashMap<u32, String>,
    /// Executable mappings sorted by start.
    pub maps: Vec<Mapping>,
    pub unwinder: UnwinderX86_64<SectionData>,
    pub cache: CacheX86_64,
    pub trampolines: TrampolineCache,
    /// `/proc/PID/root`, held open so the perf map can be read after the process exits.
    pub root: Option<OwnedFd>,
    /// The pid as the process itself sees it (its perf map is named after this one).
    pub nspid: u32,
    pub alive: bool,
    last_refresh: Option<Instant>,
    /// Uses CPython (some mapping holds the evaluation loop).
    pub is_python: bool,
    pub python_version: Option<String>,
    /// Container id from the cgroup path (docker, containerd, cri-o, podman), if any.
    pub container_id: Option<String>,
}

impl Process {
    pub fn new(pid: u32, key: u32) -> Self {
        let root = File::open(format!("/proc/{pid}/root")).ok().map(OwnedFd::from);
        Self {
            pid,
            key,
            comm: read_comm(pid, pid).unwrap_or_default(),
            threads: HashMap::new(),
            maps: Vec::new(),
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            trampolines: TrampolineCache::default(),
            root,
            nspid: read_nspid(pid).unwrap_or(pid),
            alive: true,
            last_refresh: None,
            is_python: false,
            python_version: None,
            container_id: read_container_id(pid),
        }
    }

    /// A child created by fork: the parent's address space, its own identity.
    pub fn forked(parent: &Process, pid: u32, key: u32) -> Self {
        let mut p = Self::new(pid, key);
        if p.comm.is_empty() {
            p.comm = parent.comm.clone();
        }
        p.maps = parent.maps.clone();
        p.unwinder = parent.unwinder.clone();
        p.is_python = parent.is_python;
        p.python_version = parent.python_version.clone();
        p
    }

    /// Exec: a new address space.
    pub fn exec(&mut self, comm: String) {
        self.comm = comm;
        self.maps.clear();
        self.unwinder = UnwinderX86_64::new();
        self.cache = CacheX86_64::new();
        self.trampolines = TrampolineCache::default();
        self.is_python = false;
        self.python_version = None;
        self.last_refresh = None;
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
        // File-backed (a path, `/memfd:…` included); anonymous code has no file.
        let file = if path.starts_with('/') {
            files.open_for_mapping(self.pid, start, end, path)
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
            if let Some(elf) = &f.elf {
                self.is_python |= elf.is_python_interpreter;
                if elf.is_python_interpreter && self.python_version.is_none() {
                    self.python_version = elf
                        .python_version
                        .clone()
                        .or_else(|| crate::files::python_version_from_name(&f.path));
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
        let Ok(text) = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)) else {
            return false;
        };
        for m in parse_maps(&text) {
            if !m.exec {
                continue;
            }
            let known = self
                .mapping(m.start)
                .is_some_and(|k| k.start == m.start && k.end == m.end && k.pgoff == m.pgoff);
            if !known {
                self.add_mapping(files, m.start, m.end, m.pgoff, &m.path);
            }
        }
        true
    }

    /// The perf map of this process (`/tmp/perf-<pid as the process sees it>.map` in its root).
    pub fn perf_map_path(&self) -> std::path::PathBuf {
        match &self.root {
            Some(fd) => format!("/proc/self/fd/{}/tmp/perf-{}.map", fd.as_raw_fd(), self.nspid).into(),
            None => format!("/tmp/perf-{}.map", self.nspid).into(),
        }
    }

    pub fn thread_name(&mut self, tid: u32) -> String {
        if let Some(n) = self.threads.get(&tid) {
            return n.clone();
        }
        let n = read_comm(self.pid, tid).unwrap_or_else(|| self.comm.clone());
        self.threads.insert(tid, n.clone());
        n
    }
}

pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub exec: bool,
    pub pgoff: u64,
    pub path: String,
}

/// Parses `/proc/PID/maps`. Lines that do not parse are skipped.
pub fn parse_maps(text: &str) -> Vec<MapsLine> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, char::is_whitespace);
            let (a, b) = it.next()?.split_once('-')?;
            let perms = it.next()?;
            let pgoff = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let _ino = it.next()?;
            let path = it.next().unwrap_or("").trim().to_string();
            Some(MapsLine {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                pgoff,
                path,
            })
        })
        .collect()
}

/// The container id in `/proc/PID/cgroup`: the last 64-hex-digit component of the path
/// (`/docker/<id>`, `.../cri-containerd-<id>.scope`, `.../crio-<id>.scope`, `libpod-<id>`).
pub fn read_container_id(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    container_id_from_cgroup(&text)
}

pub fn container_id_from_cgroup(text: &str) -> Option<String> {
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2)?;
        for comp in path.rsplit('/') {
            let comp = comp.trim_end_matches(".scope");
            let id = comp.rsplit(['-', ':']).next().unwrap_or(comp);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(id.to_string());
            }
        }
    }
    None
}

pub fn read_comm(pid: u32, tid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

/// The innermost pid of the process (`NSpid:` in status): its name for itself.
pub fn read_nspid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "55d4c0a00000-55d4c0a01000 r--p 00000000 fe:01 1234 /usr/bin/python3.11\n\
55d4c0a01000-55d4c0c00000 r-xp 00001000 fe:01 1234 /usr/bin/python3.11\n\
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n\
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n\
garbage\n";
        let m = parse_maps(text);
        assert_eq!(m.len(), 4);
        assert!(m[1].exec && m[1].pgoff == 0x1000 && m[1].path == "/usr/bin/python3.11");
        assert!(m[2].exec && m[2].path.is_empty());
        assert_eq!(m[3].path, "[stack]");
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for text in [
            format!("0::/docker/{id}\n"),
            format!("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope\n"),
            format!("0::/system.slice/crio-{id}.scope\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
            format!("12:cpu,cpuacct:/docker/{id}\n0::/\n"),
        ] {
            assert_eq!(container_id_from_cgroup(&text).as_deref(), Some(id), "{text}");
        }
        assert_eq!(container_id_from_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"), None);
        assert_eq!(container_id_from_cgroup("0::/\n"), None);
    }

    #[test]
    fn own_process_maps_and_unwinder_modules() {
        let mut files = Files::default();
        let mut p = Process::new(std::process::id(), 0);
        assert!(p.refresh_maps(&mut files));
        let here = own_process_maps_and_unwinder_modules as *const () as u64;
        let m = p.mapping(here).expect("our own code is mapped");
        let f = m.file.as_ref().expect("file-backed");
        assert!(f.elf.is_some());
        assert_eq!(p.nspid, std::process::id());
    }
}
