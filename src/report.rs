//! From the aggregated profile and the resolved locations to what the writers print: stacks as
//! users read them, with their labels.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::files::Files;
use crate::process::Process;
use crate::profile::{FrameKey, Profile};
use crate::symbols::{Kind, Resolved};

/// Where a sample's Python frames came from (the `frames_from` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramesFrom {
    /// The eBPF walker.
    Ebpf,
    /// Perf trampolines (perf maps).
    Trampoline,
    /// Both: the walker, with trampoline frames of the same stack dropped for its own.
    EbpfAndTrampoline,
    /// No Python frame: native (and kernel) frames only.
    Native,
}

impl FramesFrom {
    pub fn of(ebpf: bool, trampoline: bool) -> FramesFrom {
        match (ebpf, trampoline) {
            (true, true) => FramesFrom::EbpfAndTrampoline,
            (true, false) => FramesFrom::Ebpf,
            (false, true) => FramesFrom::Trampoline,
            (false, false) => FramesFrom::Native,
        }
    }

    /// The label's value, as documented in docs/usage.md.
    pub fn label(self) -> &'static str {
        match self {
            FramesFrom::Ebpf => "ebpf",
            FramesFrom::Trampoline => "trampoline",
            FramesFrom::EbpfAndTrampoline => "ebpf+trampoline",
            FramesFrom::Native => "native",
        }
    }

    pub fn python(self) -> bool {
        self != FramesFrom::Native
    }

    pub fn ebpf(self) -> bool {
        matches!(self, FramesFrom::Ebpf | FramesFrom::EbpfAndTrampoline)
    }

    pub fn trampoline(self) -> bool {
        matches!(self, FramesFrom::Trampoline | FramesFrom::EbpfAndTrampoline)
    }
}

pub struct Sample {
    /// Location indices, leaf first.
    pub locs: Vec<u32>,
    pub count: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub thread: String,
    pub frames_from: FramesFrom,
    pub python_version: Option<String>,
    pub container_id: Option<String>,
    /// File id of its process's executable (see `Process::main_file`).
    pub main_file: Option<u32>,
}

pub struct Report {
    pub locations: Vec<FrameKey>,
    pub resolved: Vec<Resolved>,
    pub samples: Vec<Sample>,
    pub period_ns: u64,
    pub start: SystemTime,
    pub duration: Duration,
    /// Per file id: (path, build id).
    pub files: Vec<(String, Option<Vec<u8>>)>,
    pub command: String,
}

/// Builds the report. Unless `keep_interpreter` is set, CPython's own native frames (the
/// evaluation loop, call machinery, builtins) are left out of stacks that have Python frames, as
/// py-spy does: the Python function is then the leaf while it runs bytecode, and C extensions,
/// libc and the kernel stay in place under their Python caller.
pub fn build(
    profile: &Profile,
    resolved: Vec<Resolved>,
    procs: &HashMap<u32, &Process>,
    files: &Files,
    keep_interpreter: bool,
) -> (Vec<Sample>, Vec<Resolved>) {
    let mut samples = Vec::with_capacity(profile.counts.len());
    for (key, count) in &profile.counts {
        let stack = &profile.stacks[key.stack as usize];
        let has_trampoline = stack
            .iter()
            .any(|l| resolved[*l as usize].kind == Kind::Python);
        let has_ebpf = stack
            .iter()
            .any(|l| resolved[*l as usize].kind == Kind::PythonEbpf);
        let has_python = has_trampoline || has_ebpf;
        let locs: Vec<u32> = if has_python && !keep_interpreter {
            stack
                .iter()
                .copied()
                .filter(|l| resolved[*l as usize].kind != Kind::Native { interpreter: true })
                .collect()
        } else {
            stack.to_vec()
        };
        let proc = procs.get(&key.proc);
        let (pid, mut comm, mut thread) = match proc {
            Some(p) => (
                p.pid,
                p.comm.clone(),
                p.threads.get(&key.tid).cloned().unwrap_or_default(),
            ),
            None => (0, String::new(), String::new()),
        };
        // A thread or process gone before its name was read still gets names: an empty label
        // value would read as no label at all.
        if comm.is_empty() {
            comm = proc
                .and_then(|p| p.threads.values().find(|n| !n.is_empty()).cloned())
                .unwrap_or_else(|| format!("pid-{pid}"));
        }
        if thread.is_empty() {
            thread = comm.clone();
        }
        samples.push(Sample {
            locs,
            count: *count,
            pid,
            tid: key.tid,
            comm,
            thread,
            frames_from: FramesFrom::of(has_ebpf, has_trampoline),
            python_version: proc.and_then(|p| p.python_version.map(|v| v.to_string())),
            container_id: proc.and_then(|p| p.container_id.clone()),
            main_file: proc.and_then(|p| p.main_file).map(|(_, f)| f),
        });
    }
    let _ = files;
    // Deterministic output: heaviest first.
    samples.sort_by(|a, b| b.count.cmp(&a.count).then(a.locs.cmp(&b.locs)));
    (samples, resolved)
}

/// What Python frames carry as line: py-spy's `--function` and `--nolineno`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Lines {
    /// The line running (the default).
    #[default]
    Current,
    /// The function's first line: one box per function in a flamegraph.
    Function,
    /// None at all.
    None,
}

/// Applies `mode` to the Python frames of `resolved` (locations of `profile`). Frames the
/// eBPF walker named carry their function's first line; frames named by a perf map have none.
pub fn set_lines(resolved: &mut [Resolved], profile: &Profile, mode: Lines) {
    if mode == Lines::Current {
        return;
    }
    for (r, key) in resolved.iter_mut().zip(&profile.locations) {
        if !matches!(r.kind, Kind::Python | Kind::PythonEbpf) {
            continue;
        }
        let first = match key {
            FrameKey::Py { func, .. } => profile
                .py_functions
                .get(*func as usize)
                .map(|f| f.first_line),
            _ => None,
        };
        for f in &mut r.frames {
            f.line = match mode {
                Lines::Function => first,
                _ => None,
            };
        }
    }
}

/// A frame's display name for text formats: `qualname (file:line)` for Python, the function
/// otherwise.
pub fn display_name(r: &Resolved, inline_index: usize) -> String {
    let f = &r.frames[inline_index];
    match r.kind {
        Kind::Python | Kind::PythonEbpf => match (&f.file, f.line) {
            (Some(file), Some(line)) => format!("{} ({}:{})", f.function, file, line),
            (Some(file), None) => format!("{} ({})", f.function, file),
            _ => f.function.clone(),
        },
        Kind::Kernel => format!("{}_[k]", f.function),
        _ => f.function.clone(),
    }
}
