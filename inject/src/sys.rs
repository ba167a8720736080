//! Writing another process's memory (reading it: `perfpy_process::LiveMemory`).

use std::io;
use std::os::unix::fs::FileExt;

/// Writes through `/proc/PID/mem`, which (unlike process_vm_writev) also writes pages that
/// are not writable in the target, the way a debugger does.
pub fn write_mem(pid: i32, addr: u64, buf: &[u8]) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    f.write_all_at(buf, addr)
}
