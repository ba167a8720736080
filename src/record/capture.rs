//! Capture: the perf events that sample the targets, one ring per CPU, the eBPF walker attached
//! to each event, and the launched command held before its exec until all of it is ready.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::collect::RingEntry;
use super::events::{load_walker, perm_error, raise_nofile_limit};
use super::Options;
use crate::sys::{self, EventConfig, Ring};
use crate::targets;

/// What samples the targets, opened and attached, not yet counting for a launched command
/// (it waits before its exec until [`targets::Spawned::release`]).
pub(super) struct Capture {
    /// Kept open for the recording: closing one stops its sampling.
    pub(super) events: Vec<OwnedFd>,
    pub(super) rings: Vec<RingEntry>,
    pub(super) epoll: Epoll,
    pub(super) walker: Option<perfpy_bpf::Walker>,
    /// Events on every CPU whose samples of other processes the walker drops (-p, commands).
    pub(super) per_cpu: bool,
    /// The sampling period, as opened (see [`open`] for why it is not exactly 1/rate).
    pub(super) period_ns: u64,
    pub(super) spawned: Option<targets::Spawned>,
    /// PYTHONPERFSUPPORT=1 was given to the launched command.
    pub(super) perf_env_set: bool,
}

/// Opens the events of a recording: the whole machine, a launched command (added to `tgids`)
/// or the `-p` targets.
pub(super) fn open(opts: &Options, tgids: &mut Vec<u32>) -> Result<Capture> {
    raise_nofile_limit();
    let mut period_ns = 1_000_000_000 / opts.rate;
    let mut cfg = EventConfig {
        period_ns,
        stack_size: 0,
        kernel: true,
        enable_on_exec: false,
        inherit: !opts.all,
        exclude_idle: opts.all,
        wakeup_bytes: 0,
    };
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    // The eBPF frame walker, loaded before any event is opened and attached to each one as it
    // is opened: events inherited by threads created later carry the program only if their
    // parent had it when they were created. Without it, Python frames come from trampolines.
    let t_load = std::time::Instant::now();
    // -p and launched commands: with the walker, events on every CPU whose samples of other
    // processes the walker drops (see `load_walker`).
    let (walker, per_cpu) = load_walker(opts);
    tracing::debug!(elapsed = ?t_load.elapsed(), per_cpu, "eBPF walker");
    if per_cpu {
        cfg.inherit = false;
        cfg.exclude_idle = true;
    }
    if per_cpu || opts.all {
        // Events on a CPU sample at fixed instants of its clock. With a period that is a
        // multiple of the scheduler tick (HZ 100, 250, 1000), time slices that start and end on
        // ticks are always sampled at the same phase, which biases the counts (measured: 86% to
        // 126% of the CPU used at 250 Hz on a HZ=250 kernel). 1/512 longer, the phase drifts
        // through every value within a few hundred samples.
        period_ns += period_ns / 512;
        cfg.period_ns = period_ns;
    }
    // The kernel copies the stack into the ring at each sample, in the target's time: with the
    // walker naming Python frames, the copy only has to reach the native frames around them.
    cfg.stack_size = opts
        .stack_size
        .unwrap_or(if walker.is_some() { 16384 } else { 49152 })
        & !7;
    let mut o = Opener::new(walker, per_cpu);
    let (spawned, perf_env_set) = o.open_targets(opts, &mut cfg, tgids)?;
    let rings: Vec<RingEntry> = o.rings.into_iter().flatten().collect();
    // Edge-triggered: a ring whose thread exited reports HUP for ever, but inherited events
    // of its children still write into it, so it stays drained and watched.
    for (i, r) in rings.iter().enumerate() {
        epoll
            .add(
                r.ring_fd_borrow(),
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, i as u64),
            )
            .context("epoll_ctl")?;
    }
    Ok(Capture {
        events: o.events,
        rings,
        epoll,
        walker: o.walker,
        per_cpu,
        period_ns,
        spawned,
        perf_env_set,
    })
}

/// Opens events one (thread or whole CPU) at a time. The kernel refuses to map inherited
/// per-task events (cpu == -1), so, as `perf record -p` does, there is one event per (thread,
/// CPU), and all events of a CPU write into one ring.
struct Opener {
    cpus: Vec<i32>,
    is_root: bool,
    per_cpu: bool,
    /// Ring size: 4 MiB (~80 samples of 48 KiB) per CPU, less on machines with many CPUs.
    data_pages: usize,
    events: Vec<OwnedFd>,
    rings: Vec<Option<RingEntry>>,
    walker: Option<perfpy_bpf::Walker>,
}

impl Opener {
    fn new(walker: Option<perfpy_bpf::Walker>, per_cpu: bool) -> Opener {
        let cpus = sys::online_cpus();
        let data_pages = ((64usize << 20) / cpus.len().max(1) / sys::page_size())
            .clamp(256, 1024)
            .next_power_of_two();
        Opener {
            rings: cpus.iter().map(|_| None).collect(),
            cpus,
            is_root: nix::unistd::geteuid().is_root(),
            per_cpu,
            data_pages,
            events: Vec::new(),
            walker,
        }
    }

    /// Opens the events of the recording's targets; returns the launched command, if any, and
    /// whether it was given PYTHONPERFSUPPORT=1.
    fn open_targets(
        &mut self,
        opts: &Options,
        cfg: &mut EventConfig,
        tgids: &mut Vec<u32>,
    ) -> Result<(Option<targets::Spawned>, bool)> {
        cfg.wakeup_bytes = (self.data_pages * sys::page_size() / 4) as u32;
        if opts.all {
            if !self.open(cfg, -1)? {
                bail!("cannot open whole-machine events");
            }
            return Ok((None, false));
        }
        if !opts.command.is_empty() {
            return self.open_command(opts, cfg, tgids);
        }
        if self.per_cpu {
            if let Some(w) = self.walker.as_mut() {
                for &pid in tgids.iter() {
                    w.keep(pid, opts.subprocesses)?;
                }
                if opts.subprocesses {
                    for pid in targets::descendants(tgids) {
                        w.keep(pid, true)?;
                    }
                }
            }
            self.open(cfg, -1)?;
            if let Some(&pid) = tgids.iter().find(|p| targets::is_gone(**p)) {
                bail!("no process with pid {pid}: it exited before sampling started");
            }
            return Ok((None, false));
        }
        for &pid in tgids.iter() {
            // Threads may appear while we open events: list again until nothing is new.
            let mut seen = HashSet::new();
            let mut opened = 0;
            loop {
                let new: Vec<u32> = targets::threads(pid)
                    .into_iter()
                    .filter(|t| !seen.contains(t))
                    .collect();
                if new.is_empty() {
                    break;
                }
                for t in new {
                    seen.insert(t);
                    if self.open(cfg, t as i32)? {
                        opened += 1;
                    }
                }
            }
            if opened == 0 || targets::is_gone(pid) {
                bail!("no process with pid {pid}: it exited before sampling started");
            }
        }
        Ok((None, false))
    }

    /// A launched command: started held before its exec, its events opened, added to `tgids`.
    fn open_command(
        &mut self,
        opts: &Options,
        cfg: &mut EventConfig,
        tgids: &mut Vec<u32>,
    ) -> Result<(Option<targets::Spawned>, bool)> {
        // CPython 3.12+ turns its perf trampoline on from the start with PYTHONPERFSUPPORT=1,
        // which names every Python frame; older versions ignore it. The trampoline costs the
        // program time (it doubles the cost of resuming a generator), so it is only the
        // fallback where the eBPF walker cannot run, or asked for. Set by the user, it wins.
        let walker_loaded = self.walker.is_some();
        let perf_env_set = opts.python_perf_env.unwrap_or(!walker_loaded);
        let env: &[(&str, &str)] = if perf_env_set {
            &[("PYTHONPERFSUPPORT", "1")]
        } else {
            &[]
        };
        if perf_env_set && !walker_loaded && opts.python_perf_env.is_none() {
            say!("perfpy: note: no eBPF walker: the command gets PYTHONPERFSUPPORT=1, so CPython 3.12+ names its Python frames through its perf trampoline (which slows Python calls down)");
        }
        let sp = targets::spawn(&opts.command, env)?;
        if self.per_cpu {
            // The child waits for us before it execs; its samples count from the exec on (until
            // then it is a copy of perfpy), as enable_on_exec does for per-thread events.
            if let Some(w) = self.walker.as_mut() {
                w.keep_from_exec(sp.pid as u32)?;
            }
            self.open(cfg, -1)?;
        } else {
            cfg.enable_on_exec = true;
            if !self.open(cfg, sp.pid)? {
                bail!("the command exited before it could be profiled");
            }
        }
        tgids.push(sp.pid as u32);
        Ok((Some(sp), perf_env_set))
    }

    /// Opens the events of `tid` (-1: every task) on every CPU; false if the thread is gone.
    fn open(&mut self, cfg: &mut EventConfig, tid: i32) -> Result<bool> {
        for ci in 0..self.cpus.len() {
            let Some(fd) = self.open_one(cfg, tid, self.cpus[ci])? else {
                return Ok(false);
            };
            if let Some(w) = self.walker.as_mut() {
                if let Err(e) = w.attach(fd.as_fd()) {
                    let e = anyhow::Error::from(e);
                    if self.per_cpu {
                        // Without the program these events would keep every process's samples.
                        bail!("{e:#}; rerun with --no-ebpf");
                    }
                    say!("perfpy: warning: {e:#}; Python frames only from perf trampolines");
                    self.walker = None;
                }
            }
            match &self.rings[ci] {
                Some(r) => {
                    sys::perf_event_set_output(fd.as_raw_fd(), r.ring.fd()).context(
                        "cannot attach an event to its CPU's ring (PERF_EVENT_IOC_SET_OUTPUT)",
                    )?;
                }
                None => {
                    let ring = self.map_ring(&fd)?;
                    self.rings[ci] = Some(RingEntry {
                        ring,
                        tid: tid.max(0) as u32,
                    });
                }
            }
            self.events.push(fd);
        }
        Ok(true)
    }

    /// One event; None if the thread is gone. Without permission for kernel frames, they are
    /// left out (said once) rather than the recording refused.
    fn open_one(&self, cfg: &mut EventConfig, tid: i32, cpu: i32) -> Result<Option<OwnedFd>> {
        match sys::perf_event_open(cfg, tid, cpu) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
                    && cfg.kernel =>
            {
                let fix = if self.is_root {
                    "perfpy runs as root without CAP_PERFMON/CAP_SYS_ADMIN (a container: add --cap-add PERFMON)"
                } else {
                    "run as root, or set kernel.perf_event_paranoid to 1"
                };
                say!("perfpy: warning: no permission to sample kernel code ({e}); kernel frames left out ({fix})");
                cfg.kernel = false;
                sys::perf_event_open(cfg, tid, cpu)
                    .map(Some)
                    .map_err(perm_error)
            }
            Err(e) => Err(perm_error(e)),
        }
    }

    /// The CPU's ring, smaller if the kernel refuses the size (locked-memory limits).
    fn map_ring(&self, fd: &OwnedFd) -> Result<Ring> {
        let mut pages = self.data_pages;
        loop {
            match Ring::map(fd.try_clone()?, pages) {
                Ok(r) => return Ok(r),
                Err(e) if pages > 8 => {
                    tracing::debug!("ring of {pages} pages refused ({e}), trying fewer");
                    pages /= 2;
                }
                Err(e) => {
                    return Err(e).context(
                        "cannot map the perf ring buffer: run as root or raise kernel.perf_event_mlock_kb",
                    )
                }
            }
        }
    }
}
