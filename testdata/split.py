"""A workload with a known CPU split, used by the integration tests and the demo.

Per round it spends, in CPU time, about:
  40%  hot_function (plain function, pure Python loop)
  20%  Shape.area (a method)
  20%  make_closure.<locals>.inner (a nested closure)
  20%  hash_work (a C-extension call: hashlib.sha256 over a buffer)
Each part is timed with time.process_time() and calibrated at start so that the split holds on
any machine. Prints "ready" (flushed) once it is running. Runs for argv[1] seconds (default:
forever). With argv[2] == "threads", runs the rounds in two threads.
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
    t = time.process_time()
    spin(200000)
    per = (time.process_time() - t) / 200000
    n = max(1000, int(0.010 / per))
    t = time.process_time()
    hash_work(20)
    perh = (time.process_time() - t) / 20
    k = max(1, int(0.010 / perh))
    return n, k


def round_(n, k, closure, shape):
    hot_function(4 * n)
    shape.area()
    shape.area()
    closure()
    closure()
    hash_work(2 * k)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1e9
    threads = len(sys.argv) > 2 and sys.argv[2] == "threads"
    n, k = calibrate()
    closure = make_closure(n)
    shape = Shape(n)
    print("ready", os.getpid(), flush=True)
    end = time.monotonic() + seconds

    def loop():
        while time.monotonic() < end:
            round_(n, k, closure, shape)

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
