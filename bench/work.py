"""Fixed amount of Python work for the benchmarks: function calls and loops, no I/O.
Prints the wall and CPU seconds it took as 'elapsed WALL CPU'."""
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
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(units):
        g(500)
    print("elapsed %.6f %.6f" % (time.perf_counter() - t0, time.process_time() - c0), flush=True)


main()
