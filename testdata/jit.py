"""Runs machine code from an anonymous executable mapping, as a JIT does, so that samples land
in code only a perf map can name. Writes the code's address (hex) to /tmp/jit-addr (its own
/tmp), then prints "ready". Runs for argv[1] seconds (default: forever).

The code is x86-64: a count-down loop of rdi iterations that returns rdi.
"""
import ctypes
import mmap
import sys
import time

CODE = bytes([
    0x48, 0x89, 0xF9,  # mov rcx, rdi
    0x48, 0xFF, 0xC9,  # loop: dec rcx
    0x75, 0xFB,        # jnz loop
    0x48, 0x89, 0xF8,  # mov rax, rdi
    0xC3,              # ret
])

buf = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(CODE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
jitted = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(addr)

with open("/tmp/jit-addr", "w") as f:
    f.write("%x %x\n" % (addr, len(CODE)))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1]) if len(sys.argv) > 1 else None
while end is None or time.monotonic() < end:
    jitted(20_000_000)
