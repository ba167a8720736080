//! Why an off-CPU wait happened (`--off-cpu`), decided from the names of its frames.
//!
//! Frames are looked at from the leaf to the first Python frame: kernel functions say what the
//! kernel waited on, CPython's own functions (symbolized for off-CPU stacks) say what the
//! interpreter waited for. Several may match; the kind is the first of this order that does:
//! preempted (the thread was still runnable when it left: waiting for a CPU), page fault, GIL,
//! lock (a Python lock), GIL (2.7's lock; a condition variable), sleep, network, I/O read, poll,
//! lock (any other futex), other.

/// The kind of a wait: the synthetic root frame of off-CPU stacks and the pprof label `wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitKind {
    Preempted,
    PageFault,
    Gil,
    Lock,
    Sleep,
    Network,
    IoRead,
    Poll,
    Other,
    /// The waits under `--min-block` of a thread, counted but not stacked.
    Short,
}

impl WaitKind {
    pub const ALL: [WaitKind; 10] = [
        WaitKind::Preempted,
        WaitKind::PageFault,
        WaitKind::Gil,
        WaitKind::Lock,
        WaitKind::Sleep,
        WaitKind::Network,
        WaitKind::IoRead,
        WaitKind::Poll,
        WaitKind::Other,
        WaitKind::Short,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            WaitKind::Preempted => "preempted",
            WaitKind::PageFault => "page fault",
            WaitKind::Gil => "GIL",
            WaitKind::Lock => "lock",
            WaitKind::Sleep => "sleep",
            WaitKind::Network => "network",
            WaitKind::IoRead => "I/O read",
            WaitKind::Poll => "poll",
            WaitKind::Other => "other",
            WaitKind::Short => "under --min-block",
        }
    }

    /// The root frame of its stacks.
    pub fn frame(self) -> &'static str {
        match self {
            WaitKind::Preempted => "[off-CPU: preempted]",
            WaitKind::PageFault => "[off-CPU: page fault]",
            WaitKind::Gil => "[off-CPU: GIL]",
            WaitKind::Lock => "[off-CPU: lock]",
            WaitKind::Sleep => "[off-CPU: sleep]",
            WaitKind::Network => "[off-CPU: network]",
            WaitKind::IoRead => "[off-CPU: I/O read]",
            WaitKind::Poll => "[off-CPU: poll]",
            WaitKind::Other => "[off-CPU: other]",
            WaitKind::Short => "[off-CPU: under --min-block]",
        }
    }
}

/// One frame as classification sees it.
pub enum Named<'a> {
    Kernel(&'a str),
    Native(&'a str),
    Python,
}

const PAGE_FAULT: &[&str] = &[
    "exc_page_fault",
    "asm_exc_page_fault",
    "do_user_addr_fault",
    "handle_mm_fault",
    "__handle_mm_fault",
    "filemap_fault",
    "do_swap_page",
];
/// CPython taking the GIL: `take_gil` and, where the compiler inlined it, its callers.
const GIL: &[&str] = &[
    "take_gil",
    "PyEval_RestoreThread",
    "PyEval_AcquireThread",
    "PyEval_AcquireLock",
    "_PyEval_AcquireLock",
    "eval_frame_handle_pending",
    "_Py_HandlePending",
    "_PyThreadState_Attach",
    "drop_gil",
    "PyEval_SaveThread",
    "PyGILState_Ensure",
];
const PY_LOCK: &[&str] = &[
    "PyThread_acquire_lock_timed",
    "acquire_timed",
    "lock_PyThread_acquire_lock",
    "rlock_acquire",
    "_PyMutex_LockTimed",
    "_PyParkingLot_Park",
    "_PySemaphore_Wait",
];
/// 2.7's GIL is a lock taken with `PyThread_acquire_lock` (its `threading` locks go through
/// `lock_PyThread_acquire_lock` first, a Python lock above).
const GIL_27: &[&str] = &["PyThread_acquire_lock"];
/// CPython 3.2+ waits for the GIL on a condition variable (and signals one handing it over):
/// in an interpreter without a symbol table (Debian's), the condition variable calls in libc,
/// with no Python lock function named, say GIL.
const GIL_COND: &[&str] = &[
    "pthread_cond_timedwait",
    "___pthread_cond_timedwait",
    "__pthread_cond_wait_common",
    "pthread_cond_wait",
    "___pthread_cond_wait",
    "pthread_cond_signal",
    "___pthread_cond_signal",
    "__condvar_quiesce_and_switch_g1",
];
const SLEEP_NATIVE: &[&str] = &["pysleep", "time_sleep", "floatsleep"];
const SLEEP: &[&str] = &[
    "do_nanosleep",
    "hrtimer_nanosleep",
    "common_nsleep",
    "__x64_sys_nanosleep",
    "__x64_sys_clock_nanosleep",
];
const NETWORK: &[&str] = &[
    "sk_wait_data",
    "tcp_recvmsg",
    "tcp_recvmsg_locked",
    "inet_csk_accept",
    "inet_accept",
    "inet_wait_for_connect",
    "sk_stream_wait_memory",
    "sk_stream_wait_connect",
    "unix_stream_read_generic",
    "unix_stream_recvmsg",
    "unix_dgram_recvmsg",
    "udp_recvmsg",
    "__skb_wait_for_more_packets",
    "__sys_recvfrom",
    "__sys_accept4",
];
const IO_READ: &[&str] = &[
    "pipe_read",
    "n_tty_read",
    "io_schedule",
    "folio_wait_bit_common",
    "filemap_read",
    "blkdev_read_iter",
    "ksys_read",
    "vfs_read",
];
const POLL: &[&str] = &[
    "do_select",
    "core_sys_select",
    "do_sys_poll",
    "do_poll",
    "do_epoll_wait",
    "ep_poll",
];
const FUTEX: &[&str] = &[
    "futex_wait",
    "futex_wait_queue",
    "__futex_wait",
    "futex_q_lock",
];

/// The kind of a wait of a thread that left the CPU still runnable (`preempted`) or not, with
/// these frames, leaf first.
pub fn classify<'a>(preempted: bool, frames: impl IntoIterator<Item = Named<'a>>) -> WaitKind {
    if preempted {
        return WaitKind::Preempted;
    }
    // Bits in the order of precedence.
    let mut seen = 0u16;
    let order = [
        (PAGE_FAULT, true, WaitKind::PageFault),
        (GIL, false, WaitKind::Gil),
        (PY_LOCK, false, WaitKind::Lock),
        (GIL_27, false, WaitKind::Gil),
        (GIL_COND, false, WaitKind::Gil),
        (SLEEP_NATIVE, false, WaitKind::Sleep),
        (SLEEP, true, WaitKind::Sleep),
        (NETWORK, true, WaitKind::Network),
        (IO_READ, true, WaitKind::IoRead),
        (POLL, true, WaitKind::Poll),
        (FUTEX, true, WaitKind::Lock),
    ];
    for f in frames {
        let (name, kernel) = match f {
            Named::Kernel(n) => (n, true),
            Named::Native(n) => (n, false),
            Named::Python => break,
        };
        for (i, (names, k, _)) in order.iter().enumerate() {
            if *k == kernel && names.contains(&name) {
                seen |= 1 << i;
            }
        }
    }
    order
        .iter()
        .enumerate()
        .find(|(i, _)| seen & (1 << i) != 0)
        .map(|(_, o)| o.2)
        .unwrap_or(WaitKind::Other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Named::*;

    #[test]
    fn kinds_from_frames() {
        let gil = [
            Kernel("futex_wait"),
            Native("pthread_cond_timedwait"),
            Native("take_gil"),
            Native("PyEval_RestoreThread"),
            Native("pysleep"),
            Python,
        ];
        assert_eq!(classify(false, gil), WaitKind::Gil);
        let lock = [
            Kernel("futex_wait"),
            Native("sem_clockwait"),
            Native("PyThread_acquire_lock_timed"),
            Python,
            Native("take_gil"),
        ];
        assert_eq!(classify(false, lock), WaitKind::Lock);
        let gil27 = [
            Kernel("futex_wait"),
            Native("sem_wait"),
            Native("PyThread_acquire_lock"),
            Python,
        ];
        assert_eq!(classify(false, gil27), WaitKind::Gil);
        let lock27 = [
            Kernel("futex_wait"),
            Native("PyThread_acquire_lock"),
            Native("lock_PyThread_acquire_lock"),
            Python,
        ];
        assert_eq!(classify(false, lock27), WaitKind::Lock);
        // A stripped interpreter: only libc's names.
        let cond = [
            Kernel("futex_wait"),
            Native("___pthread_cond_timedwait"),
            Native("_end"),
            Python,
        ];
        assert_eq!(classify(false, cond), WaitKind::Gil);
        let sleep_select = [
            Kernel("do_select"),
            Native("select"),
            Native("pysleep"),
            Python,
        ];
        assert_eq!(classify(false, sleep_select), WaitKind::Sleep);
        assert_eq!(
            classify(false, [Kernel("pipe_read"), Kernel("vfs_read"), Python]),
            WaitKind::IoRead
        );
        assert_eq!(
            classify(
                false,
                [
                    Kernel("sk_wait_data"),
                    Kernel("tcp_recvmsg"),
                    Kernel("vfs_read")
                ]
            ),
            WaitKind::Network
        );
        assert_eq!(
            classify(false, [Kernel("handle_mm_fault"), Kernel("io_schedule")]),
            WaitKind::PageFault
        );
        assert_eq!(classify(false, [Kernel("futex_wait")]), WaitKind::Lock);
        assert_eq!(classify(false, [Kernel("do_epoll_wait")]), WaitKind::Poll);
        assert_eq!(classify(false, [Kernel("schedule")]), WaitKind::Other);
        assert_eq!(classify(true, [Kernel("futex_wait")]), WaitKind::Preempted);
    }
}
