//! The merge of a sample's native frames (unwound from the stack copy) with the Python frames
//! the eBPF walker read: a pure function, so that mixed stacks are tested without root or a
//! live interpreter. The collector classifies the native frames (which are perf trampolines,
//! which run the evaluation loop) and names the walker's frames; this decides where each
//! group of Python frames goes, what it replaces, and how the stack is marked cut.

use crate::profile::{Cut, FrameKey};

/// A native frame, innermost first, classified by the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeFrame {
    pub key: FrameKey,
    /// A perf trampoline (3.12+ with `-X perf`): replaced by the walker's frames, if any.
    pub trampoline: bool,
    /// The address is inside the interpreter's evaluation function (its symbol's range).
    pub in_eval: bool,
    /// The frame's stack pointer: its locals lie between it and the next frame's.
    pub sp: u64,
}

/// What the unwinding of the native stack said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NativeStack<'a> {
    pub frames: &'a [NativeFrame],
    /// Every frame's `sp` is known.
    pub sps: bool,
    /// The native stack was cut short (outer frames missing) by this limit.
    pub cut: Option<Cut>,
    /// Did not reach the outermost frame.
    pub incomplete: bool,
    /// Incomplete because the stack copy ended (not the frame limit).
    pub beyond_copy: bool,
}

/// A Python frame of the walker, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// Its name, `None` where the code object could not be read (the frame is left out; its
    /// entry mark still counts).
    pub key: Option<FrameKey>,
    /// The first frame run by a C-level evaluation call: `Some(shim)` where 3.12+ gives the
    /// address of the shim frame under it, a local of that C call (0 where unknown).
    pub entry: Option<u64>,
}

/// The walker's record for the sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyStack<'a> {
    pub frames: &'a [PyFrame],
    /// The walker stopped before the outermost Python frame, at this limit.
    pub cut: Option<Cut>,
}

/// What the merge says besides the frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// The limit that cut the stack (its marker is the last frame pushed).
    pub cut: Option<Cut>,
    /// Some native frame was a perf trampoline that the walker's frames replaced.
    pub trampoline_replaced: bool,
    /// For the statistics: the stack went beyond the native copy, and the walker's frames
    /// completed its Python part.
    pub py_beyond_copy: bool,
    /// For the statistics: the native unwinding stopped short and no walker frames made up.
    pub unwind_incomplete: bool,
    /// Some Python frames were named.
    pub have_py: bool,
}

/// Merges `native` and `py` into `out` (innermost first, appended), ending with a truncation
/// marker where the stack is cut.
///
/// The walker's frames come in groups, one per C-level evaluation call (a group ends at its
/// entry frame). Each group replaces the native frame of the evaluation call that runs it;
/// perf trampolines go (the walker names those frames better). Groups whose evaluation frames
/// the native unwinding did not reach (beyond the stack copy) go at the outer end.
pub fn merge(native: &NativeStack<'_>, py: &PyStack<'_>, out: &mut Vec<FrameKey>) -> Merged {
    let (groups, shims) = groups(py.frames);
    let have_py = !groups.is_empty();
    let mut m = Merged {
        have_py,
        // The walker's frames reach the outermost Python frame whatever the stack copy held
        // (those the unwinding did not reach are added below): only the interpreter's own
        // start-up frames are then missing. Unless the walker itself stopped short.
        cut: if have_py { py.cut } else { native.cut },
        ..Merged::default()
    };
    // Where every group's shim frame is known, the native frame whose stack frame holds it
    // runs the group: exact, even in a stripped interpreter whose evaluation loop has no
    // symbol (Debian's); otherwise the evaluation function's symbol decides.
    let by_shim = !shims.is_empty() && shims.iter().all(|&x| x != 0) && native.sps;
    let mut next = 0;
    for (i, f) in native.frames.iter().enumerate() {
        if have_py {
            if f.trampoline {
                m.trampoline_replaced = true;
                continue;
            }
            let is_eval = if by_shim {
                let lo = f.sp;
                let hi = native.frames.get(i + 1).map_or(0, |n| n.sp);
                shims.get(next).is_some_and(|&x| lo <= x && x < hi)
            } else {
                f.in_eval
            };
            if is_eval && next < groups.len() {
                out.extend_from_slice(&groups[next]);
                next += 1;
                continue;
            }
        }
        out.push(f.key);
    }
    // A stack deeper than the copy whose Python frames come from the walker is complete but
    // for native frames between its outer Python frames (C calling back into Python).
    if have_py && native.beyond_copy {
        m.py_beyond_copy = next < groups.len() && m.cut.is_none();
    } else {
        m.unwind_incomplete = native.incomplete;
    }
    // Python frames whose evaluation frames the native unwinding did not reach.
    for g in &groups[next..] {
        out.extend_from_slice(g);
    }
    if let Some(cut) = m.cut {
        out.push(FrameKey::Truncated(cut));
    }
    m
}

/// The walker's named frames cut into groups (one per evaluation call), with each group's
/// shim address (0 where unknown).
fn groups(frames: &[PyFrame]) -> (Vec<Vec<FrameKey>>, Vec<u64>) {
    let mut groups = Vec::new();
    let mut shims = Vec::new();
    let mut g = Vec::new();
    for f in frames {
        if let Some(k) = f.key {
            g.push(k);
        }
        if let Some(shim) = f.entry {
            groups.push(std::mem::take(&mut g));
            shims.push(shim);
        }
    }
    if !g.is_empty() {
        groups.push(g);
        shims.push(0);
    }
    (groups, shims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Native frames by name: `t` a trampoline, `E` the evaluation loop, other letters plain
    /// C functions (file offsets standing for them).
    fn native(spec: &str) -> Vec<NativeFrame> {
        spec.chars()
            .enumerate()
            .map(|(i, c)| NativeFrame {
                key: FrameKey::File {
                    file: crate::ids::FileId(1),
                    offset: c as u64,
                },
                trampoline: c == 't',
                in_eval: c == 'E',
                sp: 0x1000 + 0x100 * i as u64,
            })
            .collect()
    }

    fn py(func: u32) -> FrameKey {
        FrameKey::Py { func, line: func }
    }

    fn frame(func: u32, entry: Option<u64>) -> PyFrame {
        PyFrame {
            key: Some(py(func)),
            entry,
        }
    }

    /// The merged stack as text: native frames by their letter, Python ones as `pyN`.
    fn show(frames: &[FrameKey]) -> Vec<String> {
        frames
            .iter()
            .map(|k| match k {
                FrameKey::File { offset, .. } => char::from(*offset as u8).to_string(),
                FrameKey::Py { func, .. } => format!("py{func}"),
                FrameKey::Truncated(c) => format!("{c:?}"),
                k => format!("{k:?}"),
            })
            .collect()
    }

    fn run(n: &NativeStack<'_>, p: &PyStack<'_>) -> (Vec<String>, Merged) {
        let mut out = Vec::new();
        let m = merge(n, p, &mut out);
        (show(&out), m)
    }

    fn stack(frames: &[NativeFrame]) -> NativeStack<'_> {
        NativeStack {
            frames,
            sps: true,
            ..Default::default()
        }
    }

    #[test]
    fn without_walker_frames_the_native_stack_stays_whole() {
        let n = native("atEtEm");
        let (s, m) = run(&stack(&n), &PyStack::default());
        assert_eq!(s, ["a", "t", "E", "t", "E", "m"]);
        assert!(!m.have_py && !m.trampoline_replaced);
    }

    /// 3.12 with `-X perf`: each Python call runs through a trampoline between two
    /// evaluation calls; the walker's frames replace both, trampolines go.
    #[test]
    fn trampoline_stack_of_3_12() {
        // leaf C function `a`, eval (py2), trampoline, eval (py1), trampoline, eval (py0), main.
        let n = native("aEtEtEm");
        let p = [frame(2, Some(0)), frame(1, Some(0)), frame(0, Some(0))];
        let (s, m) = run(
            &stack(&n),
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s, ["a", "py2", "py1", "py0", "m"]);
        assert!(m.have_py && m.trampoline_replaced && m.cut.is_none());
    }

    /// 3.11: one evaluation call runs several Python frames (inlined calls): one group for
    /// all of them, in the place of its evaluation frame.
    #[test]
    fn walker_merged_stack_of_3_11() {
        let n = native("kEm");
        let p = [frame(3, None), frame(2, None), frame(1, Some(0))];
        let (s, m) = run(
            &stack(&n),
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s, ["k", "py3", "py2", "py1", "m"]);
        assert!(!m.trampoline_replaced);
    }

    /// `sorted(xs, key=f)`: Python calls C (`sorted`, `c`) which calls back into Python: the
    /// native C frames stay between the two groups.
    #[test]
    fn c_extension_calling_back_into_python() {
        let n = native("EcsEm");
        let p = [frame(9, Some(0)), frame(8, None), frame(7, Some(0))];
        let (s, _) = run(
            &stack(&n),
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s, ["py9", "c", "s", "py8", "py7", "m"]);
    }

    /// With the shims known, the frame whose stack holds the shim runs the group, whatever
    /// the evaluation symbol says (Debian's stripped interpreter has none).
    #[test]
    fn shims_place_groups_without_an_eval_symbol() {
        let mut n = native("xcym");
        for f in &mut n {
            f.in_eval = false;
        }
        // x at sp 0x1000..0x1100 holds shim 0x1010; y at 0x1200..0x1300 holds 0x1250.
        let p = [
            frame(5, Some(0x1010)),
            frame(4, None),
            frame(3, Some(0x1250)),
        ];
        let (s, _) = run(
            &stack(&n),
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s, ["py5", "c", "py4", "py3", "m"]);
        // Without every frame's sp, the symbol decides (here: none, so the groups go outside).
        let no_sps = NativeStack {
            sps: false,
            ..stack(&n)
        };
        let (s, _) = run(
            &no_sps,
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s, ["x", "c", "y", "m", "py5", "py4", "py3"]);
    }

    #[test]
    fn unnamed_frames_are_left_out_but_end_their_group() {
        let n = native("EcEm");
        let p = [
            frame(1, None),
            PyFrame {
                key: None,
                entry: Some(0),
            },
            frame(0, Some(0)),
        ];
        let (s, _) = run(
            &stack(&n),
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s, ["py1", "c", "py0", "m"]);
    }

    /// A stack deeper than the copy: the native unwinding stops inside it, the walker's outer
    /// groups go at the end, and the stack counts as completed by the walker, not cut.
    #[test]
    fn deep_stack_beyond_the_copy_is_completed_by_the_walker() {
        let n = native("aEcE");
        let p: Vec<PyFrame> = (0..100).rev().map(|i| frame(i, Some(0))).collect();
        let ns = NativeStack {
            cut: Some(Cut::StackCopy),
            incomplete: true,
            beyond_copy: true,
            ..stack(&n)
        };
        let (s, m) = run(
            &ns,
            &PyStack {
                frames: &p,
                cut: None,
            },
        );
        assert_eq!(s.len(), 2 + 100);
        assert_eq!(&s[..4], ["a", "py99", "c", "py98"]);
        assert_eq!(s.last().unwrap(), "py0");
        assert_eq!(m.cut, None);
        assert!(m.py_beyond_copy && !m.unwind_incomplete);
    }

    #[test]
    fn truncation_markers() {
        let n = native("aEcE");
        let ns = NativeStack {
            cut: Some(Cut::StackCopy),
            incomplete: true,
            beyond_copy: true,
            ..stack(&n)
        };
        // The walker cut at its frame limit: its marker, not the copy's.
        let p = [frame(1, Some(0)), frame(0, Some(0)), frame(7, Some(0))];
        let (s, m) = run(
            &ns,
            &PyStack {
                frames: &p,
                cut: Some(Cut::PyFrames),
            },
        );
        assert_eq!(s, ["a", "py1", "c", "py0", "py7", "PyFrames"]);
        assert!(!m.py_beyond_copy && !m.unwind_incomplete);
        // No walker frames: the native cut marks the stack, and the unwinding counts as
        // incomplete.
        let (s, m) = run(&ns, &PyStack::default());
        assert_eq!(s, ["a", "E", "c", "E", "StackCopy"]);
        assert!(m.unwind_incomplete);
        // The frame limit: incomplete, not beyond the copy.
        let limit = NativeStack {
            cut: Some(Cut::MaxFrames),
            incomplete: true,
            beyond_copy: false,
            ..stack(&n)
        };
        let (s, m) = run(
            &limit,
            &PyStack {
                frames: &p[..1],
                cut: None,
            },
        );
        assert_eq!(s, ["a", "py1", "c", "E"]);
        assert_eq!(m.cut, None);
        assert!(m.unwind_incomplete);
    }
}
