//! System calls of the sampling stage: `perf_event_open`, its ring buffer mapping, reading another
//! process's memory. Everything here returns `io::Result` and owns its file descriptors.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use pe::bindings as b;
use perf_event_open_sys as pe;

/// x86-64 user registers we ask for: BP, SP, IP (bits of `perf_event_x86_regs`).
pub const REG_BP: u32 = 6;
pub const REG_SP: u32 = 7;
pub const REG_IP: u32 = 8;
pub const REGS_MASK: u64 = (1 << REG_BP) | (1 << REG_SP) | (1 << REG_IP);

pub const SAMPLE_TYPE: u64 = (b::PERF_SAMPLE_IP
    | b::PERF_SAMPLE_TID
    | b::PERF_SAMPLE_TIME
    | b::PERF_SAMPLE_CPU
    | b::PERF_SAMPLE_PERIOD
    | b::PERF_SAMPLE_CALLCHAIN
    | b::PERF_SAMPLE_REGS_USER
    | b::PERF_SAMPLE_STACK_USER) as u64;

/// What to sample, as chosen by the user.
#[derive(Clone, Debug)]
pub struct EventConfig {
    /// Nanoseconds of CPU time between samples (cpu-clock counts nanoseconds).
    pub period_ns: u64,
    /// Bytes of user stack copied with each sample.
    pub stack_size: u32,
    /// Also sample kernel code (needs root, CAP_PERFMON or perf_event_paranoid <= 1).
    pub kernel: bool,
    /// Disabled until the task calls exec (spawned commands).
    pub enable_on_exec: bool,
    /// Follow threads and children created after the event is opened.
    pub inherit: bool,
    /// Leave out the idle task (whole-machine sampling).
    pub exclude_idle: bool,
    /// Bytes of data that wake the reader.
    pub wakeup_bytes: u32,
}

/// Opens a cpu-clock sampling event on `tid` (any CPU) or on `cpu` (any task, `tid == -1`).
pub fn perf_event_open(cfg: &EventConfig, tid: i32, cpu: i32) -> io::Result<OwnedFd> {
    let mut attr = b::perf_event_attr {
        size: std::mem::size_of::<b::perf_event_attr>() as u32,
        type_: b::PERF_TYPE_SOFTWARE,
        config: b::PERF_COUNT_SW_CPU_CLOCK as u64,
        sample_type: SAMPLE_TYPE,
        sample_regs_user: REGS_MASK,
        sample_stack_user: cfg.stack_size,
        ..Default::default()
    };
    attr.sample_period = cfg.period_ns;
    attr.wakeup_watermark = cfg.wakeup_bytes;
    attr.set_watermark(1);
    attr.set_disabled(cfg.enable_on_exec as u64);
    attr.set_enable_on_exec(cfg.enable_on_exec as u64);
    attr.set_inherit(cfg.inherit as u64);
    attr.set_exclude_kernel((!cfg.kernel) as u64);
    attr.set_exclude_hv(1);
    attr.set_exclude_idle(cfg.exclude_idle as u64);
    // User frames are unwound by us from the copied stack; the kernel's own user callchain
    // would need frame pointers, which Python builds do not have.
    attr.set_exclude_callchain_user(1);
    attr.set_mmap(1);
    attr.set_mmap2(1);
    attr.set_comm(1);
    attr.set_comm_exec(1);
    attr.set_task(1);
    attr.set_sample_id_all(1);
    // CLOCK_MONOTONIC, so that sample times compare with bpf_ktime_get_ns().
    attr.set_use_clockid(1);
    attr.clockid = libc::CLOCK_MONOTONIC;
    // SAFETY: `attr` is a fully initialised perf_event_attr whose `size` field is its own size;
    // the kernel only reads it. The flags ask for a close-on-exec descriptor.
    let fd = unsafe {
        pe::perf_event_open(
            &mut attr,
            tid,
            cpu,
            -1,
            b::PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends the samples of `fd` to the ring buffer of `target` (same CPU).
pub fn perf_event_set_output(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: SET_OUTPUT takes a descriptor number; bad values only yield an error.
    let r = unsafe { pe::ioctls::SET_OUTPUT(fd, target) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPUs that are online, from /sys/devices/system/cpu/online ("0-3,5").
pub fn online_cpus() -> Vec<i32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut v = Vec::new();
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i32>(), b.parse::<i32>()) {
                    v.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.parse() {
                    v.push(a);
                }
            }
        }
    }
    if v.is_empty() {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as i32;
        v = (0..n).collect();
    }
    v
}

/// The shared ring buffer of a perf event: one metadata page and `2^n` data pages.
pub struct Ring {
    base: NonNull<u8>,
    len: usize,
    data_size: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is owned by this value and accessed through &mut self or through
// read-only views whose lifetime is bound to &self; the kernel is the only other writer and
// synchronises through the head/tail protocol.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer of `fd` with `data_pages` (a power of two) data pages.
    pub fn map(fd: OwnedFd, data_pages: usize) -> io::Result<Self> {
        let page = page_size();
        let len = page * (1 + data_pages);
        // SAFETY: mapping a fresh region (addr NULL) of a perf event descriptor; the kernel
        // validates the length; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap returned NULL"),
            len,
            data_size: page * data_pages,
            _fd: fd,
        })
    }

    pub fn fd(&self) -> RawFd {
        self._fd.as_raw_fd()
    }

    fn meta(&self) -> *mut b::perf_event_mmap_page {
        self.base.as_ptr().cast()
    }

    /// Current (head, tail). Acquire on head pairs with the kernel's release after writing.
    pub fn positions(&self) -> (u64, u64) {
        let meta = self.meta();
        // SAFETY: `meta` points to the mapped metadata page; data_head is written by the kernel
        // and read atomically; data_tail is only written by us.
        unsafe {
            let head = std::ptr::addr_of!((*meta).data_head).cast::<std::sync::atomic::AtomicU64>();
            let tail = std::ptr::addr_of!((*meta).data_tail).read_volatile();
            ((*head).load(std::sync::atomic::Ordering::Acquire), tail)
        }
    }

    /// Releases everything up to `tail` back to the kernel.
    pub fn set_tail(&mut self, tail: u64) {
        let meta = self.meta();
        // SAFETY: data_tail is ours to write; release ordering so the kernel sees our reads done.
        unsafe {
            let t =
                std::ptr::addr_of_mut!((*meta).data_tail).cast::<std::sync::atomic::AtomicU64>();
            (*t).store(tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The data area (wrapping at `data_size`).
    pub fn data(&self) -> &[u8] {
        let page = page_size();
        // SAFETY: the data area follows the metadata page inside our mapping of `len` bytes.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(page), self.data_size) }
    }

    pub fn data_size(&self) -> usize {
        self.data_size
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region we mapped; no view outlives &self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
