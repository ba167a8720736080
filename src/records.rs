//! Decoding the records of a perf ring buffer (the layout follows `sys::SAMPLE_TYPE` and
//! `sample_id_all`). Decoding borrows from the record bytes: the copied user stack is not copied
//! again.

/// Record types we use (`enum perf_event_type`).
pub const PERF_RECORD_MMAP: u32 = 1;
pub const PERF_RECORD_LOST: u32 = 2;
pub const PERF_RECORD_COMM: u32 = 3;
pub const PERF_RECORD_EXIT: u32 = 4;
pub const PERF_RECORD_FORK: u32 = 7;
pub const PERF_RECORD_SAMPLE: u32 = 9;
pub const PERF_RECORD_MMAP2: u32 = 10;
pub const PERF_RECORD_LOST_SAMPLES: u32 = 13;

pub const PERF_RECORD_MISC_COMM_EXEC: u16 = 1 << 13;
pub const PERF_RECORD_MISC_MMAP_BUILD_ID: u16 = 1 << 14;

/// Callchain context markers are the top 4095 values of u64.
const PERF_CONTEXT_MAX: u64 = -4095i64 as u64;

#[derive(Debug)]
pub enum Record<'a> {
    Sample(Sample<'a>),
    Mmap(Mmap<'a>),
    Comm {
        pid: u32,
        tid: u32,
        exec: bool,
        comm: &'a [u8],
    },
    Fork {
        pid: u32,
        ppid: u32,
        tid: u32,
    },
    Exit {
        pid: u32,
        tid: u32,
    },
    Lost(u64),
    Other,
}

#[derive(Debug)]
#[allow(dead_code)] // decoded for completeness and debugging (RUST_LOG=trace)
pub struct Sample<'a> {
    pub ip: u64,
    pub pid: u32,
    pub tid: u32,
    pub time: u64,
    pub cpu: u32,
    pub period: u64,
    /// Kernel callchain, leaf first, context markers removed.
    pub kernel: Vec<u64>,
    /// (bp, sp, ip) of user space, if the task had user registers.
    pub user_regs: Option<[u64; 3]>,
    /// The copied user stack, starting at the user sp; only the valid part (`dyn_size`).
    pub stack: &'a [u8],
}

#[derive(Debug)]
#[allow(dead_code)]
pub struct Mmap<'a> {
    pub pid: u32,
    pub tid: u32,
    pub addr: u64,
    pub len: u64,
    pub pgoff: u64,
    pub prot_exec: bool,
    /// Device and inode, when the record carries them (MMAP2 without build id).
    pub dev_ino: Option<(u64, u64)>,
    pub filename: &'a [u8],
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn u64(&mut self) -> Option<u64> {
        let v = self.b.get(self.pos..self.pos + 8)?;
        self.pos += 8;
        Some(u64::from_ne_bytes(v.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let v = self.b.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_ne_bytes(v.try_into().ok()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(v)
    }
    fn cstr(&mut self) -> &'a [u8] {
        let rest = &self.b[self.pos.min(self.b.len())..];
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        &rest[..end]
    }
}

/// Decodes one record (header included). `None` when it is malformed.
pub fn parse(rec: &[u8]) -> Option<Record<'_>> {
    let ty = u32::from_ne_bytes(rec.get(0..4)?.try_into().ok()?);
    let misc = u16::from_ne_bytes(rec.get(4..6)?.try_into().ok()?);
    let mut c = Cursor { b: rec, pos: 8 };
    Some(match ty {
        PERF_RECORD_SAMPLE => Record::Sample(parse_sample(&mut c)?),
        PERF_RECORD_MMAP2 | PERF_RECORD_MMAP => {
            let pid = c.u32()?;
            let tid = c.u32()?;
            let addr = c.u64()?;
            let len = c.u64()?;
            let pgoff = c.u64()?;
            let (dev_ino, prot_exec) = if ty == PERF_RECORD_MMAP2 {
                let maj_min_or_bid = c.bytes(24)?; // maj, min, ino, ino_generation (or build id)
                let prot = c.u32()?;
                let _flags = c.u32()?;
                let dev_ino = if misc & PERF_RECORD_MISC_MMAP_BUILD_ID == 0 {
                    let maj = u32::from_ne_bytes(maj_min_or_bid[0..4].try_into().ok()?) as u64;
                    let min = u32::from_ne_bytes(maj_min_or_bid[4..8].try_into().ok()?) as u64;
                    let ino = u64::from_ne_bytes(maj_min_or_bid[8..16].try_into().ok()?);
                    Some((libc::makedev(maj as u32, min as u32), ino))
                } else {
                    None
                };
                (dev_ino, prot & libc::PROT_EXEC as u32 != 0)
            } else {
                // MMAP records are only emitted for executable mappings.
                (None, true)
            };
            Record::Mmap(Mmap {
                pid,
                tid,
                addr,
                len,
                pgoff,
                prot_exec,
                dev_ino,
                filename: c.cstr(),
            })
        }
        PERF_RECORD_COMM => {
            let pid = c.u32()?;
            let tid = c.u32()?;
            Record::Comm {
                pid,
                tid,
                exec: misc & PERF_RECORD_MISC_COMM_EXEC != 0,
                comm: c.cstr(),
            }
        }
        PERF_RECORD_FORK | PERF_RECORD_EXIT => {
            let pid = c.u32()?;
            let ppid = c.u32()?;
            let tid = c.u32()?;
            let _ptid = c.u32()?;
            if ty == PERF_RECORD_FORK {
                Record::Fork { pid, ppid, tid }
            } else {
                Record::Exit { pid, tid }
            }
        }
        PERF_RECORD_LOST => {
            let _id = c.u64()?;
            Record::Lost(c.u64()?)
        }
        PERF_RECORD_LOST_SAMPLES => Record::Lost(c.u64()?),
        _ => Record::Other,
    })
}

fn parse_sample<'a>(c: &mut Cursor<'a>) -> Option<Sample<'a>> {
    let ip = c.u64()?;
    let pid = c.u32()?;
    let tid = c.u32()?;
    let time = c.u64()?;
    let cpu = c.u32()?;
    let _res = c.u32()?;
    let period = c.u64()?;
    let nr = c.u64()? as usize;
    if nr > 4096 {
        return None;
    }
    let mut kernel = Vec::with_capacity(nr.min(128));
    for _ in 0..nr {
        let a = c.u64()?;
        if a < PERF_CONTEXT_MAX {
            kernel.push(a);
        }
    }
    let abi = c.u64()?;
    let user_regs = if abi != 0 {
        // Registers come in increasing bit order: BP, SP, IP.
        let bp = c.u64()?;
        let sp = c.u64()?;
        let uip = c.u64()?;
        Some([bp, sp, uip])
    } else {
        None
    };
    let size = c.u64()? as usize;
    let stack = if size > 0 {
        let data = c.bytes(size)?;
        let dyn_size = (c.u64()? as usize).min(size);
        &data[..dyn_size]
    } else {
        &[][..]
    };
    Some(Sample {
        ip,
        pid,
        tid,
        time,
        cpu,
        period,
        kernel,
        user_regs,
        stack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bytes(kernel: &[u64], stack: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(PERF_RECORD_SAMPLE.to_ne_bytes());
        v.extend(0u16.to_ne_bytes());
        v.extend(0u16.to_ne_bytes()); // size, unused by parse
        v.extend(0x401000u64.to_ne_bytes()); // ip
        v.extend(10u32.to_ne_bytes());
        v.extend(11u32.to_ne_bytes());
        v.extend(123u64.to_ne_bytes()); // time
        v.extend(1u32.to_ne_bytes());
        v.extend(0u32.to_ne_bytes());
        v.extend(10_000_000u64.to_ne_bytes()); // period
        v.extend(((kernel.len() + 1) as u64).to_ne_bytes());
        v.extend((-128i64 as u64).to_ne_bytes()); // PERF_CONTEXT_KERNEL
        for k in kernel {
            v.extend(k.to_ne_bytes());
        }
        v.extend(2u64.to_ne_bytes()); // abi 64
        v.extend(1u64.to_ne_bytes());
        v.extend(2u64.to_ne_bytes());
        v.extend(3u64.to_ne_bytes());
        v.extend(64u64.to_ne_bytes());
        let mut s = stack.to_vec();
        s.resize(64, 0);
        v.extend(s);
        v.extend((stack.len() as u64).to_ne_bytes());
        v
    }

    #[test]
    fn decodes_sample() {
        let b = sample_bytes(&[0xffffffff81000000, 0xffffffff81000100], &[7u8; 24]);
        let Some(Record::Sample(s)) = parse(&b) else {
            panic!("not a sample")
        };
        assert_eq!((s.pid, s.tid, s.time, s.cpu), (10, 11, 123, 1));
        assert_eq!(s.kernel, vec![0xffffffff81000000, 0xffffffff81000100]);
        assert_eq!(s.user_regs, Some([1, 2, 3]));
        assert_eq!(s.stack.len(), 24);
    }

    #[test]
    fn truncated_records_are_rejected() {
        let b = sample_bytes(&[1, 2], &[1u8; 8]);
        for n in 0..b.len() - 8 {
            assert!(matches!(parse(&b[..n]), None | Some(Record::Sample(_))));
        }
        assert!(parse(&b[..40]).is_none());
    }
}
