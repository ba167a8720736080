//! The eBPF walker on synthetic CPython 3.14 / 3.15 memory: a runtime, an interpreter, a thread
//! state and a frame chain built in this test's own memory (offsets from a real table), the
//! walker registered for this process and run by a real cpu-clock event on this thread. Checks
//! the tagged `_PyStackRef` code pointers (tag bits masked, tagged ints skipped) and the frame
//! owners (3.14: INTERPRETER = 3 entry shims and CSTACK = 4; 3.15: INTERPRETER only).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use perf_event_open_sys as pe;
use perfpy_bpf::{debug_offsets, Offsets, PyProcess, Walker};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A zeroed buffer at a stable address, kept alive by the test.
struct Obj(Box<[u8]>);

impl Obj {
    fn new(n: usize) -> Obj {
        Obj(vec![0u8; n].into_boxed_slice())
    }
    fn addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }
    fn put(&mut self, at: i32, v: u64) {
        let at = at as usize;
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u8(&mut self, at: i32, v: u8) {
        self.0[at as usize] = v;
    }
}

fn cpu_clock_on_this_thread() -> OwnedFd {
    let mut attr = pe::bindings::perf_event_attr {
        size: std::mem::size_of::<pe::bindings::perf_event_attr>() as u32,
        type_: pe::bindings::PERF_TYPE_SOFTWARE,
        config: pe::bindings::PERF_COUNT_SW_CPU_CLOCK as u64,
        ..Default::default()
    };
    attr.__bindgen_anon_1.sample_period = 1_000_000;
    // SAFETY: a fully initialised attr whose size field is its own size; the kernel only reads it.
    let fd = unsafe {
        pe::perf_event_open(
            &mut attr,
            0,
            -1,
            -1,
            pe::bindings::PERF_FLAG_FD_CLOEXEC as _,
        )
    };
    assert!(
        fd >= 0,
        "perf_event_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Frames, newest first: `a` (code pointer tagged deferred), a tagged int, an entry shim owned
/// by INTERPRETER (3), `b` (untagged), then for 3.14 a CSTACK (4) frame, and the outer shim.
fn walk(v: perfpy_process::Version, table: &[u8]) {
    let o: Offsets = debug_offsets::parse(table, v).unwrap().offsets;
    let mut runtime = Obj::new(o.runtime_interp_head as usize + 8);
    let mut interp = Obj::new(o.interp_tstate_head as usize + 8);
    let mut tstate = Obj::new(1024);
    let mut frames: Vec<Obj> = (0..5).map(|_| Obj::new(128)).collect();
    let code_a = Obj::new(512);
    let code_b = Obj::new(512);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u64;
    runtime.put(o.runtime_interp_head, interp.addr());
    interp.put(o.interp_tstate_head, tstate.addr());
    tstate.put(o.tstate_native_tid, tid);
    tstate.put(o.tstate_next, 0);
    tstate.put(o.tstate_current_frame, frames[0].addr());
    let addrs: Vec<u64> = frames.iter().map(|f| f.addr()).collect();
    let chain: Vec<(u64, u8)> = vec![
        (code_a.addr() | 1, 0), // deferred reference to `a`
        ((42 << 2) | 3, 0),     // a tagged int: not a frame to report
        (0, 3),                 // FRAME_OWNED_BY_INTERPRETER: entry shim of `a`'s eval call
        (code_b.addr(), 0),     // `b`, a plain reference
        (
            0,
            if v == perfpy_process::Version::new(3, 14) {
                4
            } else {
                3
            },
        ), // 3.14: CSTACK; 3.15: another entry shim
    ];
    for (i, (code, owner)) in chain.iter().enumerate() {
        let next = addrs.get(i + 1).copied().unwrap_or(0);
        frames[i].put(o.frame_code, *code);
        frames[i].put(o.frame_previous, next);
        frames[i].put_u8(o.frame_owner, *owner);
    }
    let mut w = Walker::load(perfpy_bpf::DEFAULT_PY_FRAMES).expect("load the walker");
    let ev = cpu_clock_on_this_thread();
    w.attach(ev.as_fd()).expect("attach");
    w.add_process(&PyProcess {
        pid: std::process::id(),
        version: v,
        runtime: runtime.addr(),
        offsets: o,
    })
    .unwrap();
    let t = Instant::now();
    let mut x = 0u64;
    while t.elapsed() < Duration::from_millis(200) {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
    }
    let mut got = Vec::new();
    w.poll(&mut |s| got.push(s));
    let mine: Vec<_> = got.iter().filter(|s| s.tid as u64 == tid).collect();
    assert!(mine.len() >= 20, "{v:?}: {} records", mine.len());
    for s in mine {
        assert!(!s.read_error && !s.no_thread_state, "{v:?}: {s:?}");
        let codes: Vec<u64> = s.frames.iter().map(|f| f.code).collect();
        assert_eq!(codes, vec![code_a.addr(), code_b.addr()], "{v:?}");
        // Each frame ends its eval call's group; the shim under it is where that call is.
        assert!(s.frames.iter().all(|f| f.entry), "{v:?}: {s:?}");
        assert_eq!(s.frames[0].first_local, addrs[2], "{v:?}");
        assert_eq!(s.frames[1].first_local, addrs[4], "{v:?}");
    }
    drop(frames);
}

#[test]
fn tagged_code_pointers_and_owners_on_synthetic_314_and_315_memory() {
    if !root() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI runs as root"
        );
        eprintln!("NOTE: not root: the walker cannot load; not run");
        return;
    }
    walk(
        perfpy_process::Version::new(3, 14),
        include_bytes!("../../../testdata/debug_offsets/debian-3.14.bin"),
    );
    walk(
        perfpy_process::Version::new(3, 15),
        include_bytes!("../../../testdata/debug_offsets/debian-3.15.bin"),
    );
}
