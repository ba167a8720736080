//! Aggregation: frames interned as location keys, stacks interned as lists of location ids,
//! samples counted per (process, thread, stack). Memory grows with the number of *distinct*
//! stacks, not with the length of the recording.

use crate::ids::{FileId, ProcessKey, Tid};
use std::collections::HashMap;

use rustc_hash::FxHashMap;

/// What a frame address is, captured at sample time so that it stays meaningful after the
/// process has changed its mappings or exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKey {
    Kernel(u64),
    /// Code of a mapped file, by file offset (return addresses already moved into the call).
    File {
        file: FileId,
        offset: u64,
    },
    /// Code in anonymous memory of a process (JIT, perf trampolines): named by its perf map.
    Anon {
        proc: ProcessKey,
        addr: u64,
    },
    /// Marks a stack whose outer frames are missing, with the limit that cut them.
    Truncated(Cut),
    /// A Python frame named by the eBPF walker: function (index in `Profile::py_functions`)
    /// and line.
    Py {
        func: u32,
        line: u32,
    },
    /// The root of an off-CPU stack: why it waited (`--off-cpu`).
    Wait(crate::wait::WaitKind),
}

/// The limit that cut a stack short: each says which option raises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cut {
    /// The eBPF walker's frame limit (`--max-python-frames`).
    PyFrames,
    /// The eBPF walker's loop budget (twice `--max-python-frames`).
    PyLoopBudget,
    /// The end of the user stack the kernel copied (`--stack-size`).
    StackCopy,
    /// The native unwinding's frame limit (`--max-frames`).
    MaxFrames,
}

impl Cut {
    pub const ALL: [Cut; 4] = [
        Cut::PyFrames,
        Cut::PyLoopBudget,
        Cut::StackCopy,
        Cut::MaxFrames,
    ];

    /// The root frame of a stack cut by this limit.
    pub fn marker(self) -> &'static str {
        match self {
            Cut::PyFrames => "[truncated: more Python frames than --max-python-frames]",
            Cut::PyLoopBudget => "[truncated: eBPF walker loop budget, raise --max-python-frames]",
            Cut::StackCopy => "[truncated: end of the native stack copy, raise --stack-size]",
            Cut::MaxFrames => "[truncated: more native frames than --max-frames]",
        }
    }

    /// For the summary: where the stacks were cut and what raises the limit.
    pub fn summary(self) -> &'static str {
        match self {
            Cut::PyFrames => "at the eBPF walker's Python frame limit (raise --max-python-frames)",
            Cut::PyLoopBudget => "at the eBPF walker's loop budget (raise --max-python-frames)",
            Cut::StackCopy => "at the native stack copy's end (raise --stack-size, max 65000)",
            Cut::MaxFrames => "at the native frame limit (raise --max-frames)",
        }
    }
}

/// A Python function as the eBPF walker's code reader named it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyFunction {
    pub qualname: String,
    pub filename: String,
    pub first_line: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub proc: ProcessKey,
    pub tid: Tid,
    pub stack: u32,
}

#[derive(Default)]
pub struct Profile {
    location_ids: FxHashMap<FrameKey, u32>,
    pub locations: Vec<FrameKey>,
    stack_ids: FxHashMap<Box<[u32]>, u32>,
    pub stacks: Vec<Box<[u32]>>,
    pub counts: HashMap<SampleKey, u64>,
    pub samples: u64,
    /// Off-CPU nanoseconds per (process, thread, stack) (`--off-cpu`).
    pub offcpu: HashMap<SampleKey, u64>,
    py_function_ids: FxHashMap<PyFunction, u32>,
    pub py_functions: Vec<PyFunction>,
}

impl Profile {
    pub fn py_function(&mut self, f: PyFunction) -> u32 {
        if let Some(id) = self.py_function_ids.get(&f) {
            return *id;
        }
        let id = self.py_functions.len() as u32;
        self.py_functions.push(f.clone());
        self.py_function_ids.insert(f, id);
        id
    }

    pub fn location(&mut self, key: FrameKey) -> u32 {
        if let Some(id) = self.location_ids.get(&key) {
            return *id;
        }
        let id = self.locations.len() as u32;
        self.locations.push(key);
        self.location_ids.insert(key, id);
        id
    }

    /// Interns a stack (location ids, leaf first).
    pub fn stack(&mut self, frames: &[u32]) -> u32 {
        if let Some(id) = self.stack_ids.get(frames) {
            return *id;
        }
        let id = self.stacks.len() as u32;
        let b: Box<[u32]> = frames.into();
        self.stacks.push(b.clone());
        self.stack_ids.insert(b, id);
        id
    }

    /// The id of a location already interned.
    pub fn find_location(&self, key: &FrameKey) -> Option<u32> {
        self.location_ids.get(key).copied()
    }

    /// An off-CPU wait of `ns` nanoseconds on this stack.
    pub fn add_offcpu(&mut self, proc: ProcessKey, tid: Tid, frames: &[u32], ns: u64) {
        let stack = self.stack(frames);
        *self
            .offcpu
            .entry(SampleKey { proc, tid, stack })
            .or_default() += ns;
    }

    /// Forgets the samples, stacks and locations counted so far, for a profile taken interval
    /// by interval (`perfpy agent`): memory then holds one interval. The Python functions stay:
    /// [`FrameKey::Py`] keys refer to them, and names cached by key stay valid.
    pub fn reset_samples(&mut self) {
        self.location_ids.clear();
        self.locations.clear();
        self.stack_ids.clear();
        self.stacks.clear();
        self.counts.clear();
        self.offcpu.clear();
        self.samples = 0;
        // What one busy interval needed is kept; a burst's worth is given back.
        if self.locations.capacity().max(self.stacks.capacity()) > 1 << 16 {
            self.location_ids.shrink_to_fit();
            self.locations.shrink_to_fit();
            self.stack_ids.shrink_to_fit();
            self.stacks.shrink_to_fit();
            self.counts.shrink_to_fit();
            self.offcpu.shrink_to_fit();
        }
    }

    pub fn add(&mut self, proc: ProcessKey, tid: Tid, frames: &[u32]) {
        let stack = self.stack(frames);
        *self
            .counts
            .entry(SampleKey { proc, tid, stack })
            .or_default() += 1;
        self.samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_stacks_are_stored_once() {
        let mut p = Profile::default();
        let a = p.location(FrameKey::Kernel(1));
        let b = p.location(FrameKey::File {
            file: crate::ids::FileId(0),
            offset: 10,
        });
        assert_eq!(p.location(FrameKey::Kernel(1)), a);
        for _ in 0..1000 {
            p.add(crate::ids::ProcessKey(0), crate::ids::Tid(7), &[a, b]);
        }
        p.add(crate::ids::ProcessKey(0), crate::ids::Tid(8), &[a, b]);
        p.add(crate::ids::ProcessKey(0), crate::ids::Tid(7), &[b]);
        assert_eq!(p.stacks.len(), 2);
        assert_eq!(p.counts.len(), 3);
        assert_eq!(
            p.counts[&SampleKey {
                proc: crate::ids::ProcessKey(0),
                tid: crate::ids::Tid(7),
                stack: 0
            }],
            1000
        );
        assert_eq!(p.samples, 1002);
    }
}
