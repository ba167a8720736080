//! The `/proc` files perfpy reads about a process: `stat`, `status`, `maps`, `task/`, `comm`,
//! `cgroup`. Parsers take the text (tested on anything), readers take a pid.
//!
//! Hand-written rather than the `procfs` crate: each parser is a few lines, and perfpy's rule
//! for a malformed line (skip it, keep the others: one odd mapping must not make a process
//! unreadable) is not procfs's (an error for the whole file).

use std::io;

/// The fields of `/proc/PID/stat` perfpy uses. Numbers that do not parse are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `T`, `t`, `Z`, `X`, …; `?` when absent.
    pub state: char,
    pub ppid: Option<u32>,
    /// `PF_*` flags (`PF_KTHREAD` for a kernel thread).
    pub flags: Option<u64>,
    /// CPU time in clock ticks: its own (user, system), its waited-for children's.
    pub utime: Option<u64>,
    pub stime: Option<u64>,
    pub cutime: Option<u64>,
    pub cstime: Option<u64>,
    /// Clock ticks after boot at which it started: with the pid, names one process (a pid is
    /// reused, this pair is not).
    pub start_time: Option<u64>,
}

impl Stat {
    /// Parses the text of a `stat` file. The command name, in parentheses, may hold spaces and
    /// parentheses: the fields start after the last `)`.
    pub fn parse(text: &str) -> Self {
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        Stat {
            state: f.first().and_then(|s| s.chars().next()).unwrap_or('?'),
            ppid: f.get(1).and_then(|v| v.parse().ok()),
            flags: n(6),
            utime: n(11),
            stime: n(12),
            cutime: n(13),
            cstime: n(14),
            start_time: n(19),
        }
    }

    /// A zombie or a dead process: it runs nothing any more.
    pub fn is_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// `/proc/PID/stat`.
pub fn stat(pid: u32) -> io::Result<Stat> {
    Ok(Stat::parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/stat"
    ))?))
}

/// `/proc/PID/task/TID/stat`: one thread's.
pub fn task_stat(pid: u32, tid: u32) -> io::Result<Stat> {
    Ok(Stat::parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/task/{tid}/stat"
    ))?))
}

/// Whether a process is gone: no `stat`, or a zombie.
pub fn is_gone(pid: u32) -> bool {
    stat(pid).map_or(true, |s| s.is_exited())
}

/// The start time of a process (see [`Stat::start_time`]); 0 when the field does not parse.
pub fn start_time(pid: u32) -> io::Result<u64> {
    Ok(stat(pid)?.start_time.unwrap_or(0))
}

/// The thread ids of a process now, sorted.
pub fn tasks(pid: u32) -> io::Result<Vec<u32>> {
    let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The ids of every process now (`/proc/N`), sorted.
pub fn pids() -> io::Result<Vec<u32>> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// A thread's name (`/proc/PID/task/TID/comm`), without the newline.
pub fn comm(pid: u32, tid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

/// The fields of `/proc/PID/status` (or a thread's) perfpy uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub tgid: Option<u32>,
    /// The pid of a process tracing it (0: none).
    pub tracer_pid: Option<u32>,
    /// Real, effective, saved and file-system user ids, sorted, each once; empty if absent.
    pub uids: Vec<u32>,
    /// Its pid in its innermost PID namespace (the last of `NSpid:`): its name for itself.
    pub nspid: Option<u32>,
    /// The blocked-signal mask (`SigBlk`).
    pub sig_blk: Option<u64>,
}

impl Status {
    pub fn parse(text: &str) -> Self {
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name));
        let mut uids: Vec<u32> = field("Uid:")
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        uids.sort_unstable();
        uids.dedup();
        Status {
            tgid: field("Tgid:").and_then(|v| v.trim().parse().ok()),
            tracer_pid: field("TracerPid:").and_then(|v| v.trim().parse().ok()),
            uids,
            nspid: field("NSpid:").and_then(|v| v.split_whitespace().last()?.parse().ok()),
            sig_blk: field("SigBlk:").and_then(|v| u64::from_str_radix(v.trim(), 16).ok()),
        }
    }
}

/// `/proc/PID/status`.
pub fn status(pid: u32) -> io::Result<Status> {
    Ok(Status::parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/status"
    ))?))
}

/// `/proc/PID/task/TID/status`: one thread's.
pub fn task_status(pid: u32, tid: u32) -> io::Result<Status> {
    Ok(Status::parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/task/{tid}/status"
    ))?))
}

/// `/proc/PID/task/TID/syscall` of a thread that is not running: "NR ARG1 … ARG6 SP PC" in a
/// system call, "-1 SP PC" blocked outside one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syscall {
    /// The system call number; negative when not in one.
    pub nr: i64,
    pub arg1: Option<i64>,
    /// Its user stack pointer and instruction pointer (the last two fields).
    pub sp_pc: Option<(u64, u64)>,
}

impl Syscall {
    /// `None` for "running" (the registers are not known then) or text that does not parse.
    pub fn parse(text: &str) -> Option<Self> {
        let f: Vec<&str> = text.split_whitespace().collect();
        let hex = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok();
        Some(Syscall {
            nr: f.first()?.parse().ok()?,
            arg1: f
                .get(1)
                .and_then(|a| i64::from_str_radix(a.trim_start_matches("0x"), 16).ok()),
            sp_pc: (f.len() >= 3)
                .then(|| Some((hex(f[f.len() - 2])?, hex(f[f.len() - 1])?)))
                .flatten(),
        })
    }
}

/// A thread's [`Syscall`]: `None` while it runs, or once it is gone.
pub fn task_syscall(pid: u32, tid: u32) -> Option<Syscall> {
    Syscall::parse(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?)
}

/// A line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    /// Mapped with execute permission.
    pub exec: bool,
    /// Offset in the file.
    pub offset: u64,
    /// The file, `[name]` of a special mapping, or empty.
    pub path: String,
}

/// `/proc/PID/maps`. Read as bytes, not a String: file names need not be UTF-8, and one such
/// mapping must not make the whole process unreadable (files are opened through
/// `map_files`, not by the name).
pub fn maps(pid: u32) -> io::Result<Vec<MapLine>> {
    let bytes = std::fs::read(format!("/proc/{pid}/maps"))?;
    Ok(parse_maps(&String::from_utf8_lossy(&bytes)))
}

/// The lines of a `/proc/PID/maps` text; a line that does not parse is skipped.
pub fn parse_maps(text: &str) -> Vec<MapLine> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, char::is_whitespace);
            let (a, b) = it.next()?.split_once('-')?;
            let perms = it.next()?;
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let _ino = it.next()?;
            let path = it.next().unwrap_or("").trim().to_string();
            Some(MapLine {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                offset,
                path,
            })
        })
        .collect()
}

/// The container id in `/proc/PID/cgroup` (see [`container_id_from_cgroup`]).
pub fn container_id(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    container_id_from_cgroup(&text)
}

/// The last 64-hex-digit component of a cgroup path (`/docker/<id>`,
/// `.../cri-containerd-<id>.scope`, `.../crio-<id>.scope`, `libpod-<id>`).
pub fn container_id_from_cgroup(text: &str) -> Option<String> {
    for line in text.lines() {
        // A line without the two colons says nothing; the next one may still name the id.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for comp in path.rsplit('/') {
            let comp = comp.trim_end_matches(".scope");
            let id = comp.rsplit(['-', ':']).next().unwrap_or(comp);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(id.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    //! `/proc` files of any process: odd names, numbers that do not fit, broken lines. The
    //! lines that are well-formed must come out exactly (a lost libpython line means a Python
    //! process refused as not Python).

    use super::*;
    use proptest::prelude::*;

    fn fields(m: &MapLine) -> (u64, u64, u64, &str) {
        (m.start, m.end, m.offset, m.path.as_str())
    }

    #[test]
    fn odd_lines() {
        let text = "\
7f0000000000-7f0000001000 r-xp 00000000 08:01 42                         /tmp/my python (1)/libpython3.12.so.1.0\n\
7f0000001000-7f0000002000 r--p 00001000 08:01 42                         /usr/lib/libpython3.12.so.1.0 (deleted)\n\
\n\
7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n\
1ffffffffffffffff-7f0000003000 r-xp 00000000 08:01 42 /overflowing/start\n\
7f0000003000-7f0000004000 r-xp 10000000000000000 08:01 42 /overflowing/offset\n\
7f0000004000-7f0000005000 r-xp 00000000 08:01\n\
7f0000005000 r-xp 00000000 08:01 42 /no/end\n\
\u{0}\u{1}\u{fffd}-\u{7f}\n\
7f0000006000-7f0000007000 r-xp 00002000 08:01 42 /last/line/without/newline";
        let m = parse_maps(text);
        let got: Vec<_> = m.iter().map(fields).collect();
        assert_eq!(
            got,
            [
                (
                    0x7f0000000000,
                    0x7f0000001000,
                    0,
                    "/tmp/my python (1)/libpython3.12.so.1.0"
                ),
                (
                    0x7f0000001000,
                    0x7f0000002000,
                    0x1000,
                    "/usr/lib/libpython3.12.so.1.0 (deleted)"
                ),
                (0x7f0000002000, 0x7f0000003000, 0, ""),
                (
                    0x7f0000006000,
                    0x7f0000007000,
                    0x2000,
                    "/last/line/without/newline"
                ),
            ]
        );
    }

    #[test]
    fn exec_permission_and_fields() {
        let m = parse_maps(
            "55d5c0a00000-55d5c0a01000 r--p 00000000 08:01 131 /usr/bin/python3.11\n\
             55d5c0a01000-55d5c0c00000 r-xp 00001000 08:01 131 /usr/bin/python3.11\n\
             7ffd1c3f0000-7ffd1c411000 rw-p 00000000 00:00 0                          [stack]\n",
        );
        assert_eq!(m.len(), 3);
        assert!(!m[0].exec && m[1].exec && !m[2].exec);
        assert_eq!(
            (m[1].offset, m[1].path.as_str()),
            (0x1000, "/usr/bin/python3.11")
        );
        assert_eq!(m[2].path, "[stack]");
    }

    /// Paths as the kernel prints them: absolute or a `[name]`, no newline (it escapes that
    /// one), not ending in white space (the line's end is trimmed, so such a name would lose
    /// it; files are opened through `map_files`, which does not need the name).
    fn kernel_path() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("[heap]".to_string()),
            "/([^\\n\\r]{0,200}\\S)?",
            "/[a-z ]{1,20}/libpython3\\.[0-9]{1,2}\\.so(\\.1\\.0)?( \\(deleted\\))?",
        ]
    }

    /// A line of anything but a newline: short text, or thousands of arbitrary bytes.
    fn garbage_line() -> impl Strategy<Value = String> {
        prop_oneof![
            "[^\\n]{0,100}",
            proptest::collection::vec(any::<u8>(), 2000..5000)
                .prop_map(|b| String::from_utf8_lossy(&b).replace('\n', " ")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Well-formed lines, as the kernel pads them, mixed with garbage lines (very long
        /// ones included): each well-formed line comes out exactly and in order. Garbage may
        /// parse as a line of its own; that is not checked.
        #[test]
        fn maps_with_garbage_lines(
            lines in proptest::collection::vec((
                any::<u64>(), any::<u64>(), any::<u64>(), kernel_path(),
                proptest::option::of(garbage_line()),
            ), 0..20),
        ) {
            let mut text = String::new();
            for (start, end, offset, path, garbage) in &lines {
                if let Some(g) = garbage {
                    text.push_str(g);
                    text.push('\n');
                }
                let head = format!("{start:08x}-{end:08x} r-xp {offset:08x} fd:01 1234567 ");
                if path.is_empty() {
                    text.push_str(&head);
                } else {
                    text.push_str(&format!("{head:<73}{path}"));
                }
                text.push('\n');
            }
            let parsed = parse_maps(&text);
            let mut rest = parsed.iter();
            for (start, end, offset, path, _) in &lines {
                let want = (*start, *end, *offset, path.as_str());
                prop_assert!(rest.any(|m| fields(m) == want), "{:x?} missing", want);
            }
        }

        /// Arbitrary bytes, made text lossily: no panic, no path with a line break.
        #[test]
        fn maps_of_binary_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            for m in parse_maps(&String::from_utf8_lossy(&bytes)) {
                prop_assert!(!m.path.contains('\n'));
            }
        }
    }

    #[test]
    fn stat_with_a_name_holding_parentheses_and_spaces() {
        let s = Stat::parse(
            "42 (a) b (c)) S 7 42 42 0 -1 4194560 10 0 0 0 11 12 13 14 20 0 1 0 99 0 0\n",
        );
        assert_eq!(
            (
                s.state,
                s.ppid,
                s.flags,
                s.utime,
                s.stime,
                s.cutime,
                s.cstime,
                s.start_time
            ),
            (
                'S',
                Some(7),
                Some(4194560),
                Some(11),
                Some(12),
                Some(13),
                Some(14),
                Some(99)
            )
        );
        assert!(!s.is_exited() && Stat::parse("1 (x) Z 0").is_exited());
        assert_eq!(Stat::parse("").state, '?');
        let me = stat(std::process::id()).unwrap();
        assert_eq!(me.ppid, Some(std::os::unix::process::parent_id()));
        assert!(me.start_time.is_some_and(|t| t > 0));
        assert!(tasks(std::process::id())
            .unwrap()
            .contains(&std::process::id()));
    }

    #[test]
    fn syscall_lines() {
        let s = Syscall::parse("0 0x3 0x7ffd 0x10 0x0 0x0 0x0 0x7ffd0 0x7f12\n").unwrap();
        assert_eq!(
            (s.nr, s.arg1, s.sp_pc),
            (0, Some(3), Some((0x7ffd0, 0x7f12)))
        );
        let s = Syscall::parse("-1 0x7ffd0 0x7f12").unwrap();
        assert_eq!((s.nr, s.sp_pc), (-1, Some((0x7ffd0, 0x7f12))));
        assert_eq!(Syscall::parse("running\n"), None);
        assert_eq!(Syscall::parse(""), None);
    }

    #[test]
    fn status_fields() {
        let s = Status::parse("Name:\tx\nTgid:\t12\nTracerPid:\t0\nUid:\t1000\t0\t0\t1000\nNSpid:\t12\t1\nSigBlk:\t0000000000010000\n");
        assert_eq!(s.tgid, Some(12));
        assert_eq!(s.tracer_pid, Some(0));
        assert_eq!(s.uids, [0, 1000]);
        assert_eq!(s.nspid, Some(1));
        assert_eq!(s.sig_blk, Some(0x10000));
        assert_eq!(Status::parse(""), Status::default());
        assert_eq!(
            status(std::process::id()).unwrap().nspid,
            Some(std::process::id())
        );
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for text in [
            format!("0::/docker/{id}\n"),
            format!("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope\n"),
            format!("0::/system.slice/crio-{id}.scope\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
            format!("12:cpu,cpuacct:/docker/{id}\n0::/\n"),
        ] {
            assert_eq!(
                container_id_from_cgroup(&text).as_deref(),
                Some(id),
                "{text}"
            );
        }
        assert_eq!(
            container_id_from_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
        assert_eq!(container_id_from_cgroup("0::/\n"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any cgroup file: an id only if it is 64 hex digits that occur in the text.
        #[test]
        fn container_id_of_anything(text in "\\PC{0,400}|([0-9]{1,2}:[a-z,]{0,10}:[/a-z0-9.:-]{0,80}\\n){0,5}") {
            if let Some(id) = container_id_from_cgroup(&text) {
                prop_assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
                prop_assert!(text.contains(&id));
            }
        }

        /// A container's id under each runtime's naming, after any number of other lines
        /// (cgroup v1 controllers, an empty or broken line): found.
        #[test]
        fn container_id_after_other_lines(
            id in "[0-9a-f]{64}",
            before in proptest::collection::vec("[0-9]{1,2}:[a-z,]{0,10}:/[a-z0-9./-]{0,40}|[^\\n:]{0,40}", 0..5),
            form in 0usize..4,
        ) {
            let path = [
                format!("/docker/{id}"),
                format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"),
                format!("/system.slice/crio-{id}.scope"),
                format!("/machine.slice/libpod-{id}.scope/container"),
            ][form].clone();
            let text = format!("{}{}0::{path}\n", before.join("\n"), if before.is_empty() { "" } else { "\n" });
            prop_assert_eq!(container_id_from_cgroup(&text), Some(id));
        }
    }
}
