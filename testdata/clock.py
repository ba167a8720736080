"""Reads the clock in a loop (`readclock`: time.perf_counter_ns, which libc serves from the
vDSO without a system call) and computes (`work`), half and half, for argv[1] seconds. Prints
"ready PID" (flushed) once it runs. Runs on any CPython 3.7+."""
import os
import sys
import time


def readclock(n):
    s = 0
    for _ in range(n):
        s += time.perf_counter_ns()
    return s


def work(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    readclock(20000)
    work(20000)
