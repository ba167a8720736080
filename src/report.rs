//! From the aggregated profile and the resolved locations to what the writers print: stacks as
//! users read them, with their labels.

use crate::ids::ProcessKey;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::files::Files;
use crate::process::Process;
use crate::profile::{FrameKey, Profile};
use crate::symbols::{Kind, Resolved};
use crate::wait::{self, WaitKind};

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

#[derive(Clone)]
pub struct Sample {
    /// Location indices, leaf first.
    pub locs: Vec<u32>,
    pub count: u64,
    /// Off-CPU nanoseconds (`--off-cpu`; a sample has CPU samples or off-CPU time, not both).
    pub offcpu_ns: u64,
    /// Why it waited (off-CPU samples).
    pub wait: Option<WaitKind>,
    /// Preempted while waiting for the GIL (`take_gil` in its stack): it did not hold it.
    pub gil_wait: bool,
    pub pid: u32,
    pub tid: crate::ids::Tid,
    pub comm: String,
    pub thread: String,
    pub frames_from: FramesFrom,
    pub python_version: Option<String>,
    pub container_id: Option<String>,
    /// File id of its process's executable (see `Process::main_file`).
    pub main_file: Option<crate::ids::FileId>,
}

#[derive(Clone)]
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
    /// `--off-cpu`: off-CPU and wall values besides the CPU ones.
    pub offcpu: bool,
}

/// Builds the report. Unless `keep_interpreter` is set, CPython's own native frames (the
/// evaluation loop, call machinery, builtins) are left out of stacks that have Python frames, as
/// py-spy does: the Python function is then the leaf while it runs bytecode, and C extensions,
/// libc and the kernel stay in place under their Python caller.
pub fn build(
    profile: &Profile,
    resolved: Vec<Resolved>,
    procs: &HashMap<ProcessKey, &Process>,
    files: &Files,
    keep_interpreter: bool,
) -> (Vec<Sample>, Vec<Resolved>) {
    let mut samples = Vec::with_capacity(profile.counts.len() + profile.offcpu.len());
    let cpu = profile.counts.iter().map(|(k, n)| (k, *n, 0));
    let off = profile.offcpu.iter().map(|(k, ns)| (k, 0, *ns));
    for (key, count, offcpu_ns) in cpu.chain(off) {
        let stack = &profile.stacks[key.stack as usize];
        let wait = (offcpu_ns > 0).then(|| wait_kind(profile, &resolved, stack));
        let has_trampoline = stack
            .iter()
            .any(|l| resolved[*l as usize].kind == Kind::Python);
        let has_ebpf = stack
            .iter()
            .any(|l| resolved[*l as usize].kind == Kind::PythonEbpf);
        let has_python = has_trampoline || has_ebpf;
        let mut locs: Vec<u32> = if has_python && !keep_interpreter {
            stack
                .iter()
                .copied()
                .filter(|l| resolved[*l as usize].kind != Kind::Native { interpreter: true })
                .collect()
        } else {
            stack.to_vec()
        };
        // Off-CPU stacks have their wait kind as root frame.
        if let Some(root) = wait.and_then(|w| profile.find_location(&FrameKey::Wait(w))) {
            if !locs.contains(&root) {
                locs.push(root);
            }
        }
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
        // A thread preempted inside take_gil waited for the GIL; preempted elsewhere in
        // Python code, it kept it.
        let gil_wait = wait == Some(WaitKind::Preempted)
            && wait_kind_of_frames(&resolved, stack) == WaitKind::Gil;
        samples.push(Sample {
            locs,
            count,
            offcpu_ns,
            wait,
            gil_wait,
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
    samples.sort_by(|a, b| {
        (b.count, b.offcpu_ns)
            .cmp(&(a.count, a.offcpu_ns))
            .then(a.locs.cmp(&b.locs))
    });
    (samples, resolved)
}

/// Why an off-CPU stack waited: its root says so when known at recording (preempted, short
/// waits), else its frames' names (see `wait::classify`).
fn wait_kind(profile: &Profile, resolved: &[Resolved], stack: &[u32]) -> WaitKind {
    if let Some(w) = stack
        .iter()
        .find_map(|l| match profile.locations[*l as usize] {
            FrameKey::Wait(w) => Some(w),
            _ => None,
        })
    {
        return w;
    }
    wait_kind_of_frames(resolved, stack)
}

/// Why a stack waited, from its frames' names alone (see `wait::classify`).
fn wait_kind_of_frames(resolved: &[Resolved], stack: &[u32]) -> WaitKind {
    let frames = stack.iter().flat_map(|l| {
        let r = &resolved[*l as usize];
        r.frames.iter().map(move |f| match r.kind {
            Kind::Kernel => wait::Named::Kernel(&f.function),
            Kind::Python | Kind::PythonEbpf => wait::Named::Python,
            _ => wait::Named::Native(&f.function),
        })
    });
    wait::classify(false, frames)
}

/// Which values the text formats (collapsed, flamegraph, speedscope) show: `--sample`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SampleView {
    /// CPU samples (the default without --off-cpu)
    #[default]
    Cpu,
    /// time off the CPU (--off-cpu)
    OffCpu,
    /// CPU and off-CPU time together (the default with --off-cpu)
    Wall,
}

impl Report {
    /// Keeps the chosen values for the text writers: CPU samples as they are; off-CPU or wall
    /// time in microseconds (the period becomes 1 µs, so speedscope's weights stay times).
    pub fn select(&mut self, view: SampleView) {
        if view == SampleView::Cpu {
            self.samples.retain(|s| s.count > 0);
            return;
        }
        let period = self.period_ns;
        for s in &mut self.samples {
            let ns = s.offcpu_ns
                + if view == SampleView::Wall {
                    s.count * period
                } else {
                    0
                };
            s.count = ns / 1000;
        }
        self.samples.retain(|s| s.count > 0);
        self.period_ns = 1000;
    }
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

#[cfg(test)]
impl Sample {
    /// A native-only sample of pid and tid 1, thread "p", for unit tests.
    pub fn for_tests(locs: Vec<u32>, count: u64) -> Sample {
        Sample {
            locs,
            count,
            offcpu_ns: 0,
            wait: None,
            gil_wait: false,
            pid: 1,
            tid: crate::ids::Tid(1),
            comm: "p".into(),
            thread: "p".into(),
            frames_from: FramesFrom::Native,
            python_version: None,
            container_id: None,
            main_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(count: u64, offcpu_ns: u64) -> Sample {
        Sample {
            offcpu_ns,
            wait: (offcpu_ns > 0).then_some(WaitKind::Sleep),
            ..Sample::for_tests(vec![0], count)
        }
    }

    #[test]
    fn the_text_formats_take_the_chosen_value() {
        let r = Report {
            locations: vec![],
            resolved: vec![],
            samples: vec![sample(3, 0), sample(0, 5_000_000)],
            period_ns: 1_000_000,
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_secs(1),
            files: vec![],
            command: String::new(),
            offcpu: true,
        };
        let counts = |v: SampleView| {
            let mut r = r.clone();
            r.select(v);
            (
                r.samples.iter().map(|s| s.count).collect::<Vec<_>>(),
                r.period_ns,
            )
        };
        assert_eq!(counts(SampleView::Cpu), (vec![3], 1_000_000));
        assert_eq!(counts(SampleView::OffCpu), (vec![5000], 1000));
        assert_eq!(counts(SampleView::Wall), (vec![3000, 5000], 1000));
    }
}
