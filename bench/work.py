"""Fixed amount of Python work for the benchmarks: function calls and loops, no I/O.
Usage: work.py UNITS [wait]. With "wait", prints "ready PID" and starts only once a line arrives
on stdin (so that an attaching profiler is in place first). Prints the wall and CPU seconds the
work took, and the process's whole CPU time (interpreter start-up included) as
'elapsed WALL CPU TOTAL_CPU'."""
import os
import sys
import time


def f(n):
    s = 0
    for i in range(n):
        s += i % 7
    return s


def g(k):
    t = 0
    for _ in range(k):
        t += f(200)
    return t


def main():
    units = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    if len(sys.argv) > 2 and sys.argv[2] == "wait":
        sys.stdout.write("ready %d\n" % os.getpid())
        sys.stdout.flush()
        sys.stdin.readline()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(units):
        g(500)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sys.stdout.write("elapsed %.6f %.6f %.6f\n" % (wall, cpu, time.process_time()))
    sys.stdout.flush()


main()
