//! `perfpy info`: what this machine supports, and for each Python process what perfpy can do.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{json, Value};

use crate::files::Files;
use crate::process::Process;

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Facts about the machine, each with what it means for perfpy.
pub fn machine() -> Value {
    let euid = nix::unistd::geteuid();
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0);
    let has_cap = |bit: u32| cap_eff & (1u64 << bit) != 0;
    // CAP_SYS_ADMIN 21, CAP_SYS_PTRACE 19, CAP_PERFMON 38, CAP_BPF 39.
    let cfg = crate::sys::EventConfig {
        period_ns: 10_000_000,
        stack_size: 512,
        kernel: false,
        enable_on_exec: false,
        inherit: false,
        exclude_idle: false,
        wakeup_bytes: 0,
    };
    let perf_ok = crate::sys::perf_event_open(&cfg, 0, -1);
    let uname = nix::sys::utsname::uname().ok();
    json!({
        "kernel": uname.map(|u| u.release().to_string_lossy().into_owned()),
        "root": euid.is_root(),
        "cap_perfmon": has_cap(38) || has_cap(21),
        "cap_sys_ptrace": has_cap(19),
        "cap_bpf": has_cap(39) || has_cap(21),
        "perf_events": match &perf_ok { Ok(_) => "ok".to_string(), Err(e) => format!("refused: {e}") },
        "perf_event_paranoid": read_trim("/proc/sys/kernel/perf_event_paranoid"),
        "perf_event_max_sample_rate": read_trim("/proc/sys/kernel/perf_event_max_sample_rate"),
        "perf_event_mlock_kb": read_trim("/proc/sys/kernel/perf_event_mlock_kb"),
        "kptr_restrict": read_trim("/proc/sys/kernel/kptr_restrict"),
        "yama_ptrace_scope": read_trim("/proc/sys/kernel/yama/ptrace_scope"),
        "btf": std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "unprivileged_bpf_disabled": read_trim("/proc/sys/kernel/unprivileged_bpf_disabled"),
        "cpus": crate::sys::online_cpus().len(),
    })
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn perf_env(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|c| *c == 0).any(|kv| {
                kv.starts_with(b"PYTHONPERFSUPPORT=")
                    && kv != b"PYTHONPERFSUPPORT=0"
                    && kv != b"PYTHONPERFSUPPORT="
            })
        })
        .unwrap_or(false)
}

/// One process looked at: what injection's discovery finds in it (symbols, libc, start
/// time), read once and only when a question needs it.
struct Look {
    pid: u32,
    discovered:
        std::cell::OnceCell<Result<perfpy_inject::PythonProcess, perfpy_inject::InjectError>>,
}

impl Look {
    fn discover(&self) -> &Result<perfpy_inject::PythonProcess, perfpy_inject::InjectError> {
        self.discovered
            .get_or_init(|| perfpy_inject::discover(self.pid as i32))
    }
}

/// Describes one process if it runs CPython.
pub fn python_process(files: &mut Files, pid: u32, ask: bool) -> Option<Value> {
    let mut p = Process::new(pid, crate::ids::ProcessKey(0));
    p.refresh_maps(files);
    if !p.is_python {
        return None;
    }
    let interp = p
        .maps
        .iter()
        .filter_map(|m| m.file.as_ref())
        .find(|f| f.elf.as_ref().is_some_and(|e| e.is_interpreter))
        .map(|f| f.path.clone());
    let version = p.python_version;
    let look = Look {
        pid,
        discovered: std::cell::OnceCell::new(),
    };
    // Read as a recording would read it: a file the process controls, checked first.
    let perf_map_state = match p.perf_map() {
        Ok(m) => format!("{} ({} entries)", p.perf_map_path().display(), m.len()),
        Err(e) if e.contains("no such file") => "none".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    let perf_map = !perf_map_state.starts_with("none");
    let trampoline_capable = version.is_some_and(|v| v.at_least(3, 12));
    let started_with_perf = started_with_perf(pid);
    let trampoline = trampoline(&look, trampoline_capable, ask, started_with_perf, perf_map);
    let (ebpf, offsets) = ebpf(&look, version);
    let tramp_on = trampoline.starts_with("on") || trampoline.starts_with("was turned on");
    let python_frames = if ebpf == "yes" && tramp_on {
        // The walker does not need it, and it costs the process (generator resumption ~2x).
        "named (eBPF walker; its perf trampoline is on too: not needed, and it slows Python calls down)"
    } else if ebpf == "yes" {
        "named (eBPF walker, no trampoline needed)"
    } else if trampoline_capable && (started_with_perf || perf_map) {
        "named (perf trampolines)"
    } else if trampoline_capable {
        "named with --inject-python (perf trampolines, which slow Python calls down)"
    } else {
        "not named"
    };
    Some(json!({
        "pid": pid,
        "comm": p.comm,
        "version": version.map(|v| v.to_string()),
        "interpreter": interp,
        "static": interp.as_deref().is_some_and(|i| !i.contains("libpython")),
        "container_id": p.container_id,
        "trampoline": trampoline,
        "perf_map": perf_map_state,
        "trampoline_users": trampoline_users(&look),
        "python_frames": python_frames,
        "ebpf": ebpf,
        "ebpf_offsets": offsets,
        "injection": injection(&look),
    }))
}

/// Started with `-X perf` / `-X perf_jit` or `PYTHONPERFSUPPORT`: its trampoline is on.
fn started_with_perf(pid: u32) -> bool {
    let args = cmdline(pid);
    args.windows(2)
        .any(|w| w[0] == "-X" && (w[1] == "perf" || w[1] == "perf_jit"))
        || args.iter().any(|a| a == "-Xperf")
        || perf_env(pid)
}

/// The perf trampoline's state: asked inside the process when it was named by pid (a short,
/// safe stop), else inferred from how it started and whether it wrote a perf map.
fn trampoline(
    look: &Look,
    capable: bool,
    ask: bool,
    started_with_perf: bool,
    perf_map: bool,
) -> String {
    if !capable {
        return "unsupported (CPython < 3.12)".to_string();
    }
    let asked = ask
        .then(|| {
            look.discover().as_ref().ok().and_then(|d| {
                perfpy_inject::trampoline_active(d, std::time::Duration::from_secs(10)).ok()
            })
        })
        .flatten();
    let pid = look.pid;
    match asked {
        Some(true) => format!("on (turn it off with: perfpy inject -p {pid} --deactivate)"),
        Some(false) => "off".to_string(),
        None if started_with_perf => "on (started with -X perf / PYTHONPERFSUPPORT)".to_string(),
        None if perf_map => "was turned on at run time (perf map present)".to_string(),
        None => "off".to_string(),
    }
}

/// Whether the eBPF walker can name its frames ("yes" or "no: why"), and where its offsets
/// come from.
fn ebpf(look: &Look, version: Option<perfpy_process::Version>) -> (String, String) {
    let symbol = |sym: &str| match look.discover() {
        Ok(d) => d
            .symbol(sym)
            .ok_or_else(|| format!("no: {sym} not found in the interpreter's symbols")),
        Err(e) => Err(format!("no: {e}")),
    };
    match version {
        Some(v) if perfpy_bpf::debug_offsets::from_target(v) => {
            // 3.13+: the offsets are the target's own, read and checked now.
            let table = symbol("_PyRuntime").and_then(|rt| {
                perfpy_bpf::debug_offsets::read(&perfpy_process::LiveMemory(look.pid), rt, v)
                    .map_err(|e| format!("no: {e}"))
            });
            match table {
                Ok(t) => (
                    "yes".to_string(),
                    format!(
                        "the target's debug offsets (_Py_DebugOffsets, version {:#x})",
                        t.version
                    ),
                ),
                Err(e) => (e, String::new()),
            }
        }
        Some(v) if perfpy_bpf::Offsets::for_version(v).is_some() => {
            let sym = if v.at_least(3, 7) {
                "_PyRuntime"
            } else {
                "interp_head"
            };
            match symbol(sym) {
                Ok(_) => (
                    "yes".to_string(),
                    format!("perfpy's table for CPython {}.{}", v.major, v.minor),
                ),
                Err(e) => (e, String::new()),
            }
        }
        Some(v) => (
            format!("no: CPython {}.{} has no offset table", v.major, v.minor),
            String::new(),
        ),
        None => ("no: unknown version".to_string(), String::new()),
    }
}

/// Whether `--inject-python` can turn its trampoline on, or why not.
fn injection(look: &Look) -> String {
    let reason = |e: &perfpy_inject::InjectError| {
        e.reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| e.to_string())
    };
    match look
        .discover()
        .as_ref()
        .map_err(reason)
        .and_then(|d| perfpy_inject::check_injectable(d).map_err(|e| reason(&e)))
    {
        Ok(()) => "possible (--inject-python)".to_string(),
        Err(e) => format!("no: {e}"),
    }
}

/// The perfpy sessions that rely on its trampoline now.
fn trampoline_users(look: &Look) -> String {
    let Ok(d) = look.discover() else {
        return "none".to_string();
    };
    let (users, marked) = perfpy_inject::sessions::users(look.pid as i32, d.start_time);
    let who: Vec<String> = users.iter().map(|u| format!("perfpy pid {u}")).collect();
    match (who.is_empty(), marked) {
        (true, false) => "none".to_string(),
        (true, true) => "none (turned on by a perfpy session that is gone)".to_string(),
        (false, m) => format!(
            "{}{}",
            who.join(", "),
            if m { " (turned on by perfpy)" } else { "" }
        ),
    }
}

pub fn run(pids: &[i32], as_json: bool) -> Result<i32> {
    let mut files = Files::default();
    let targets: Vec<u32> = if pids.is_empty() {
        perfpy_process::proc::pids()?
    } else {
        let mut v = Vec::new();
        for &p in pids {
            v.push(crate::targets::check_pid(p)?);
        }
        v
    };
    let me = std::process::id();
    let mut procs = Vec::new();
    let mut not_python = Vec::new();
    for pid in targets {
        if pid == me {
            continue;
        }
        match python_process(&mut files, pid, !pids.is_empty()) {
            Some(v) => procs.push(v),
            None if !pids.is_empty() => not_python.push(pid),
            None => {}
        }
    }
    let machine = machine();
    if as_json {
        out!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"machine": machine, "python_processes": procs, "not_python": not_python})
            )?
        );
        return Ok(0);
    }
    print_table(&machine, &procs, !pids.is_empty());
    for pid in not_python {
        out!(
            "{pid:>8}  not a CPython process (no mapping holds the interpreter's evaluation loop)"
        );
    }
    Ok(0)
}

/// The text form: the machine's facts, then a line (or a few) per Python process.
fn print_table(machine: &Value, procs: &[Value], by_pid: bool) {
    out!("machine:");
    if let Value::Object(m) = machine {
        let m: BTreeMap<_, _> = m.iter().collect();
        for (k, v) in m {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                v => v.to_string(),
            };
            out!("  {k:28} {v}");
        }
    }
    out!();
    if procs.is_empty() {
        out!(
            "no CPython processes found{}",
            if !by_pid { "" } else { " among the given pids" }
        );
    } else {
        out!(
            "{:>8}  {:16} {:8} {:46} PYTHON FRAMES / EBPF / TRAMPOLINE / INJECTION",
            "PID",
            "COMM",
            "VERSION",
            "INTERPRETER"
        );
        for p in procs {
            let s = |k: &str| {
                p[k].as_str()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into())
            };
            out!(
                "{:>8}  {:16} {:8} {:46} {} / ebpf {} / trampoline {} / injection {}",
                p["pid"].as_u64().unwrap_or(0),
                s("comm"),
                s("version"),
                s("interpreter"),
                s("python_frames"),
                match p["ebpf_offsets"].as_str() {
                    Some(o) if !o.is_empty() => format!("yes, offsets from {o}"),
                    _ => s("ebpf"),
                },
                s("trampoline"),
                s("injection")
            );
            let users = s("trampoline_users");
            if users != "none" && users != "-" {
                out!("{:>8}  trampoline used by: {users}", "");
            }
            let map = s("perf_map");
            if map.starts_with("refused") {
                out!("{:>8}  warning: perf map {map}", "");
            }
        }
    }
}
