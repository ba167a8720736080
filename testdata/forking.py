"""Short-lived child processes: every few milliseconds the parent forks a child that spends
about 5 ms of CPU in `child_work` and exits; between forks the parent spends about 1 ms in
`parent_work`. Each process lives far less than a sampling period of 10 ms.

Usage: forking.py SECONDS [REPORT] [--on-stdin]. Prints "ready" (flushed) once running; with
--on-stdin, starts only when a line arrives on stdin (so that a profiler attached meanwhile
sees the whole run). At the end writes to
REPORT (if given): the CPU time the children spent in `child_work` (each child measures its own
and reports it through a pipe), the CPU time of the whole (parent and children, os.times()),
and the number of children.
"""
import os
import sys
import time

CHILD_CPU = 0.005
PARENT_CPU = 0.001


def burn(seconds):
    end = time.thread_time() + seconds
    s = 0
    while time.thread_time() < end:
        for i in range(200):
            s += i * i % 7
    return s


def child_work():
    t = time.thread_time()
    burn(CHILD_CPU)
    return time.thread_time() - t


def parent_work():
    burn(PARENT_CPU)


def main():
    args = [a for a in sys.argv[1:] if a != "--on-stdin"]
    seconds = float(args[0])
    report = args[1] if len(args) > 1 else None
    r, w = os.pipe()
    print("ready", flush=True)
    if "--on-stdin" in sys.argv:
        sys.stdin.readline()
    t0 = os.times()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        pid = os.fork()
        if pid == 0:
            used = child_work()
            os.write(w, b"%d\n" % int(used * 1e9))
            os._exit(0)
        os.waitpid(pid, 0)
        n += 1
        parent_work()
    t1 = os.times()
    os.close(w)
    child_ns = 0
    with os.fdopen(r) as f:
        for line in f:
            child_ns += int(line)
    total = sum(t1[:4]) - sum(t0[:4])
    if report:
        with open(report, "w") as f:
            f.write(f"child_work {child_ns / 1e9:.6f}\ntotal {total:.6f}\nchildren {n}\n")


if __name__ == "__main__":
    main()
