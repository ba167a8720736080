//! The interface between the eBPF program and user space, as libbpf-cargo generates it.
//!
//! `src/bpf/walker.h` is the only definition of the records, the per-process configuration and
//! their flags: the skeleton's `types` module holds their Rust twins, generated from the
//! program's BTF at every build (`build.rs`), so a field added, moved or retyped in C changes
//! the Rust side with it, and code that names a field that no longer exists stops compiling.
//! This module turns them into the crate's own types: [`decode`] reads a ring record into a
//! [`PyStack`] (through plain-data copies, never past the record's bytes), [`proc_cfg`] fills a
//! process's configuration field by field from its [`Offsets`](crate::Offsets).

use std::mem::size_of;

use bytemuck::{Pod, Zeroable};

use crate::{PyFrameRef, PyProcess, PyStack, WalkerCut};

#[allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    dead_code,
    non_camel_case_types,
    non_snake_case
)]
pub(crate) mod skel {
    include!(concat!(env!("OUT_DIR"), "/walker.skel.rs"));
}

use skel::types;

/// Default of `--max-python-frames`: above CPython's default recursion limit (1,000).
pub const DEFAULT_PY_FRAMES: u32 = types::py_frame_limits::DEFAULT_PY_FRAMES.0;
/// The most Python frames a record can be asked to hold (a 640 KiB record).
pub const MAX_PY_FRAMES_CAP: u32 = types::py_frame_limits::MAX_PY_FRAMES_CAP.0;
/// A frame's flag: the first Python frame run by its C-level `_PyEval_EvalFrameDefault` call.
pub const FRAME_ENTRY: u32 = types::frame_flags::FRAME_ENTRY.0;
pub(crate) const KEEP_CHILDREN: u32 = types::keep_flags::KEEP_CHILDREN.0;
pub(crate) const KEEP_FROM_EXEC: u32 = types::keep_flags::KEEP_FROM_EXEC.0;

/// The fixed part of a ring record; its frames follow.
pub(crate) const HEADER_SIZE: usize = size_of::<types::record>();
pub(crate) const FRAME_SIZE: usize = size_of::<types::pyframe>();

// bytemuck's `Pod` is what lets these be copied from and viewed as bytes without unsafe code at
// each use. Its derive cannot run on generated types, hence the impls; the assertions below
// hold them to its conditions.
// SAFETY: `repr(C)` structs of integers only (`record` ends in an empty array of `pyframe`),
// `Copy` and `'static`; every bit pattern is a valid value, and the size assertions below prove
// there are no padding bytes (a struct without padding is exactly as large as its fields).
unsafe impl Zeroable for types::record {}
// SAFETY: as above.
unsafe impl Pod for types::record {}
// SAFETY: as above.
unsafe impl Zeroable for types::pyframe {}
// SAFETY: as above.
unsafe impl Pod for types::pyframe {}
// SAFETY: as above.
unsafe impl Zeroable for types::proc_cfg {}
// SAFETY: as above.
unsafe impl Pod for types::proc_cfg {}
// SAFETY: as above.
unsafe impl Zeroable for types::kept {}
// SAFETY: as above.
unsafe impl Pod for types::kept {}
// Off-CPU (`--off-cpu`): the ring's records and the maps' values.
// SAFETY: as above (`offcpu_record` ends in arrays of integers).
unsafe impl Zeroable for types::offcpu_head {}
// SAFETY: as above.
unsafe impl Pod for types::offcpu_head {}
// SAFETY: as above.
unsafe impl Zeroable for types::offcpu_record {}
// SAFETY: as above.
unsafe impl Pod for types::offcpu_record {}
// SAFETY: as above.
unsafe impl Zeroable for types::offcpu_start {}
// SAFETY: as above.
unsafe impl Pod for types::offcpu_start {}
// SAFETY: as above.
unsafe impl Zeroable for types::offcpu_short {}
// SAFETY: as above.
unsafe impl Pod for types::offcpu_short {}

// No padding: each size is the sum of its fields' (pid, tid, time, nframes, flags; code,
// instr, first_local, ident, self_class, flags, pad; runtime and 24 offsets; parent, flags).
const _: () = assert!(HEADER_SIZE == 4 + 4 + 8 + 4 + 4);
const _: () = assert!(FRAME_SIZE == 5 * 8 + 2 * 4);
const _: () = assert!(size_of::<types::proc_cfg>() == 8 + 24 * 4);
const _: () = assert!(size_of::<types::kept>() == 2 * 4);
// pid, tid, time, wait_ns, runq_ns, ip, sp, bp, state, flags, kstack_bytes, ustack_bytes; the
// head, kernel frames and user stack; ts, wait, runq, woke, pid, tid, state, flags,
// kstack_bytes, pad and kernel frames; count, ns.
const _: () = assert!(size_of::<types::offcpu_head>() == 2 * 4 + 6 * 8 + 4 * 4);
const _: () = assert!(
    size_of::<types::offcpu_record>()
        == size_of::<types::offcpu_head>()
            + 8 * types::offcpu_sizes::OFFCPU_KSTACK.0 as usize
            + types::offcpu_sizes::OFFCPU_USTACK.0 as usize
);
const _: () = assert!(
    size_of::<types::offcpu_start>()
        == 4 * 8 + 6 * 4 + 8 * types::offcpu_sizes::OFFCPU_KSTACK.0 as usize
);
const _: () = assert!(size_of::<types::offcpu_short>() == 2 * 8);

/// Bytes of a record holding `frames` Python frames.
pub(crate) fn record_bytes(frames: u32) -> u32 {
    (HEADER_SIZE + frames as usize * FRAME_SIZE) as u32
}

/// The Python stack of one ring record. The program writes whole records, but a record cut
/// short still decodes without panicking: `None` without a whole header, and only the frames
/// whose bytes are all there.
pub(crate) fn decode(data: &[u8]) -> Option<PyStack> {
    let head: types::record = bytemuck::try_pod_read_unaligned(data.get(..HEADER_SIZE)?).ok()?;
    let frames = data[HEADER_SIZE..]
        .chunks_exact(FRAME_SIZE)
        .take(head.nframes as usize)
        .map(|b| frame(bytemuck::pod_read_unaligned(b)))
        .collect();
    let flag = |f: types::record_flags| head.flags & f.0 != 0;
    Some(PyStack {
        pid: head.pid,
        tid: head.tid,
        time_ns: head.time,
        frames,
        truncated: if flag(types::record_flags::REC_TRUNCATED) {
            Some(WalkerCut::FrameLimit)
        } else if flag(types::record_flags::REC_LOOP_BUDGET) {
            Some(WalkerCut::LoopBudget)
        } else {
            None
        },
        no_thread_state: flag(types::record_flags::REC_NO_TSTATE),
        read_error: flag(types::record_flags::REC_READ_ERROR),
        offcpu: flag(types::record_flags::REC_OFFCPU),
    })
}

fn frame(f: types::pyframe) -> PyFrameRef {
    PyFrameRef {
        code: f.code,
        instr: f.instr,
        first_local: f.first_local,
        ident: f.ident,
        self_class: f.self_class,
        entry: f.flags & FRAME_ENTRY != 0,
        owner: (f.flags & types::frame_flags::FRAME_OWNER_MASK.0) as u8,
    }
}

/// The program's configuration for a process: its runtime's address and its version's
/// offsets, field by field (no default: a field added to `struct proc_cfg` must be filled here).
pub(crate) fn proc_cfg(p: &PyProcess) -> types::proc_cfg {
    let o = &p.offsets;
    types::proc_cfg {
        runtime: p.runtime,
        runtime_interp_head: o.runtime_interp_head,
        interp_tstate_head: o.interp_tstate_head,
        tstate_next: o.tstate_next,
        tstate_native_tid: o.tstate_native_tid,
        tstate_cframe: o.tstate_cframe,
        tstate_current_frame: o.tstate_current_frame,
        frame_code: o.frame_code,
        frame_instr: o.frame_instr,
        frame_previous: o.frame_previous,
        frame_owner: o.frame_owner,
        frame_is_entry: o.frame_is_entry,
        owned_by_cstack: o.owned_by_cstack,
        tstate_thread_id: o.tstate_thread_id,
        lasti_int: o.lasti_int,
        frame_localsplus: o.frame_localsplus,
        code_name: o.code_name,
        code_filename: o.code_filename,
        // 3.14+: f_executable is a _PyStackRef (tag bits to mask).
        code_tagged: i32::from(p.version.at_least(3, 14)),
        code_nlocals: o.code_nlocals,
        code_cellvars: o.code_cellvars,
        code_cell2arg: o.code_cell2arg,
        cell2arg_entry: o.cell2arg_entry,
        // 2.7: PyInstanceObject's in_class, after the object header.
        instance_class: if p.version.major == 2 { 16 } else { -1 },
        pad: 0,
    }
}

/// The `kept` map's value for a process perfpy targets (no parent) with these `KEEP_*` flags.
pub(crate) fn kept_target(flags: u32) -> types::kept {
    types::kept { parent: 0, flags }
}

/// The kept process that forked this one (0 for a target), from a `kept` map value.
pub(crate) fn kept_parent(value: &[u8]) -> Option<u32> {
    let k: types::kept =
        bytemuck::try_pod_read_unaligned(value.get(..size_of::<types::kept>())?).ok()?;
    Some(k.parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nframes: u32, flags: u32, frames: &[types::pyframe]) -> Vec<u8> {
        let head = types::record {
            pid: 7,
            tid: 8,
            time: 99,
            nframes,
            flags,
            frames: [],
        };
        let mut b = bytemuck::bytes_of(&head).to_vec();
        for f in frames {
            b.extend_from_slice(bytemuck::bytes_of(f));
        }
        b
    }

    fn pyframe(code: u64, ident: u64, flags: u32) -> types::pyframe {
        types::pyframe {
            code,
            ident,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn records_decode_through_the_generated_types() {
        let frames = [
            pyframe(0x1000, 0xabc, FRAME_ENTRY | 3),
            pyframe(0x2000, 1, 0),
        ];
        let b = record(2, types::record_flags::REC_TRUNCATED.0, &frames);
        assert_eq!(b.len(), 24 + 2 * 48, "the layout of walker.h");
        let s = decode(&b).unwrap();
        assert_eq!((s.pid, s.tid, s.time_ns, s.frames.len()), (7, 8, 99, 2));
        assert_eq!(s.truncated, Some(WalkerCut::FrameLimit));
        assert!(s.frames[0].entry && s.frames[0].owner == 3 && !s.frames[1].entry);
        assert_eq!((s.frames[0].code, s.frames[0].ident), (0x1000, 0xabc));
        assert_eq!(s.frames[1].code, 0x2000);
        let s = decode(&record(0, types::record_flags::REC_LOOP_BUDGET.0, &[])).unwrap();
        assert_eq!(s.truncated, Some(WalkerCut::LoopBudget));
        let s = decode(&record(0, types::record_flags::REC_NO_TSTATE.0, &[])).unwrap();
        assert!(s.no_thread_state && !s.read_error && s.truncated.is_none());
    }

    #[test]
    fn a_cut_record_gives_only_its_whole_frames() {
        let frames = [pyframe(1, 0, 0), pyframe(2, 0, 0), pyframe(3, 0, 0)];
        let b = record(3, 0, &frames);
        // Every cut, from an empty record to the whole one: no panic, no frame invented.
        for len in 0..=b.len() {
            match decode(&b[..len]) {
                None => assert!(len < HEADER_SIZE),
                Some(s) => {
                    assert_eq!(s.frames.len(), (len - HEADER_SIZE) / FRAME_SIZE);
                    let codes: Vec<u64> = s.frames.iter().map(|f| f.code).collect();
                    assert_eq!(codes, [1, 2, 3][..s.frames.len()]);
                }
            }
        }
        // A header claiming more frames than the record holds.
        let s = decode(&record(u32::MAX, 0, &frames[..1])).unwrap();
        assert_eq!(s.frames.len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if let Some(s) = decode(&b) {
                proptest::prop_assert!(HEADER_SIZE + s.frames.len() * FRAME_SIZE <= b.len());
            }
        }
    }

    #[test]
    fn the_configuration_is_filled_by_name() {
        let p = PyProcess {
            pid: 1,
            version: perfpy_process::Version::new(3, 12),
            runtime: 0x5000,
            offsets: crate::offsets::V3_12,
        };
        let c = proc_cfg(&p);
        assert_eq!(c.runtime, 0x5000);
        assert_eq!(
            c.interp_tstate_head,
            crate::offsets::V3_12.interp_tstate_head
        );
        assert_eq!(c.owned_by_cstack, 3);
        assert_eq!(c.code_tagged, 0);
        let c = proc_cfg(&PyProcess {
            version: perfpy_process::Version::new(3, 14),
            ..p
        });
        assert_eq!(c.code_tagged, 1);
        let k = kept_target(KEEP_CHILDREN);
        let v = bytemuck::bytes_of(&k);
        assert_eq!(kept_parent(v), Some(0));
        assert_eq!(kept_parent(&v[..4]), None);
    }
}
