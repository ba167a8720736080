//! Off-CPU records (`--off-cpu`): a profiled thread's wait, taken when it runs again — how long
//! it waited, its kernel stack, user registers and a copy of its user stack (unwound in user
//! space as for CPU samples). Its Python frames come through the walker's ring as a
//! [`crate::PyStack`] with `offcpu` set, of the same thread and time.

/// `OFFCPU_KSTACK`, `OFFCPU_USTACK` and the header size in walker.h.
const KSTACK: usize = 64;
pub(crate) const USTACK: usize = 16384;
const HEADER: usize = 64 + 8 * KSTACK;
const OFFCPU_HAS_PY: u32 = 1;
const OFFCPU_PENDING: u32 = 2;
const OFFCPU_RESUME: u32 = 4;

/// What the off-CPU ring carries.
#[derive(Clone, Debug)]
pub enum OffCpuEvent {
    /// A wait, stacked.
    Wait(OffCpuRecord),
    /// The wait of the last pending [`OffCpuRecord`] of thread `tid`.
    Resume { tid: u32, wait_ns: u64 },
}

/// One wait of at least the threshold.
#[derive(Clone, Debug)]
pub struct OffCpuRecord {
    pub pid: u32,
    pub tid: u32,
    /// When the thread ran again (CLOCK_MONOTONIC ns).
    pub time_ns: u64,
    pub wait_ns: u64,
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

const START_WOKEN: u32 = 2;
const START_PENDING: u32 = 4;

/// `struct offcpu_start` (its head) as a wait in progress.
pub(crate) fn parse_start(v: &[u8]) -> Option<InProgress> {
    let u32_at = |o: usize| {
        v.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        v.get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    let flags = u32_at(28)?;
    Some(InProgress {
        since_ns: u64_at(0)?,
        before_ns: u64_at(8)?,
        pid: u32_at(16)?,
        tid: u32_at(20)?,
        ended: flags & START_WOKEN != 0,
        stacked: flags & START_PENDING != 0,
    })
}

pub(crate) fn parse(data: &[u8]) -> Option<OffCpuEvent> {
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    let flags = u32_at(52)?;
    if flags & OFFCPU_RESUME != 0 {
        return Some(OffCpuEvent::Resume {
            tid: u32_at(4)?,
            wait_ns: u64_at(16)?,
        });
    }
    let kbytes = (u32_at(56)? as usize).min(KSTACK * 8);
    let ubytes = (u32_at(60)? as usize)
        .min(USTACK)
        .min(data.len().saturating_sub(HEADER));
    let kernel = (0..kbytes / 8)
        .filter_map(|i| u64_at(64 + 8 * i))
        .filter(|&a| a != 0)
        .collect();
    Some(OffCpuEvent::Wait(OffCpuRecord {
        pending: flags & OFFCPU_PENDING != 0,
        pid: u32_at(0)?,
        tid: u32_at(4)?,
        time_ns: u64_at(8)?,
        wait_ns: u64_at(16)?,
        user_regs: [u64_at(40)?, u64_at(32)?, u64_at(24)?],
        state: u32_at(48)?,
        has_py: u32_at(52)? & OFFCPU_HAS_PY != 0,
        kernel,
        stack: data.get(HEADER..HEADER + ubytes)?.to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_matches_the_c_header() {
        let mut b = vec![0u8; HEADER + 32];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&8u32.to_ne_bytes());
        b[8..16].copy_from_slice(&99u64.to_ne_bytes());
        b[16..24].copy_from_slice(&5_000_000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&0x401000u64.to_ne_bytes()); // ip
        b[32..40].copy_from_slice(&0x7ff0u64.to_ne_bytes()); // sp
        b[40..48].copy_from_slice(&0x7ff8u64.to_ne_bytes()); // bp
        b[48..52].copy_from_slice(&1u32.to_ne_bytes());
        b[52..56].copy_from_slice(&OFFCPU_HAS_PY.to_ne_bytes());
        b[56..60].copy_from_slice(&16u32.to_ne_bytes());
        b[60..64].copy_from_slice(&32u32.to_ne_bytes());
        b[64..72].copy_from_slice(&0xffff_ffff_8100_0000u64.to_ne_bytes());
        b[72..80].copy_from_slice(&0xffff_ffff_8100_0010u64.to_ne_bytes());
        b[HEADER] = 0xaa;
        let Some(OffCpuEvent::Wait(r)) = parse(&b) else {
            panic!("a wait")
        };
        assert_eq!(
            (r.pid, r.tid, r.time_ns, r.wait_ns, r.state),
            (7, 8, 99, 5_000_000, 1)
        );
        assert_eq!(r.user_regs, [0x7ff8, 0x7ff0, 0x401000]);
        assert!(r.has_py);
        assert_eq!(r.kernel.len(), 2);
        assert_eq!((r.stack.len(), r.stack[0]), (32, 0xaa));
        // A stack longer than the record: only what is there.
        b[60..64].copy_from_slice(&4096u32.to_ne_bytes());
        let Some(OffCpuEvent::Wait(r)) = parse(&b) else {
            panic!("a wait")
        };
        assert_eq!(r.stack.len(), 32);
        b[52..56].copy_from_slice(&OFFCPU_RESUME.to_ne_bytes());
        assert!(matches!(
            parse(&b[..64]),
            Some(OffCpuEvent::Resume {
                tid: 8,
                wait_ns: 5_000_000
            })
        ));
    }
}
