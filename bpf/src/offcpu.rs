//! Off-CPU records (`--off-cpu`): a profiled thread's wait, taken when it runs again — how long
//! it waited (and how much of it runnable, waiting for a CPU), its kernel stack, user registers
//! and a copy of its user stack (unwound in user space as for CPU samples). Its Python frames
//! come through the walker's ring as a [`crate::PyStack`] with `offcpu` set, of the same thread
//! and time.
//!
//! The records, the map values and their flags are those of `src/bpf/walker.h`, read through
//! the types libbpf-cargo generates from the program's BTF (see [`crate::abi`]): no offset is
//! kept here by hand.

use std::mem::{offset_of, size_of};

use crate::abi::skel::types;

const KSTACK: usize = types::offcpu_sizes::OFFCPU_KSTACK.0 as usize;
pub(crate) const USTACK: usize = types::offcpu_sizes::OFFCPU_USTACK.0 as usize;
/// Where the kernel frames and the user stack copy start in a record.
const KSTACK_AT: usize = offset_of!(types::offcpu_record, kstack);
const USTACK_AT: usize = offset_of!(types::offcpu_record, ustack);
const HEAD: usize = size_of::<types::offcpu_head>();
const _: () = assert!(KSTACK_AT == HEAD && USTACK_AT == HEAD + 8 * KSTACK);

/// The off-CPU ring's size for `ncpus` CPUs: per CPU 2 MiB (room for 128 of the largest
/// records), from 4 to 64 MiB. `PERFPY_TEST_OFFCPU_RING` (bytes; a test hook, see
/// docs/architecture.md) replaces it, so that a test can make the kernel drop records.
pub(crate) fn ring_bytes(ncpus: usize) -> u32 {
    let bytes = match std::env::var("PERFPY_TEST_OFFCPU_RING")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(b) => b.max(4096),
        None => ((ncpus as u32).saturating_mul(2 << 20)).clamp(4 << 20, 64 << 20),
    };
    bytes.next_power_of_two()
}

/// What the off-CPU ring carries.
#[derive(Clone, Debug)]
pub enum OffCpuEvent {
    /// A wait, stacked.
    Wait(OffCpuRecord),
    /// The wait of the last pending [`OffCpuRecord`] of thread `tid`, of which `runq_ns`
    /// runnable, ending at `time_ns`; with `birth`, a new thread's wait for its first CPU (no
    /// record before it: it had not run).
    Resume {
        pid: u32,
        tid: u32,
        time_ns: u64,
        wait_ns: u64,
        runq_ns: u64,
        birth: bool,
    },
}

/// One wait of at least the threshold.
#[derive(Clone, Debug)]
pub struct OffCpuRecord {
    pub pid: u32,
    pub tid: u32,
    /// When the thread ran again (CLOCK_MONOTONIC ns).
    pub time_ns: u64,
    pub wait_ns: u64,
    /// The end of the wait spent runnable, waiting for a CPU: from its wake-up (or, preempted,
    /// all of it) until it ran.
    pub runq_ns: u64,
    /// The task state it left the CPU in: 0 when preempted (still runnable).
    pub state: u32,
    /// Its Python frames were emitted too (a walked process).
    pub has_py: bool,
    /// Stacked as it left the CPU (preempted, a page fault): `wait_ns` comes with the next
    /// [`OffCpuEvent::Resume`] of its thread.
    pub pending: bool,
    /// Kernel frames, leaf first.
    pub kernel: Vec<u64>,
    /// (bp, sp, ip) of user space, as CPU samples carry them.
    pub user_regs: [u64; 3],
    /// The user stack from `sp` on.
    pub stack: Vec<u8>,
}

/// Per thread, the waits shorter than the threshold: counted, not stacked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShortWaits {
    pub count: u64,
    pub ns: u64,
}

/// What the kernel side could not record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuLost {
    /// Waits whose record found the ring full.
    pub records: u64,
    /// Short waits of threads the per-thread table had no room for.
    pub short_threads: u64,
}

/// A wait still going on: a thread off the CPU since `since_ns` (CLOCK_MONOTONIC), after
/// `before_ns` off the CPU in the same system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InProgress {
    pub pid: u32,
    pub tid: u32,
    pub since_ns: u64,
    pub before_ns: u64,
    /// Its wait ended already (at least the threshold long); its system call has not returned.
    pub ended: bool,
    /// Stacked as it left (preempted, a page fault): its record was sent.
    pub stacked: bool,
}

/// An `offcpu_start` map value as a wait in progress.
pub(crate) fn parse_start(v: &[u8]) -> Option<InProgress> {
    let s: types::offcpu_start =
        bytemuck::try_pod_read_unaligned(v.get(..size_of::<types::offcpu_start>())?).ok()?;
    let flag = |f: types::start_flags| s.flags & f.0 != 0;
    Some(InProgress {
        since_ns: s.ts,
        before_ns: s.wait,
        pid: s.pid,
        tid: s.tid,
        ended: flag(types::start_flags::START_WOKEN),
        stacked: flag(types::start_flags::START_PENDING),
    })
}

/// An `offcpu_shorts` entry: (pid, tid) from its key, and its counts.
pub(crate) fn parse_short(key: &[u8], v: &[u8]) -> Option<((u32, u32), ShortWaits)> {
    let key: u64 = bytemuck::try_pod_read_unaligned(key.get(..8)?).ok()?;
    let s: types::offcpu_short =
        bytemuck::try_pod_read_unaligned(v.get(..size_of::<types::offcpu_short>())?).ok()?;
    Some((
        ((key >> 32) as u32, key as u32),
        ShortWaits {
            count: s.count,
            ns: s.ns,
        },
    ))
}

/// A record of the off-CPU ring. The program writes whole heads, kernel stacks and the copied
/// part of the user stack; a record cut short still decodes without panicking (`None` without a
/// whole head; only the bytes that are there).
pub(crate) fn parse(data: &[u8]) -> Option<OffCpuEvent> {
    let h: types::offcpu_head = bytemuck::try_pod_read_unaligned(data.get(..HEAD)?).ok()?;
    let flag = |f: types::offcpu_flags| h.flags & f.0 != 0;
    if flag(types::offcpu_flags::OFFCPU_RESUME) {
        return Some(OffCpuEvent::Resume {
            pid: h.pid,
            tid: h.tid,
            time_ns: h.time,
            wait_ns: h.wait_ns,
            runq_ns: h.runq_ns,
            birth: flag(types::offcpu_flags::OFFCPU_BIRTH),
        });
    }
    let kbytes = (h.kstack_bytes as usize).min(KSTACK * 8);
    let kernel = data
        .get(KSTACK_AT..KSTACK_AT + kbytes / 8 * 8)?
        .chunks_exact(8)
        .map(bytemuck::pod_read_unaligned::<u64>)
        .filter(|&a| a != 0)
        .collect();
    let ubytes = (h.ustack_bytes as usize)
        .min(USTACK)
        .min(data.len().saturating_sub(USTACK_AT));
    Some(OffCpuEvent::Wait(OffCpuRecord {
        pid: h.pid,
        tid: h.tid,
        time_ns: h.time,
        wait_ns: h.wait_ns,
        runq_ns: h.runq_ns.min(h.wait_ns),
        user_regs: [h.bp, h.sp, h.ip],
        state: h.state,
        has_py: flag(types::offcpu_flags::OFFCPU_HAS_PY),
        pending: flag(types::offcpu_flags::OFFCPU_PENDING),
        kernel,
        stack: data.get(USTACK_AT..USTACK_AT + ubytes)?.to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(flags: types::offcpu_flags, kstack_bytes: u32, ustack_bytes: u32) -> Vec<u8> {
        let h = types::offcpu_head {
            pid: 7,
            tid: 8,
            time: 99,
            wait_ns: 5_000_000,
            runq_ns: 1_000_000,
            ip: 0x401000,
            sp: 0x7ff0,
            bp: 0x7ff8,
            state: 1,
            flags: flags.0,
            kstack_bytes,
            ustack_bytes,
        };
        bytemuck::bytes_of(&h).to_vec()
    }

    #[test]
    fn records_decode_through_the_generated_types() {
        let mut b = head(types::offcpu_flags::OFFCPU_HAS_PY, 16, 32);
        assert_eq!(b.len(), 72, "the layout of walker.h");
        let mut k = [0u64; KSTACK];
        k[0] = 0xffff_ffff_8100_0000;
        k[1] = 0xffff_ffff_8100_0010;
        b.extend_from_slice(bytemuck::bytes_of(&k));
        b.extend_from_slice(&[0xaa; 32]);
        let Some(OffCpuEvent::Wait(r)) = parse(&b) else {
            panic!("a wait")
        };
        assert_eq!(
            (r.pid, r.tid, r.time_ns, r.wait_ns, r.runq_ns, r.state),
            (7, 8, 99, 5_000_000, 1_000_000, 1)
        );
        assert_eq!(r.user_regs, [0x7ff8, 0x7ff0, 0x401000]);
        assert!(r.has_py && !r.pending);
        assert_eq!(r.kernel, [0xffff_ffff_8100_0000, 0xffff_ffff_8100_0010]);
        assert_eq!((r.stack.len(), r.stack[0]), (32, 0xaa));
        // A stack longer than the record: only what is there.
        b[68..72].copy_from_slice(&4096u32.to_ne_bytes());
        let Some(OffCpuEvent::Wait(r)) = parse(&b) else {
            panic!("a wait")
        };
        assert_eq!(r.stack.len(), 32);
        let r = head(types::offcpu_flags::OFFCPU_RESUME, 0, 0);
        assert!(matches!(
            parse(&r),
            Some(OffCpuEvent::Resume {
                pid: 7,
                tid: 8,
                time_ns: 99,
                wait_ns: 5_000_000,
                runq_ns: 1_000_000,
                birth: false
            })
        ));
        let flags = types::offcpu_flags::OFFCPU_RESUME.0 | types::offcpu_flags::OFFCPU_BIRTH.0;
        let r = head(types::offcpu_flags(flags), 0, 0);
        assert!(matches!(
            parse(&r),
            Some(OffCpuEvent::Resume { birth: true, .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1200)) {
            if let Some(OffCpuEvent::Wait(r)) = parse(&b) {
                proptest::prop_assert!(USTACK_AT + r.stack.len() <= b.len());
                proptest::prop_assert!(r.runq_ns <= r.wait_ns);
            }
        }
    }

    #[test]
    fn map_values_decode_through_the_generated_types() {
        let s = types::offcpu_start {
            ts: 10,
            wait: 20,
            pid: 7,
            tid: 8,
            flags: types::start_flags::START_WOKEN.0,
            ..Default::default()
        };
        let p = parse_start(bytemuck::bytes_of(&s)).unwrap();
        assert_eq!((p.since_ns, p.before_ns, p.pid, p.tid), (10, 20, 7, 8));
        assert!(p.ended && !p.stacked);
        assert_eq!(parse_start(&bytemuck::bytes_of(&s)[..40]), None);
        let key = (7u64 << 32) | 8;
        let v = types::offcpu_short { count: 3, ns: 900 };
        assert_eq!(
            parse_short(&key.to_ne_bytes(), bytemuck::bytes_of(&v)),
            Some(((7, 8), ShortWaits { count: 3, ns: 900 }))
        );
    }
}
