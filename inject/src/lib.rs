//! Finding CPython in a process and turning its perf trampoline on and off from outside.
//!
//! * [`discover`]: is the process CPython, which version, where the interpreter lives
//!   (libpython or linked into the executable), its load bias and symbol addresses.
//! * [`activate`] / [`deactivate`] / [`trampoline_active`]: run
//!   `sys.activate_stack_trampoline('perf')` (and friends) inside the target, at a point where
//!   that cannot deadlock it (see [`run`]), and report the state before and after.
//! * [`Registry`]: every activation *we* made, so that every way out of a recording turns
//!   off exactly those and nothing else.

mod ptrace;
pub mod run;
pub mod sessions;
mod sys;
pub mod target_files;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use perfpy_process::{elf, proc, Version};

/// Why a process cannot be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NotPython,
    PythonTooOld,
    NoPerfTrampoline,
    NoLibpythonSymbols,
    ProcessGone,
    PermissionDenied,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::NotPython => "not_python",
            Reason::PythonTooOld => "python_too_old",
            Reason::NoPerfTrampoline => "no_perf_trampoline",
            Reason::NoLibpythonSymbols => "no_libpython_symbols",
            Reason::ProcessGone => "process_gone",
            Reason::PermissionDenied => "permission_denied",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("not_python: pid {pid} is not a CPython process (no mapped file holds the interpreter's evaluation loop)")]
    NotPython { pid: i32 },
    #[error("python_too_old: pid {pid} runs CPython {version}; the perf trampoline needs 3.12 or later (older versions get Python frames from the eBPF walker)")]
    PythonTooOld { pid: i32, version: String },
    #[error("no_perf_trampoline: CPython {version} in pid {pid} was built without perf trampoline support (no _Py_trampoline_func_start in {interpreter}); use a build configured with perf support")]
    NoPerfTrampoline {
        pid: i32,
        version: String,
        interpreter: String,
    },
    #[error("no_libpython_symbols: {interpreter} (pid {pid}) does not export {missing}; perfpy cannot call into this interpreter")]
    NoLibpythonSymbols {
        pid: i32,
        interpreter: String,
        missing: String,
    },
    #[error("process_gone: pid {pid} exited")]
    ProcessGone { pid: i32 },
    #[error("permission_denied: cannot trace pid {pid} ({detail}): run perfpy as root or with CAP_SYS_PTRACE, check kernel.yama.ptrace_scope (1 allows root), and in Docker add --cap-add SYS_PTRACE")]
    PermissionDenied { pid: i32, detail: String },
    #[error("pid {pid} did not reach a safe point to run the injected code in time (its threads may be blocked in native code holding the GIL); nothing was changed")]
    Timeout { pid: i32 },
    #[error("ptrace on pid {pid}: {detail}")]
    Ptrace { pid: i32, detail: String },
    #[error("the injected code failed in pid {pid}: {detail}")]
    Failed { pid: i32, detail: String },
}

impl InjectError {
    pub fn reason(&self) -> Option<Reason> {
        Some(match self {
            InjectError::NotPython { .. } => Reason::NotPython,
            InjectError::PythonTooOld { .. } => Reason::PythonTooOld,
            InjectError::NoPerfTrampoline { .. } => Reason::NoPerfTrampoline,
            InjectError::NoLibpythonSymbols { .. } => Reason::NoLibpythonSymbols,
            InjectError::ProcessGone { .. } => Reason::ProcessGone,
            InjectError::PermissionDenied { .. } => Reason::PermissionDenied,
            _ => return None,
        })
    }
}

/// A CPython process as found by [`discover`].
#[derive(Clone, Debug)]
pub struct PythonProcess {
    pub pid: i32,
    /// `0.0` when neither `Py_Version` nor a file name says it.
    pub version: Version,
    /// Path under which perfpy read the interpreter's ELF file (through `/proc/PID/...`).
    pub interpreter: PathBuf,
    /// The path as the process names it.
    pub interpreter_name: String,
    /// libpython is linked into the executable (Debian's python3.11).
    pub in_executable: bool,
    /// The interpreter file's load bias (see [`perfpy_process::elf::load_bias`]).
    pub load_bias: u64,
    symbols: HashMap<String, (u64, u64)>,
    /// libc's `mmap`/`munmap`, absolute.
    libc: HashMap<String, u64>,
    /// Start time (clock ticks since boot) from /proc/PID/stat: tells a reused pid apart.
    pub start_time: u64,
}

impl PythonProcess {
    /// Absolute address of a symbol of the interpreter's ELF (`.dynsym`, then `.symtab`).
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).map(|(a, _)| a + self.load_bias)
    }

    fn symbol_range(&self, name: &str) -> Option<std::ops::Range<u64>> {
        self.symbols
            .get(name)
            .map(|(a, s)| a + self.load_bias..a + self.load_bias + (*s).max(1))
    }
}

fn read_maps(pid: i32) -> Result<Vec<proc::MapLine>, InjectError> {
    proc::maps(pid as u32).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => InjectError::ProcessGone { pid },
        std::io::ErrorKind::PermissionDenied => InjectError::PermissionDenied {
            pid,
            detail: format!("reading /proc/{pid}/maps: {e}"),
        },
        _ => InjectError::Ptrace {
            pid,
            detail: format!("reading /proc/{pid}/maps: {e}"),
        },
    })
}

pub(crate) fn start_time(pid: i32) -> Result<u64, InjectError> {
    proc::start_time(pid as u32).map_err(|_| InjectError::ProcessGone { pid })
}

/// Finds CPython in process `pid`.
pub fn discover(pid: i32) -> Result<PythonProcess, InjectError> {
    if pid <= 0 {
        return Err(InjectError::ProcessGone { pid });
    }
    let maps = read_maps(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let uids = proc::status(pid as u32).map(|s| s.uids).unwrap_or_default();
    // Candidates: files whose name says python, and the executable (static builds, embedders).
    let mut seen = Vec::new();
    let mut libc = HashMap::new();
    let mut found = None;
    for m in &maps {
        if m.offset != 0 || !m.path.starts_with('/') || seen.contains(&m.path) {
            continue;
        }
        seen.push(m.path.clone());
        let name = m.path.rsplit('/').next().unwrap_or("");
        // musl's libc is its dynamic loader.
        let is_libc =
            name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl");
        let candidate = name.contains("python") || m.path == exe;
        if !candidate && !is_libc {
            continue;
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let Ok((host, file)) =
            target_files::open_mapped(pid as u32, None, (m.start, m.end), &m.path, &uids, &stop)
        else {
            continue;
        };
        let Ok(facts) = elf::read_cached(&file) else {
            continue;
        };
        let Some(bias) = facts.bias(m.start, m.offset) else {
            continue;
        };
        if is_libc {
            for s in ["mmap", "munmap"] {
                if let Some((a, _)) = facts.symbols.get(s) {
                    libc.insert(s.to_string(), a + bias);
                }
            }
            if let Some(a) = facts.sigreturn() {
                libc.insert("__restore_rt".to_string(), a + bias);
            }
            continue;
        }
        if facts.is_interpreter && found.is_none() {
            found = Some((m.path.clone(), host, facts, bias));
        }
    }
    let Some((name, host, facts, load_bias)) = found else {
        return Err(InjectError::NotPython { pid });
    };
    let version = facts
        .python_version
        .or_else(|| Version::from_file_name(&name))
        .or_else(|| Version::from_file_name(&exe))
        .unwrap_or(Version::new(0, 0));
    Ok(PythonProcess {
        pid,
        version,
        interpreter: host,
        in_executable: name == exe
            && !name
                .rsplit('/')
                .next()
                .unwrap_or("")
                .starts_with("libpython"),
        interpreter_name: name,
        load_bias,
        symbols: facts.symbols.clone(),
        libc,
        start_time: start_time(pid)?,
    })
}

/// Checks that `p` can get a perf trampoline from us.
pub fn check_injectable(p: &PythonProcess) -> Result<(), InjectError> {
    if !p.version.at_least(3, 12) {
        return Err(InjectError::PythonTooOld {
            pid: p.pid,
            version: p.version.to_string(),
        });
    }
    let missing: Vec<&str> = [
        "PyGILState_Ensure",
        "PyGILState_Release",
        "PyRun_SimpleString",
        "Py_AddPendingCall",
    ]
    .into_iter()
    .filter(|s| p.symbol(s).is_none())
    .collect();
    if !missing.is_empty() {
        return Err(InjectError::NoLibpythonSymbols {
            pid: p.pid,
            interpreter: p.interpreter_name.clone(),
            missing: missing.join(", "),
        });
    }
    if p.symbol("_Py_trampoline_func_start").is_none() {
        return Err(InjectError::NoPerfTrampoline {
            pid: p.pid,
            version: p.version.to_string(),
            interpreter: p.interpreter_name.clone(),
        });
    }
    for f in ["mmap", "munmap", "__restore_rt"] {
        if !p.libc.contains_key(f) {
            return Err(InjectError::NoLibpythonSymbols {
                pid: p.pid,
                interpreter: "libc".into(),
                missing: f.into(),
            });
        }
    }
    Ok(())
}

/// State of the trampoline before and after an injected action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrampolineState {
    pub before: bool,
    pub after: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivateOutcome {
    Activated,
    /// It was on already (e.g. `-X perf`): we did nothing and must not turn it off.
    AlreadyActive,
}

/// Whether the trampoline is active in `p` (asked inside the target, changing nothing).
pub fn trampoline_active(p: &PythonProcess, timeout: Duration) -> Result<bool, InjectError> {
    check_injectable(p)?;
    Ok(run::inject(p, run::Action::Query, timeout)?.after)
}

/// Turns the trampoline on in `p`, unless it is on already.
pub fn activate(p: &PythonProcess, timeout: Duration) -> Result<ActivateOutcome, InjectError> {
    check_injectable(p)?;
    let s = run::inject(p, run::Action::On, timeout)?;
    if s.before {
        return Ok(ActivateOutcome::AlreadyActive);
    }
    if !s.after {
        return Err(InjectError::Failed {
            pid: p.pid,
            detail: "sys.activate_stack_trampoline('perf') left the trampoline off".into(),
        });
    }
    Ok(ActivateOutcome::Activated)
}

/// Turns the trampoline off in `p`.
pub fn deactivate(p: &PythonProcess, timeout: Duration) -> Result<(), InjectError> {
    check_injectable(p)?;
    let s = run::inject(p, run::Action::Off, timeout)?;
    if s.after {
        return Err(InjectError::Failed {
            pid: p.pid,
            detail: "sys.deactivate_stack_trampoline() left the trampoline on".into(),
        });
    }
    Ok(())
}

/// How a session's use of a trampoline ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Turned off: perfpy had turned it on, and this was the last perfpy session using it.
    TurnedOff,
    /// Left on: it was on when perfpy came (the target's own), and no session of ours marked it.
    LeftAsFound,
    /// Left on: other perfpy sessions (these pids, when known) still use it; the last one
    /// turns it off.
    StillUsed(Vec<u32>),
}

struct Entry {
    p: PythonProcess,
    /// This session turned it on.
    ours: bool,
    /// This session's registration as a user of it (see [`sessions`]).
    used: Option<sessions::Use>,
}

/// Every trampoline this process relies on, turned on by it or found on, so that each is
/// released once — turned off by the last perfpy session using it, and only if perfpy turned
/// it on.
pub struct Registry {
    active: Mutex<Vec<Entry>>,
}

static REGISTRY: Registry = Registry {
    active: Mutex::new(Vec::new()),
};

pub fn registry() -> &'static Registry {
    &REGISTRY
}

impl Registry {
    /// Activates through the registry: the use (an activation of ours, or a trampoline found
    /// on) is recorded before we return.
    pub fn activate(
        &self,
        p: &PythonProcess,
        timeout: Duration,
    ) -> Result<ActivateOutcome, InjectError> {
        let mut g = self.active.lock().unwrap_or_else(|e| e.into_inner());
        // Registered first: a session turning it off holds the lock until it is off, so what
        // we find next is the state after it.
        let mut used = sessions::Use::join(p.pid, p.start_time, timeout);
        let r = activate(p, timeout);
        match r {
            Ok(ActivateOutcome::Activated) => {
                if let Some(u) = used.as_mut() {
                    u.mark_ours();
                }
                g.push(Entry {
                    p: p.clone(),
                    ours: true,
                    used,
                });
            }
            Ok(ActivateOutcome::AlreadyActive) => g.push(Entry {
                p: p.clone(),
                ours: false,
                used,
            }),
            Err(_) => {}
        }
        r
    }

    /// Forgets processes that have exited (or whose pid now names another process): nothing
    /// is left to undo there, and `-a` meets thousands of them.
    pub fn prune(&self) {
        let mut g = self.active.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|e| start_time(e.p.pid).is_ok_and(|t| t == e.p.start_time));
        sessions::prune_stale();
    }

    /// Pids whose trampoline we turned on and have not released yet.
    pub fn pids(&self) -> Vec<i32> {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.ours)
            .map(|e| e.p.pid)
            .collect()
    }

    /// Releases every trampoline we rely on: the last perfpy session out turns off what perfpy
    /// turned on; one the target started with is never turned off. A process that exited (or
    /// whose pid now names another process) is skipped. Returns what happened per pid.
    pub fn deactivate_all(&self, timeout: Duration) -> Vec<(i32, Result<Released, InjectError>)> {
        let mut g = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for mut e in g.drain(..) {
            let pid = e.p.pid;
            let same = start_time(pid).is_ok_and(|t| t == e.p.start_time);
            if !same {
                out.push((pid, Err(InjectError::ProcessGone { pid })));
                continue;
            }
            let leave = match e.used.as_mut() {
                Some(u) => u.leave(),
                // Alone (not root): what we turned on goes off.
                None if e.ours => sessions::Leave::LastOurs,
                None => sessions::Leave::LastNotOurs,
            };
            let r = match leave {
                sessions::Leave::Others(pids) => Ok(Released::StillUsed(pids)),
                sessions::Leave::LastNotOurs if !e.ours => Ok(Released::LeftAsFound),
                sessions::Leave::LastOurs | sessions::Leave::LastNotOurs => {
                    deactivate(&e.p, timeout).map(|()| {
                        if let Some(u) = e.used.as_mut() {
                            u.done_off();
                        }
                        Released::TurnedOff
                    })
                }
            };
            out.push((pid, r));
        }
        out
    }
}
