//! User-space unwinding of a sampled stack: framehop with the `.eh_frame`/`.debug_frame` of the
//! mapped files (frame pointers where a file has no CFI for an address), plus an explicit rule for
//! CPython's perf trampolines, which live in anonymous memory that no unwind table describes.
//!
//! CPython 3.12 and 3.13 (`Python/asm_trampoline.S`, x86-64) copy this code once per Python code
//! object and call each Python function's evaluation through its copy:
//!
//! ```text
//!   [endbr64]            f3 0f 1e fa      (CET builds only)
//!   sub  $8, %rsp        48 83 ec 08
//!   call *%rcx           ff d1
//!   add  $8, %rsp        48 83 c4 08      <- return address of the callee
//!   ret                  c3
//! ```
//!
//! At the return address: CFA = RSP + 16, return address = [CFA - 8]; RBP is untouched.
//! We recognise the code from its bytes, read from the target once per address and cached.

use std::collections::HashMap;

use framehop::x86_64::UnwindRegsX86_64;
use framehop::{FrameAddress, Unwinder};
use perfpy_process::ReadMemory;

use crate::process::Process;

const SUB: [u8; 4] = [0x48, 0x83, 0xec, 0x08];
const CALL: [u8; 2] = [0xff, 0xd1];
const ADD: [u8; 4] = [0x48, 0x83, 0xc4, 0x08];
const RET: u8 = 0xc3;
const ENDBR: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Bytes read around an address: 10 before (back to `sub` from after `ret`), 14 from it on.
pub const WINDOW: usize = 24;

/// Where in a trampoline an address is, which decides how to step out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrampolineAt {
    /// At `endbr64` or `sub` (nothing pushed yet): RA = [RSP], CFA = RSP + 8.
    Entry,
    /// At `call` (after `sub`): RA = [RSP + 8], CFA = RSP + 16.
    Call,
    /// At `add` (the callee's return address): RA = [RSP + 8], CFA = RSP + 16.
    AfterCall,
    /// At `ret`: RA = [RSP], CFA = RSP + 8.
    Ret,
}

impl TrampolineAt {
    fn cfa_offset(self) -> u64 {
        match self {
            TrampolineAt::Entry | TrampolineAt::Ret => 8,
            TrampolineAt::Call | TrampolineAt::AfterCall => 16,
        }
    }
}

/// Classifies `addr` given `window`, the code bytes at `addr - 10 .. addr + 14`.
pub fn classify_trampoline(window: &[u8; WINDOW]) -> Option<TrampolineAt> {
    // Index of `addr` inside the window.
    const A: usize = 10;
    let at = |off: isize, pat: &[u8]| -> bool {
        let s = A as isize + off;
        s >= 0
            && (s as usize + pat.len()) <= WINDOW
            && &window[s as usize..s as usize + pat.len()] == pat
    };
    // Body = sub(4) call(2) add(4) ret(1), starting at `addr + off`.
    let body_at = |off: isize| {
        at(off, &SUB) && at(off + 4, &CALL) && at(off + 6, &ADD) && at(off + 10, &[RET])
    };
    if body_at(-6) {
        return Some(TrampolineAt::AfterCall);
    }
    if body_at(-4) {
        return Some(TrampolineAt::Call);
    }
    if body_at(0) {
        return Some(TrampolineAt::Entry);
    }
    if at(0, &ENDBR) && at(4, &SUB) && at(8, &CALL) {
        return Some(TrampolineAt::Entry);
    }
    if body_at(-10) {
        return Some(TrampolineAt::Ret);
    }
    None
}

/// Per-process cache of trampoline classification by address (anonymous code only).
#[derive(Default)]
pub struct TrampolineCache {
    known: HashMap<u64, Option<TrampolineAt>>,
}

impl TrampolineCache {
    /// Whether `addr` was seen to be in a perf trampoline (no memory read).
    pub fn is_known_trampoline(&self, addr: u64) -> bool {
        matches!(self.known.get(&addr), Some(Some(_)))
    }

    pub fn classify(&mut self, addr: u64, mem: &dyn ReadMemory) -> Option<TrampolineAt> {
        if let Some(k) = self.known.get(&addr) {
            return *k;
        }
        // Not a user-space address (a garbage return address): nothing to read.
        if !(0x1000..0x0000_8000_0000_0000).contains(&addr) {
            return None;
        }
        // Read the two halves separately: code at the start or end of a mapping has one half
        // unreadable, which must not hide the other. Unreadable bytes become int3.
        let mut w = [0xccu8; WINDOW];
        // Mappings are page-granular: what cannot be read as a whole is read up to the page
        // boundary (the first trampoline of an arena starts right at a page).
        let page_start = addr & !0xfff;
        let page_end = page_start.saturating_add(0x1000);
        let before = mem.read_all(addr.wrapping_sub(10), &mut w[..10]) || {
            let n = (addr - page_start).min(10) as usize;
            n > 0 && mem.read_all(addr - n as u64, &mut w[10 - n..10])
        };
        let after = mem.read_all(addr, &mut w[10..]) || {
            let n = (page_end - addr).min((WINDOW - 10) as u64) as usize;
            mem.read_all(addr, &mut w[10..10 + n])
        };
        let k = if before || after {
            classify_trampoline(&w)
        } else {
            None
        };
        // Bounded: a process generating endless code cannot grow this without limit.
        if self.known.len() > 1 << 20 {
            self.known.clear();
        }
        self.known.insert(addr, k);
        k
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindOutcome {
    /// Reached the outermost frame (`_start`, `clone`) or a zero return address.
    pub complete: bool,
    /// Went through at least one perf trampoline.
    pub trampolines: u32,
    /// Stopped at the frame limit or at the end of the copied stack: the outer frames are
    /// missing (the stack is marked `[truncated]`), the inner ones are right.
    pub truncated: bool,
    /// The truncation came from `max_frames`, not from the copy's end.
    pub at_frame_limit: bool,
}

/// Unwinds from user registers over the copied stack (which starts at `regs.sp`). Pushes the
/// instruction pointer, then return addresses, into `out`.
#[cfg(test)]
pub fn unwind(
    proc: &mut Process,
    mem: &dyn ReadMemory,
    regs: [u64; 3],
    stack: &[u8],
    max_frames: usize,
    out: &mut Vec<u64>,
) -> UnwindOutcome {
    unwind_sp(proc, mem, regs, stack, max_frames, out, None)
}

/// [`unwind`], also pushing into `sps` the stack pointer of each frame (`sps[i]` for `out[i]`):
/// frame `i`'s locals lie in `sps[i]..sps[i + 1]`.
pub fn unwind_sp(
    proc: &mut Process,
    mem: &dyn ReadMemory,
    regs: [u64; 3],
    stack: &[u8],
    max_frames: usize,
    out: &mut Vec<u64>,
    mut sps: Option<&mut Vec<u64>>,
) -> UnwindOutcome {
    let [bp, sp, ip] = regs;
    let stack_base = sp;
    // Set when the unwinder wanted a word just past the copied part of the stack: the stack
    // goes on, but the copy ended (a truncated stack, not a broken one).
    let beyond = std::cell::Cell::new(false);
    let mut read_stack = |addr: u64| -> Result<u64, ()> {
        let off = addr.checked_sub(stack_base).ok_or(())? as usize;
        match stack.get(off..off.checked_add(8).ok_or(())?) {
            Some(b) => Ok(u64::from_ne_bytes(b.try_into().map_err(|_| ())?)),
            None => {
                if off < stack.len() + (8 << 20) {
                    beyond.set(true);
                }
                Err(())
            }
        }
    };
    let mut regs = UnwindRegsX86_64::new(ip, sp, bp);
    let mut address = FrameAddress::from_instruction_pointer(ip);
    let mut outcome = UnwindOutcome::default();
    out.push(ip);
    if let Some(v) = sps.as_deref_mut() {
        v.push(sp);
    }
    loop {
        if out.len() >= max_frames {
            outcome.truncated = true;
            outcome.at_frame_limit = true;
            return outcome;
        }
        let pc = address.address();
        let in_file = proc.mapping(pc).is_some_and(|m| m.file.is_some());
        let tramp = if in_file {
            None
        } else {
            proc.trampolines.classify(pc, mem)
        };
        let next = if let Some(at) = tramp {
            // A return address can only sit after the call; a first frame anywhere.
            let at = if address.is_return_address() {
                TrampolineAt::AfterCall
            } else {
                at
            };
            outcome.trampolines += 1;
            let cfa = regs.sp().saturating_add(at.cfa_offset());
            match read_stack(cfa.saturating_sub(8)) {
                Ok(ra) => {
                    regs.set_sp(cfa);
                    Ok(Some(ra))
                }
                Err(()) => Err(()),
            }
        } else {
            let cache = proc.cache.get_or_insert_with(Default::default);
            proc.unwinder
                .unwind_frame(address, &mut regs, cache, &mut read_stack)
                .map_err(|_| ())
        };
        match next {
            // Nothing is ever mapped in the first pages (vm.mmap_min_addr): such a "return
            // address" is a value the unwinding misread, not a frame.
            Ok(Some(ra)) if ra >= 0x1000 => {
                match FrameAddress::from_return_address(ra) {
                    Some(a) => address = a,
                    None => {
                        outcome.complete = true;
                        return outcome;
                    }
                }
                regs.set_ip(ra);
                out.push(ra);
                if let Some(v) = sps.as_deref_mut() {
                    v.push(regs.sp());
                }
            }
            Ok(Some(ra)) if ra != 0 => {
                tracing::trace!(ra, "unwinding stopped at an impossible return address");
                return outcome;
            }
            Ok(_) => {
                outcome.complete = true;
                return outcome;
            }
            Err(()) => {
                // framehop reports the end of the stack as an error in some cases (e.g. the
                // frame-pointer rule on a null frame pointer after `_start`).
                outcome.truncated = beyond.get();
                tracing::trace!(pc = format_args!("{pc:#x}"), sp = format_args!("{:#x}", regs.sp()), tramp = ?tramp, in_file, mapping = ?proc.mapping(pc).map(|m| (m.start, m.end, m.file.as_ref().map(|f| f.path.clone()))), frames = out.len(), "unwinding stopped");
                return outcome;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A trampoline body at `base` (optionally with endbr64 first).
    fn trampoline_bytes(endbr: bool) -> Vec<u8> {
        let mut v = Vec::new();
        if endbr {
            v.extend(ENDBR);
        }
        v.extend(SUB);
        v.extend(CALL);
        v.extend(ADD);
        v.push(RET);
        v
    }

    struct Fixture {
        code: BTreeMap<u64, u8>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                code: BTreeMap::new(),
            }
        }
        fn put(&mut self, addr: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                self.code.insert(addr + i as u64, *b);
            }
        }
    }

    impl ReadMemory for Fixture {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.code.get(&(addr + i as u64)).copied().unwrap_or(0xcc);
            }
            Ok(buf.len())
        }
    }

    /// Memory readable only inside [start, end).
    struct Bounded {
        inner: Fixture,
        start: u64,
        end: u64,
    }

    impl ReadMemory for Bounded {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            if addr >= self.start && addr + buf.len() as u64 <= self.end {
                self.inner.read(addr, buf)
            } else {
                Ok(0)
            }
        }
    }

    proptest::proptest! {
        /// Any address, any memory: classification never panics (garbage return addresses
        /// reach it).
        #[test]
        fn classify_never_panics(addr in proptest::prelude::any::<u64>(), fill in proptest::prelude::any::<u8>()) {
            let mut f = Fixture::new();
            f.put(addr & !0xfff, &[fill; 64]);
            let mut c = TrampolineCache::default();
            let _ = c.classify(addr, &f);
        }

        /// Unwinding garbage stacks from garbage registers never panics or loops.
        #[test]
        fn unwind_garbage_never_panics(regs in proptest::prelude::any::<[u64; 3]>(), words in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..64)) {
            let mem = Fixture::new();
            let stack: Vec<u8> = words.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let mut p = Process::new(std::process::id(), crate::ids::ProcessKey(0));
            let mut out = Vec::new();
            let _ = unwind(&mut p, &mem, regs, &stack, 64, &mut out);
            proptest::prop_assert!(out.len() <= 64);
        }
    }

    #[test]
    fn trampoline_at_the_very_start_of_its_mapping() {
        let mut f = Fixture::new();
        let base = 0x7f35_7df6_9000u64;
        f.put(base, &trampoline_bytes(false));
        let mem = Bounded {
            inner: f,
            start: base,
            end: base + 0x1000,
        };
        let mut c = TrampolineCache::default();
        assert_eq!(c.classify(base + 6, &mem), Some(TrampolineAt::AfterCall));
        // And at the very end of a mapping.
        let mut f = Fixture::new();
        let end = 0x7f35_7df7_9000u64;
        f.put(end - 11, &trampoline_bytes(false));
        let mem = Bounded {
            inner: f,
            start: end - 0x1000,
            end,
        };
        let mut c = TrampolineCache::default();
        assert_eq!(c.classify(end - 5, &mem), Some(TrampolineAt::AfterCall));
    }

    fn window(mem: &Fixture, addr: u64) -> [u8; WINDOW] {
        let mut w = [0u8; WINDOW];
        mem.read_exact(addr - 10, &mut w).unwrap();
        w
    }

    #[test]
    fn classifies_every_position_with_and_without_endbr() {
        for endbr in [false, true] {
            let mut m = Fixture::new();
            let base = 0x7000_0000u64;
            m.put(base, &trampoline_bytes(endbr));
            let sub = base + if endbr { 4 } else { 0 };
            assert_eq!(
                classify_trampoline(&window(&m, sub)),
                Some(TrampolineAt::Entry)
            );
            if endbr {
                assert_eq!(
                    classify_trampoline(&window(&m, base)),
                    Some(TrampolineAt::Entry)
                );
            }
            assert_eq!(
                classify_trampoline(&window(&m, sub + 4)),
                Some(TrampolineAt::Call)
            );
            assert_eq!(
                classify_trampoline(&window(&m, sub + 6)),
                Some(TrampolineAt::AfterCall)
            );
            assert_eq!(
                classify_trampoline(&window(&m, sub + 10)),
                Some(TrampolineAt::Ret)
            );
            assert_eq!(classify_trampoline(&window(&m, sub + 1)), None);
        }
        let mut m = Fixture::new();
        m.put(0x1000, &[0x90; 32]);
        assert_eq!(classify_trampoline(&window(&m, 0x1010)), None);
    }

    /// A stack of: leaf in anonymous code using frame pointers → trampoline → anonymous code with
    /// frame pointers → trampoline → return address 0 (end). Checks the rule in the middle of a
    /// stack and the hand-over between the trampoline rule and framehop's fallback.
    #[test]
    fn unwinds_through_trampolines_in_the_middle() {
        let mut mem = Fixture::new();
        let t1 = 0x7f00_0000_1000u64;
        let t2 = 0x7f00_0000_2000u64;
        mem.put(t1, &trampoline_bytes(true));
        mem.put(t2, &trampoline_bytes(false));
        let ra1 = t1 + 4 + 6; // after `call` in trampoline 1
        let ra2 = t2 + 6;
        let leaf = 0x7f00_0001_0000u64; // anonymous, frame pointers
        let mid = 0x7f00_0001_8000u64;

        // Stack layout (addresses grow to the right), sp = S:
        // S+0: leaf's saved bp slot area ... we put the leaf's frame record at S+16.
        let s = 0x7ffc_0000_0000u64;
        let mut stack = vec![0u64; 32];
        // leaf frame: bp = S+16 -> [S+16] = caller bp (mid's frame record at S+64), [S+24] = ra1
        stack[2] = s + 64;
        stack[3] = ra1;
        // Trampoline 1 at its return address: CFA = sp + 16 where sp = S+32 after leaf's frame.
        // RA = [CFA - 8] = [S+40]
        stack[5] = mid;
        // mid frame (fallback: frame pointer): bp = S+64 -> [S+64] = 0, [S+72] = ra2
        stack[8] = 0;
        stack[9] = ra2;
        // Trampoline 2 at its return address: sp = S+80, CFA = S+96, RA = [S+88] = 0: end.
        stack[11] = 0;
        let bytes: Vec<u8> = stack.iter().flat_map(|v| v.to_ne_bytes()).collect();

        let mut p = Process::new(std::process::id(), crate::ids::ProcessKey(0));
        let mut out = Vec::new();
        let o = unwind(&mut p, &mem, [s + 16, s, leaf], &bytes, 128, &mut out);
        assert_eq!(out, vec![leaf, ra1, mid, ra2]);
        assert_eq!(o.trampolines, 2);
        assert!(o.complete);
    }

    #[test]
    fn truncated_stack_stops_without_garbage() {
        let mut mem = Fixture::new();
        let t1 = 0x7f00_0000_1000u64;
        mem.put(t1, &trampoline_bytes(false));
        let s = 0x7ffc_0000_0000u64;
        // The copy ends before the trampoline's return address slot.
        let stack = [s + 16, t1 + 6]
            .iter()
            .flat_map(|v: &u64| v.to_ne_bytes())
            .collect::<Vec<_>>();
        let mut p = Process::new(std::process::id(), crate::ids::ProcessKey(0));
        let mut out = Vec::new();
        // leaf with frame pointer at S: [S] = bp, [S+8] = ra (trampoline), then the trampoline
        // needs [S+16+8], beyond the copy.
        let o = unwind(
            &mut p,
            &mem,
            [s, s, 0x7f00_0001_0000],
            &stack,
            128,
            &mut out,
        );
        assert_eq!(out, vec![0x7f00_0001_0000, t1 + 6]);
        assert!(!o.complete);
        assert!(o.truncated);
    }

    #[test]
    fn frame_limit_marks_truncation() {
        let mem = Fixture::new();
        let s = 0x7ffc_0000_0000u64;
        // An endless frame-pointer chain within the copy: each record points 16 bytes up.
        let mut stack = Vec::new();
        for i in 0..64u64 {
            if i % 2 == 0 {
                stack.push(s + (i + 2) * 8);
            } else {
                stack.push(0x7f00_0002_0000 + i);
            }
        }
        let bytes: Vec<u8> = stack.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut p = Process::new(std::process::id(), crate::ids::ProcessKey(0));
        let mut out = Vec::new();
        let o = unwind(&mut p, &mem, [s, s, 0x7f00_0001_0000], &bytes, 10, &mut out);
        assert_eq!(out.len(), 10);
        assert!(o.truncated);
    }
}
