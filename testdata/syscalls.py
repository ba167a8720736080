"""Syscall-heavy workload: much of its CPU time is in the kernel (stat and write system calls).
Prints "ready", runs for argv[1] seconds, then prints "kernel_share X": the share of its CPU
time the kernel accounted as system time (os.times), to compare a profile's kernel share with."""
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
t = os.times()
print("kernel_share %.3f" % (t.system / max(t.user + t.system, 1e-9)), flush=True)
