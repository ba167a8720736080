"""Syscall-heavy workload: most of its CPU time is in the kernel (stat and write system calls).
Prints "ready", runs for argv[1] seconds."""
import os
import sys
import time

end = time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 3)
fd = os.open("/dev/null", os.O_WRONLY)
buf = b"x" * 65536
print("ready", flush=True)
while time.monotonic() < end:
    for _ in range(100):
        os.stat("/")
        os.write(fd, buf)
