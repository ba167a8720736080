//! Another process's memory: one trait for whatever holds it (a live process, a recorded
//! fixture in tests), one implementation for a live process.

use std::io;

/// The memory of one process.
pub trait ReadMemory {
    /// Copies memory at `addr` into `buf`; the number of bytes read, fewer than `buf.len()`
    /// when the range runs into unmapped memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// All of `buf`, or an error (`UnexpectedEof` for a short read).
    fn read_exact(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.read(addr, buf)? != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short read of target memory",
            ));
        }
        Ok(())
    }

    /// Whether all of `buf` could be read (for readers to which any failure means "not
    /// there").
    fn read_all(&self, addr: u64, buf: &mut [u8]) -> bool {
        matches!(self.read(addr, buf), Ok(n) if n == buf.len())
    }
}

/// A live process, read with `process_vm_readv` (allowed wherever ptrace read access is: the
/// same check as `/proc/PID/mem`, without stopping it).
#[derive(Clone, Copy, Debug)]
pub struct LiveMemory(pub u32);

impl ReadMemory for LiveMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the local iovec covers `buf`, which we borrow mutably; the remote one is only
        // read by the kernel on the target's behalf, with its own permission checks.
        let n = unsafe { libc::process_vm_readv(self.0 as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_memory_and_stops_at_unmapped_pages() {
        let me = LiveMemory(std::process::id());
        let data = *b"perfpy reads this";
        let mut buf = [0u8; 17];
        me.read_exact(data.as_ptr() as u64, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert!(!me.read_all(8, &mut buf), "page 0 is never mapped");
        assert!(me.read_exact(8, &mut buf).is_err());
    }
}
