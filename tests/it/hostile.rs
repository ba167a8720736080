//! A hostile target: nothing a profiled process controls can make root perfpy read another
//! file, hang, or lose the profile. The target runs as `nobody` in a chroot of its own, in
//! another PID and mount namespace, running machine code from an anonymous mapping (as a JIT
//! does) so that perfpy reads its perf map; the test replaces that perf map with links,
//! FIFOs, devices, huge and foreign files.

use perfpy_test_support as common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

/// A chroot with the host's /usr bound read-only, a /tmp of its own, running
/// `/usr/bin/python3.11 /jit.py` as nobody as pid 1 of a new PID namespace.
struct Jail {
    root: PathBuf,
    _w: Workload,
    /// The Python process, as our PID namespace numbers it.
    pid: i32,
    /// The address and size of its jitted code.
    code: (u64, u64),
}

impl Drop for Jail {
    fn drop(&mut self) {
        // `unshare --kill-child` does not reach it: the death signal is cleared when chroot
        // changes its user. By pid, a process this test started.
        // SAFETY: kill(2) with a pid this test started; no memory involved.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

impl Jail {
    fn start(name: &str) -> Jail {
        let root = tmp(name);
        let _ = std::fs::remove_dir_all(&root);
        for d in ["usr", "tmp", "proc", "dev"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for l in ["lib", "lib64", "bin"] {
            symlink(format!("usr/{l}"), root.join(l)).unwrap();
        }
        std::fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        std::fs::copy(testdata("jit.py"), root.join("jit.py")).unwrap();
        let script = r#"set -e
R="$1"
mount --rbind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
mount -t proc proc "$R/proc"
exec chroot --userspec=65534:65534 "$R" /usr/bin/python3.11 /jit.py
"#;
        let w = Workload::start(
            Command::new("unshare")
                .args([
                    "--mount",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "sh",
                    "-c",
                    script,
                    "sh",
                ])
                .arg(&root)
                .stdin(Stdio::null()),
        );
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", w.pid())).unwrap();
        let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
        let text = std::fs::read_to_string(root.join("tmp/jit-addr")).unwrap();
        let mut it = text
            .split_whitespace()
            .map(|x| u64::from_str_radix(x, 16).unwrap());
        let code = (it.next().unwrap(), it.next().unwrap());
        // The perf map is named after the pid the process sees: 1, as its namespace's first.
        assert!(std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")));
        Jail {
            root,
            _w: w,
            pid,
            code,
        }
    }

    fn perf_map(&self) -> PathBuf {
        self.root.join("tmp/perf-1.map")
    }

    fn clear(&self) {
        let p = self.perf_map();
        if p.is_dir() {
            std::fs::remove_dir(&p).unwrap();
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }

    /// A valid perf map naming the jitted code `name`.
    fn map_text(&self, name: &str) -> String {
        format!("{:x} {:x} {name}\n", self.code.0, self.code.1)
    }
}

/// Whether anyone opens the FIFO `path` for reading while it watches (a writer's non-blocking
/// open succeeds only then).
fn watch_fifo(path: &Path) -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    let opened = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (o, d, p) = (opened.clone(), done.clone(), path.to_path_buf());
    std::thread::spawn(move || {
        while !d.load(Ordering::Relaxed) {
            if std::fs::OpenOptions::new()
                .write(true)
                .custom_flags_nonblock()
                .open(&p)
                .is_ok()
            {
                o.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    (opened, done)
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}
impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NONBLOCK)
    }
}

fn record(pid: i32, out: &Path) -> (std::process::Output, Duration) {
    let t = Instant::now();
    let o = Record::to(out)
        .args(["-p", &pid.to_string()])
        .duration("1.5")
        .rate(499)
        .run();
    (o, t.elapsed())
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

#[test]
fn a_hostile_perf_map_is_refused_never_followed_and_the_profile_is_written() {
    let jail = Jail::start("jail-perfmap");
    let host = tmp("hostile-host");
    std::fs::create_dir_all(&host).unwrap();
    // A file of root's outside the jail that parses as a perf map naming the jitted code: if
    // perfpy ever read it, the profile would name this function.
    let secret = host.join("secret.map");
    std::fs::write(&secret, jail.map_text("LEAKED_HOST_FILE")).unwrap();
    let fifo = host.join("outside.fifo");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();

    let cases = perf_map_cases(&jail, &secret, &fifo);
    let (opened, done) = watch_fifo(&fifo);
    for (i, (name, make, want)) in cases.iter().enumerate() {
        check_perf_map_case(&jail, i, name, make, *want);
    }
    done.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(10));
    assert!(
        !opened.load(Ordering::Relaxed),
        "the FIFO outside the jail was opened for reading"
    );
}

/// How a case makes the target's perf map.
type Make<'a> = Box<dyn Fn(&Path) + 'a>;

/// The perf maps a hostile target can make: (name, how it is made, what the warning must say;
/// None: accepted). `secret` is a root file outside the jail, `fifo` a FIFO outside it.
fn perf_map_cases<'a>(
    jail: &'a Jail,
    secret: &'a Path,
    fifo: &'a Path,
) -> Vec<(&'static str, Make<'a>, Option<&'static str>)> {
    vec![
        (
            "plain file of the target's user",
            Box::new(|p: &Path| {
                std::fs::write(p, jail.map_text("jitted_loop")).unwrap();
                chown(p, NOBODY);
            }),
            None,
        ),
        (
            "link to a root-only file outside its root",
            Box::new(move |p: &Path| symlink(secret, p).unwrap()),
            Some("symbolic link"),
        ),
        (
            "link to a FIFO outside its root",
            Box::new(move |p: &Path| symlink(fifo, p).unwrap()),
            Some("symbolic link"),
        ),
        (
            "link into /proc",
            Box::new(|p: &Path| symlink("/proc/1/environ", p).unwrap()),
            Some("symbolic link"),
        ),
        (
            "link to /dev/zero",
            Box::new(|p: &Path| symlink("/dev/zero", p).unwrap()),
            Some("symbolic link"),
        ),
        (
            "FIFO",
            Box::new(|p: &Path| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
                chown(p, NOBODY);
            }),
            Some("a FIFO, not a regular file"),
        ),
        (
            "2 GB sparse file",
            Box::new(|p: &Path| {
                std::fs::File::create(p).unwrap().set_len(2 << 30).unwrap();
                chown(p, NOBODY);
            }),
            Some("more than the"),
        ),
        (
            "file of another user",
            Box::new(|p: &Path| {
                std::fs::write(p, jail.map_text("OTHER_USERS_FILE")).unwrap();
            }),
            Some("owned by uid 0"),
        ),
        (
            "10 MB single line",
            Box::new(|p: &Path| {
                std::fs::write(p, vec![b'7'; 10 << 20]).unwrap();
                chown(p, NOBODY);
            }),
            None,
        ),
        (
            "binary garbage",
            Box::new(|p: &Path| {
                let bytes: Vec<u8> = (0..1_000_000u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                std::fs::write(p, bytes).unwrap();
                chown(p, NOBODY);
            }),
            None,
        ),
    ]
}

/// One case: perfpy records the jailed target with that perf map, in bounded time, exit 0 with
/// a profile, never reading what it must not, warning why it refused it (and `info` too).
fn check_perf_map_case(jail: &Jail, i: usize, name: &str, make: &Make<'_>, want: Option<&str>) {
    let pid = jail.pid;
    jail.clear();
    make(&jail.perf_map());
    let inner_fifo = jail
        .perf_map()
        .metadata()
        .is_ok_and(|m| m.mode() & libc::S_IFMT == libc::S_IFIFO);
    let (inner_opened, inner_done) = if inner_fifo {
        let (o, d) = watch_fifo(&jail.perf_map());
        (Some(o), Some(d))
    } else {
        (None, None)
    };
    let out = tmp(&format!("hostile-{i}.pb.gz"));
    let (o, took) = record(pid, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{name}: exit {:?}\n{err}", o.status);
    assert!(took < Duration::from_secs(10), "{name}: took {took:?}");
    let d = decode(&out);
    assert!(d.total() > 30, "{name}: {} samples", d.total());
    let names: Vec<String> = d
        .samples
        .iter()
        .flat_map(|s| s.frames.iter().map(|f| f.function.clone()))
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("LEAKED") || n.contains("OTHER_USERS")),
        "{name}: a file it must not read was read"
    );
    match want {
        None => assert!(!err.contains("perf map not read"), "{name}: {err}"),
        Some(w) => {
            let line = err
                .lines()
                .find(|l| l.contains("perf map not read"))
                .unwrap_or_else(|| panic!("{name}: no warning\n{err}"));
            assert!(
                line.contains(w) && line.contains("perf-1.map"),
                "{name}: {line}"
            );
        }
    }
    if name == "plain file of the target's user" {
        // The path works at all: the jitted code is named from the target's own map.
        let named = d.count_where(|s| s.has("jitted_loop"));
        assert!(
            named as f64 > 0.5 * d.total() as f64,
            "jitted code named in {named} of {} samples",
            d.total()
        );
    }
    if let (Some(o), Some(d)) = (inner_opened, inner_done) {
        d.store(true, Ordering::Relaxed);
        assert!(!o.load(Ordering::Relaxed), "{name}: the FIFO was opened");
    }
    // `info` reads it the same way, and says why it refused it.
    if let Some(w) = want {
        let o = run_perfpy(&["info", "-p", &pid.to_string()]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("perf map refused") && text.contains(w),
            "{name}: info says\n{text}"
        );
    }
}

/// A busy Python for two minutes (Debian's interpreter: no pyenv needed).
fn busy_target() -> Workload {
    Workload::start(
        Command::new("python3.11")
            .arg(testdata("busy_any.py"))
            .arg("120"),
    )
}

#[test]
fn special_output_paths_are_refused_before_recording() {
    let w = busy_target();
    for (path, want) in [
        ("/dev/full", "it is a device"),
        ("/proc/version", "cannot create a file in /proc"),
        ("/tmp", "it is a directory"),
    ] {
        let t = Instant::now();
        let o = run_perfpy(&["record", "-p", &w.pid().to_string(), "-d", "30", "-o", path]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{path}: {err}");
        assert!(err.contains(path) && err.contains(want), "{path}: {err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{path}: checked late");
    }
}

/// A tmpfs of one page, full: every write of a profile fails.
struct FullDisk(PathBuf);

impl FullDisk {
    fn mount(name: &str) -> FullDisk {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4k", "perfpy-test-full"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        std::fs::write(dir.join("old.pb.gz"), vec![b'o'; 4096]).unwrap();
        FullDisk(dir)
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_names_the_file_and_leaves_nothing_partial() {
    let disk = FullDisk::mount("full-disk");
    let w = busy_target();
    for name in ["old.pb.gz", "new.pb.gz", "new.txt", "new.svg"] {
        let path = disk.0.join(name);
        let o = Record::to(&path).pid(w.pid()).duration("1").rate(499).run();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("cannot write the profile to {}", path.display()))
                && err.contains("No space left"),
            "{name}: {err}"
        );
        let mut left: Vec<String> = std::fs::read_dir(&disk.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["old.pb.gz"], "{name}: files left");
        assert_eq!(
            std::fs::read(disk.0.join("old.pb.gz")).unwrap(),
            vec![b'o'; 4096],
            "{name}: the existing file was changed"
        );
    }
}

#[test]
fn a_closed_stderr_does_not_kill_perfpy() {
    let w = busy_target();
    let out = tmp("sigpipe.pb.gz");
    let _ = std::fs::remove_file(&out);
    // As `perfpy record ... 2>&1 >/dev/null | head -1`: the reader goes after one line.
    let mut p = Command::new(perfpy())
        .args([
            "record",
            "-p",
            &w.pid().to_string(),
            "-d",
            "1.5",
            "-r",
            "499",
            "-o",
        ])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(p.stderr.take().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("sampling"), "{line}");
    drop(r);
    let status = wait_exit(&mut p, Duration::from_secs(20)).expect("perfpy ended");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(decode(&out).total() > 30);

    // The profile on stdout, read by a reader that stops early: no error either.
    let mut p = Command::new(perfpy())
        .args([
            "record",
            "-p",
            &w.pid().to_string(),
            "-d",
            "1",
            "-r",
            "499",
            "-f",
            "collapsed",
            "-o",
            "-",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    std::io::Read::read_exact(p.stdout.as_mut().unwrap(), &mut head).unwrap();
    drop(p.stdout.take());
    let status = wait_exit(&mut p, Duration::from_secs(20)).expect("perfpy ended");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_signal_while_frames_are_named_ends_the_run_promptly_with_the_profile() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let out = tmp(&format!("sym-signal-{sig}.pb.gz"));
        let _ = std::fs::remove_file(&out);
        // The whole machine, in a PID namespace of its own (perfpy is its first process, a
        // busy Python its child): a recording with kernel, native and Python frames to name.
        let script = format!(
            "python3.11 {} 60 >/dev/null & exec {} record -a -d 3 -r 999 -o {}",
            testdata("busy_any.py").display(),
            perfpy().display(),
            out.display()
        );
        let mut u = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .env("RUST_LOG", "perfpy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let r = u.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if line.contains("sampling ended; naming frames") {
                    let _ = tx.send(());
                }
                if !line.contains("DEBUG") {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
            all
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("naming started");
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", u.id())).unwrap();
        let perfpy_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
        let t = Instant::now();
        // SAFETY: kill(2) to perfpy, a process this test started; no memory involved.
        unsafe { libc::kill(perfpy_pid, sig) };
        let st = wait_exit(&mut u, Duration::from_secs(10)).expect("perfpy ended");
        let took = t.elapsed();
        let err = log.join().unwrap();
        eprintln!("{err}");
        assert!(st.success(), "signal {sig}: {st:?}\n{err}");
        assert!(
            took < Duration::from_secs(2),
            "signal {sig}: ended {took:?} after it"
        );
        assert!(
            err.contains("naming of frames cut short by a signal"),
            "{err}"
        );
        let d = decode(&out);
        assert!(d.total() > 100, "signal {sig}: {} samples", d.total());
        check_go_pprof(&out);
    }
}
