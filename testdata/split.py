"""A workload with a known CPU split, used by the integration tests and the demo.

Per round it spends, in CPU time, about:
  40%  hot_function (plain function, pure Python loop)
  20%  Shape.area (a method)
  20%  make_closure.<locals>.inner (a nested closure)
  20%  hash_work (a C-extension call: hashlib.sha256 over a buffer)
Each part is calibrated at start with the CPU clock; the CPU time each part really took
is measured as it runs and, if $SPLIT_REPORT names a file, written there after every round, so
that tests compare perfpy's split with the measured one. Prints "ready" (flushed) once it is running. Runs for argv[1] seconds of CPU time (of
all its threads; default: forever). With argv[2] == "threads", runs the rounds in two threads.
"""
import hashlib
import os
import sys
import time


def spin(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


def hot_function(n):
    return spin(n)


class Shape:
    def __init__(self, n):
        self.n = n

    def area(self):
        s = 0
        for i in range(self.n):
            s += i * i % 7
        return s


def make_closure(n):
    def inner():
        s = 0
        for i in range(n):
            s += i * i % 7
        return s
    return inner


DATA = b"x" * (1 << 20)


def hash_work(k):
    h = hashlib.sha256()
    for _ in range(k):
        h.update(DATA)
    return h.hexdigest()


def calibrate():
    # Loop counts so that each unit takes ~10 ms of CPU.
    t = cpu()
    spin(200000)
    per = max(cpu() - t, 1e-6) / 200000
    n = max(1000, int(0.010 / per))
    t = cpu()
    hash_work(20)
    perh = max(cpu() - t, 1e-6) / 20
    k = max(1, int(0.010 / perh))
    return n, k


# CPU seconds actually spent per part (the ground truth the tests compare perfpy with: the
# calibration above is only approximate on a busy machine).
SPENT = {"hot_function": 0.0, "Shape.area": 0.0, "make_closure.<locals>.inner": 0.0, "hash_work": 0.0}
# Runs on every CPython from 2.7 on (the benchmarks measure the split on each).
cpu = getattr(time, "thread_time", None) or getattr(time, "process_time", None) or time.clock


def round_(n, k, closure, shape):
    t0 = cpu()
    hot_function(4 * n)
    t1 = cpu()
    shape.area()
    shape.area()
    t2 = cpu()
    closure()
    closure()
    t3 = cpu()
    hash_work(2 * k)
    t4 = cpu()
    SPENT["hot_function"] += t1 - t0
    SPENT["Shape.area"] += t2 - t1
    SPENT["make_closure.<locals>.inner"] += t3 - t2
    SPENT["hash_work"] += t4 - t3


def report():
    """Writes the measured split to $SPLIT_REPORT (if set): one `name fraction` per line."""
    path = os.environ.get("SPLIT_REPORT")
    total = sum(SPENT.values())
    if not path or total <= 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for name, v in SPENT.items():
            f.write("%s %.4f\n" % (name, v / total))
    getattr(os, "replace", os.rename)(tmp, path)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1e9
    threads = len(sys.argv) > 2 and sys.argv[2] == "threads"
    n, k = calibrate()
    closure = make_closure(n)
    shape = Shape(n)
    sys.stdout.write("ready %d\n" % os.getpid())
    sys.stdout.flush()
    # argv[1] seconds of the process's CPU time, not of the clock: a busy machine gives the
    # same number of samples as an idle one, only later.
    used = getattr(time, "process_time", None) or time.clock
    end = used() + seconds

    def loop():
        while used() < end:
            round_(n, k, closure, shape)
            report()

    if threads:
        import threading
        ts = [threading.Thread(target=loop, name="worker-%d" % i) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    else:
        loop()


if __name__ == "__main__":
    main()
