"""Recursion to depth argv[1] with a busy loop at the bottom, for argv[2] seconds (default 3).
Prints "ready". Under the perf trampoline each level takes ~500 bytes of C stack. Runs on
CPython 2.7 and 3.x."""
import os
import sys
import time

clock = getattr(time, "monotonic", time.time)


def rec(n):
    if n == 0:
        s = 0
        for i in range(300000):
            s += i
        return s
    return rec(n - 1)


depth = int(sys.argv[1])
# Depth 1,000 (bench/) needs more than the default limit of 1,000 frames.
sys.setrecursionlimit(max(sys.getrecursionlimit(), depth + 50))
end = clock() + (float(sys.argv[2]) if len(sys.argv) > 2 else 3)
sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
while clock() < end:
    rec(depth)
