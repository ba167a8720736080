# Threads whose uses of wall time are known, for `perfpy record --off-cpu` (tests/it/offcpu.rs).
# Each thread repeats one phase, a single line, for SECONDS:
#   compute    sum(range(N)) in C, holding the GIL ~10 ms a call: on the CPU, or waiting for
#              the GIL (the other threads' turns)
#   gil_wait   spin(): a Python loop that gets the GIL only between compute's calls: mostly
#              waiting for the GIL held by compute
#   nap        time.sleep(0.03): sleeping, then waiting for the GIL
#   wait_pipe  os.read of a pipe that a helper process writes an 8-byte timestamp to every
#              30 ms: blocked reading until that write, then waiting for the GIL
# Every thread measures itself, holding the GIL (ctypes.PyDLL calls), over the run of its
# function: its wall time (CLOCK_MONOTONIC), its CPU time (CLOCK_THREAD_CPUTIME_ID), its time
# runnable but not running (the kernel's run_delay, /proc/thread-self/schedstat: preempted, or
# woken and waiting for a CPU), and the time its phase's cause held it: the sleeps asked for, or
# from each read's start to the helper's write. What is left of its wall time it waited for the
# GIL (nothing else blocks it). Its life, from just before its creation to its end, too (before
# its function runs, a new thread waits for the GIL). At the end each thread's line goes to the
# report file REPORT:
#   TID ROLE LIFE WALL CPU RUNQ CAUSE     (ns)
# Usage: offcpu_target.py SECONDS REPORT (Python 2.7 and 3.x; Linux x86-64). Prints "ready"
# when its threads run; the helper is `offcpu_target.py helper` with the pipe as stdout.
import ctypes
import os
import struct
import subprocess
import sys
import threading
import time

libc = ctypes.PyDLL(None)  # PyDLL: calls keep the GIL, so measuring causes no GIL wait
libc.syscall.restype = ctypes.c_long
libc.pread.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long]
libc.pread.restype = ctypes.c_long


class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def clock(which):
    t = Timespec()
    libc.clock_gettime(which, ctypes.byref(t))
    return t.sec * 1000000000 + t.nsec


MONOTONIC, THREAD_CPU = 1, 3
PERIOD = 0.03


class Meter(object):
    """One thread's own accounting."""

    def __init__(self, role, born):
        self.role = role
        self.born = born
        self.cause = 0
        self.tid = libc.syscall(186)  # gettid
        self.schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        self.buf = ctypes.create_string_buffer(128)

    def now(self):
        n = libc.pread(self.schedstat, self.buf, 127, 0)
        return (clock(MONOTONIC), clock(THREAD_CPU), int(self.buf.raw[:n].split()[1]))

    def report(self, start):
        end = self.now()
        wall, cpu, runq = [b - a for a, b in zip(start, end)]
        life = end[0] - self.born
        return "%d %s %d %d %d %d %d\n" % (self.tid, self.role, life, wall, cpu, runq, self.cause)


def compute(m, until, n):
    while clock(MONOTONIC) < until:
        s = sum(range(n))  # line: compute


def spin(k):
    x = 0
    for i in range(k): x += i  # line: spin
    return x


def gil_wait(m, until, n):
    while clock(MONOTONIC) < until:
        spin(n)  # line: gil-wait


def nap(m, until, _):
    while clock(MONOTONIC) < until:
        time.sleep(PERIOD)  # line: nap-sleep
        m.cause += int(PERIOD * 1e9)


def wait_pipe(m, until, fd):
    while clock(MONOTONIC) < until:
        start = clock(MONOTONIC); data = os.read(fd, 8)  # line: pipe-read
        written = struct.unpack("q", data)[0]
        m.cause += max(0, written - start)


def helper():
    """Writes its CLOCK_MONOTONIC time to stdout every PERIOD until the reader is gone."""
    out = sys.stdout.fileno()
    while True:
        time.sleep(PERIOD)
        try:
            os.write(out, struct.pack("q", clock(MONOTONIC)))
        except OSError:
            return


def calibrate():
    """N for sum(range(N)) to take ~10 ms of CPU."""
    n = 100000
    t = clock(THREAD_CPU)
    sum(range(n))
    t = max(clock(THREAD_CPU) - t, 1)
    return max(10000, int(n * 10e6 / t))


def run(role, f, seconds, arg, reports, born):
    # A new thread waits for the GIL before its first instruction: its life starts before,
    # when its creator is about to create it.
    m = Meter(role, born[0])
    start = m.now()
    f(m, start[0] + int(seconds * 1e9), arg)
    reports.append(m.report(start))


def main():
    seconds, report = float(sys.argv[1]), sys.argv[2]
    r, w = os.pipe()
    helper_proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "helper"], stdout=w)
    os.close(w)
    n = calibrate()
    roles = [("compute", compute, n), ("gil_wait", gil_wait, n // 4), ("nap", nap, None),
             ("wait_pipe", wait_pipe, r)]
    reports = []
    threads = []
    for role, f, arg in roles:
        born = [0]
        threads.append(threading.Thread(target=run, args=(role, f, seconds, arg, reports, born),
                                        name=role))
        born[0] = clock(MONOTONIC)
        threads[-1].start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for t in threads:
        t.join()
    helper_proc.kill()
    helper_proc.wait()
    with open(report, "w") as f:
        f.write("".join(reports))


if __name__ == "__main__":
    if sys.argv[1:] == ["helper"]:
        helper()
    else:
        main()
