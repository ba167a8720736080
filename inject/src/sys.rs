//! Reading and writing another process's memory.

use std::io;
use std::os::unix::fs::FileExt;

pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`, borrowed mutably; the kernel checks the remote side.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short read of target memory",
        ));
    }
    Ok(())
}

/// Writes through `/proc/PID/mem`, which (unlike process_vm_writev) also writes pages that
/// are not writable in the target, the way a debugger does.
pub fn write_mem(pid: i32, addr: u64, buf: &[u8]) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    f.write_all_at(buf, addr)
}
