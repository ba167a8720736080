//! How much of the CPU time the kernel accounted to the targets the samples represent: the
//! check that no thread or process, however short-lived, was missed.
//!
//! The kernel's own figures: `/proc/PID/stat` utime + stime of a process (its threads that
//! exited included), cutime + cstime for its children it has waited for; for a launched
//! command, our `RUSAGE_CHILDREN` (the command and every descendant reaped under it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// CPU time of one process, in clock ticks: (its own, its waited-for children's).
#[derive(Clone, Copy, Default)]
struct Ticks {
    own: u64,
    children: u64,
}

fn read_ticks(pid: u32) -> Option<Ticks> {
    let s = perfpy_process::proc::stat(pid).ok()?;
    Some(Ticks {
        own: s.utime? + s.stime?,
        children: s.cutime? + s.cstime?,
    })
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn children_rusage() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass and nothing else.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) != 0 {
            return Duration::ZERO;
        }
        u
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The CPU time of the targets over the recording, measured from outside.
pub struct CpuMeter {
    /// `-p` targets (none for a launched command).
    targets: Vec<u32>,
    /// Their child processes count too (--subprocesses, or inherited per-thread events).
    children: bool,
    subprocesses: bool,
    /// Events on every CPU with the eBPF filter (false: inherited per-thread events).
    per_cpu: bool,
    launched: bool,
    at_start: HashMap<u32, Ticks>,
    /// The latest reading of each target: what is left of one reaped before the end.
    latest: HashMap<u32, Ticks>,
    /// With children: the CPU (ticks) the targets and their live descendants had used since the
    /// start at the latest poll where every target could be read, all read at one instant (a
    /// child's time is then in its own figures or, once reaped, in its parent's, never both).
    /// A target that exits takes its reaped children's time with it: this is what is left.
    snapshot: Option<u64>,
    rusage_start: Duration,
    last_poll: Instant,
}

impl CpuMeter {
    /// Starts measuring: call when sampling starts. `targets`: the `-p` targets (none for a
    /// launched command).
    pub fn start(targets: &[u32], launched: bool, subprocesses: bool, per_cpu: bool) -> CpuMeter {
        // Inherited per-thread events follow child processes whatever the options.
        let children = subprocesses || !per_cpu;
        let mut at_start = HashMap::new();
        let roots = if children {
            crate::targets::descendants(targets)
        } else {
            targets.to_vec()
        };
        for &p in &roots {
            if let Some(t) = read_ticks(p) {
                at_start.insert(p, t);
            }
        }
        CpuMeter {
            targets: targets.to_vec(),
            children,
            subprocesses,
            per_cpu,
            launched,
            latest: at_start.clone(),
            at_start,
            snapshot: None,
            rusage_start: children_rusage(),
            last_poll: Instant::now(),
        }
    }

    /// Reads the targets again, at most every 250 ms (cheap: one small file each), and with
    /// children the processes `live` (those the recording follows) too.
    pub fn poll(&mut self, live: impl IntoIterator<Item = u32>) {
        if self.launched || self.last_poll.elapsed() < Duration::from_millis(250) {
            return;
        }
        self.last_poll = Instant::now();
        let mut all = true;
        for &p in &self.targets {
            match read_ticks(p) {
                Some(t) => {
                    self.latest.insert(p, t);
                }
                None => all = false,
            }
        }
        if self.children && all && !self.targets.is_empty() {
            let mut ticks = 0u64;
            for &p in &self.targets {
                ticks += self.since_start(p, self.latest[&p]);
            }
            for p in live {
                if !self.targets.contains(&p) {
                    ticks += read_ticks(p).map_or(0, |t| self.since_start(p, t));
                }
            }
            self.snapshot = Some(ticks);
        }
    }

    /// A process's own and reaped children's ticks since the start (all of them for one
    /// started since).
    fn since_start(&self, p: u32, now: Ticks) -> u64 {
        let a = self.at_start.get(&p).copied().unwrap_or_default();
        (now.own + now.children).saturating_sub(a.own + a.children)
    }

    /// The CPU time used since [`CpuMeter::start`]; for a launched command, once it is reaped.
    fn finish(&mut self) -> Duration {
        if self.launched {
            return children_rusage().saturating_sub(self.rusage_start);
        }
        self.last_poll = Instant::now() - Duration::from_secs(1);
        let snapshot = self.snapshot;
        self.poll(std::iter::empty());
        self.snapshot = snapshot;
        // A target gone: its figures stopped at its last reading, without the children it
        // reaped after it; the last whole reading of the tree counts them.
        let gone = self.targets.iter().any(|&p| read_ticks(p).is_none());
        if let (true, true, Some(t)) = (self.children, gone, self.snapshot) {
            return Duration::from_secs_f64(t as f64 / ticks_per_second() as f64);
        }
        let mut ticks = 0u64;
        for &p in &self.targets {
            let (Some(a), Some(b)) = (self.at_start.get(&p), self.latest.get(&p)) else {
                continue;
            };
            ticks += b.own.saturating_sub(a.own);
            if self.children {
                ticks += b.children.saturating_sub(a.children);
            }
        }
        if self.children {
            // Descendants still running (or not yet waited for): their own and their reaped
            // children's time, since the start for those that were already there.
            for p in crate::targets::descendants(&self.targets) {
                if self.targets.contains(&p) {
                    continue;
                }
                if let Some(b) = read_ticks(p) {
                    let a = self.at_start.get(&p).copied().unwrap_or_default();
                    ticks += (b.own + b.children).saturating_sub(a.own + a.children);
                }
            }
        }
        Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64)
    }

    /// The figures for the summary, once sampling ended (a launched command reaped).
    pub fn coverage(&mut self, samples: u64, lost: u64, period_ns: u64) -> Coverage {
        let cpu = self.finish();
        let unprofiled_children = if self.per_cpu && !self.launched && !self.subprocesses {
            self.children_only()
        } else {
            Duration::ZERO
        };
        let what = match (self.launched, self.targets.len()) {
            (true, _) => "the command and its child processes",
            (false, 1) if self.subprocesses => "the target and its child processes",
            (false, 1) => "the target",
            _ => "the targets",
        };
        Coverage {
            cpu,
            samples,
            lost,
            period_ns,
            per_cpu: self.per_cpu,
            unprofiled_children,
            what: what.into(),
        }
    }

    /// CPU time of the targets' children (reaped) since the start, for a hint when they are
    /// not profiled.
    fn children_only(&self) -> Duration {
        let mut ticks = 0u64;
        for &p in &self.targets {
            if let (Some(a), Some(b)) = (self.at_start.get(&p), self.latest.get(&p)) {
                ticks += b.children.saturating_sub(a.children);
            }
        }
        Duration::from_secs_f64(ticks as f64 / ticks_per_second() as f64)
    }
}

/// What the summary says about coverage.
pub struct Coverage {
    pub cpu: Duration,
    pub samples: u64,
    pub lost: u64,
    pub period_ns: u64,
    /// Samples of every CPU filtered in the kernel (false: inherited per-thread events).
    pub per_cpu: bool,
    /// `-p` without --subprocesses: CPU its children used meanwhile (not profiled).
    pub unprofiled_children: Duration,
    pub what: String,
}

/// Below this share of the kernel's figure, the summary warns.
const POOR: f64 = 0.8;

impl Coverage {
    /// Prints [`Coverage::lines`] on stderr.
    pub fn print(&self) {
        for l in self.lines() {
            say!("perfpy: {l}");
        }
    }

    /// The summary's lines about coverage (notes and warnings included), without a prefix.
    pub fn lines(&self) -> Vec<String> {
        let mut v = Vec::new();
        let sampled = Duration::from_nanos(self.samples.saturating_mul(self.period_ns));
        let ms = self.period_ns as f64 / 1e6;
        if !self.per_cpu {
            v.push(format!(
                "note: without the eBPF walker each thread is sampled once per {ms} ms of its own CPU time: threads and processes that run less than that are undercounted"
            ));
        }
        if self.cpu < Duration::from_millis(50) {
            v.push(format!(
                "{} used {:.2} s of CPU during the recording: too little to measure coverage (an idle or blocked program: `perfpy dump -p PID` shows where each thread waits, `perfpy record --off-cpu` profiles the waits)",
                self.what,
                self.cpu.as_secs_f64()
            ));
        } else {
            let share = sampled.as_secs_f64() / self.cpu.as_secs_f64();
            v.push(format!(
                "samples cover {:.0}% of the {:.2} s of CPU {} used",
                100.0 * share,
                self.cpu.as_secs_f64(),
                self.what
            ));
            if share < POOR {
                let why = if !self.per_cpu {
                    "short-lived threads or processes: run perfpy as root with eBPF (without --no-ebpf) to sample every CPU".to_string()
                } else if self.lost > 0 {
                    format!(
                        "{} samples were lost (perfpy did not read its rings fast enough): lower the rate (-r) or give perfpy a CPU of its own",
                        self.lost
                    )
                } else {
                    "perfpy or the machine was overloaded, or the processes ran in a PID namespace perfpy cannot see".to_string()
                };
                v.push(format!(
                    "warning: samples cover only {:.0}% of the CPU {} used; likely cause: {why}",
                    100.0 * share,
                    self.what
                ));
            }
        }
        if self.unprofiled_children >= Duration::from_millis(100) {
            v.push(format!(
                "note: its child processes used {:.2} s of CPU, not profiled: add --subprocesses to profile them",
                self.unprofiled_children.as_secs_f64()
            ));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cov(samples: u64, cpu_ms: u64, per_cpu: bool, lost: u64) -> Vec<String> {
        Coverage {
            cpu: Duration::from_millis(cpu_ms),
            samples,
            lost,
            period_ns: 10_000_000,
            per_cpu,
            unprofiled_children: Duration::ZERO,
            what: "the target".into(),
        }
        .lines()
    }

    #[test]
    fn coverage_lines() {
        let l = cov(402, 4020, true, 0);
        assert_eq!(
            l,
            vec!["samples cover 100% of the 4.02 s of CPU the target used"]
        );
        let l = cov(10, 4020, false, 0);
        assert!(l[0].starts_with("note: without the eBPF walker"));
        assert!(l[1].contains("cover 2% of the 4.02 s"));
        assert!(l[2].contains("short-lived threads"), "{l:?}");
        let l = cov(100, 4020, true, 5);
        assert!(l[1].contains("5 samples were lost"), "{l:?}");
        assert!(cov(0, 10, true, 0)[0].contains("too little"));
    }

    fn self_rusage() -> f64 {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }

    #[test]
    fn our_own_cpu_time_is_read() {
        // Our utime + stime from /proc, against the kernel's rusage, over ~0.3 s of CPU.
        let pid = std::process::id();
        let (a, ra) = (read_ticks(pid).unwrap(), self_rusage());
        let t = Instant::now();
        let mut x = 0u64;
        while self_rusage() - ra < 0.3 && t.elapsed() < Duration::from_secs(20) {
            for _ in 0..10_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        let (b, rb) = (read_ticks(pid).unwrap(), self_rusage());
        let proc_s = (b.own - a.own) as f64 / ticks_per_second() as f64;
        assert!(
            (proc_s - (rb - ra)).abs() < 0.05,
            "/proc says {proc_s:.3} s, rusage {:.3} s ({x})",
            rb - ra
        );
    }
}
