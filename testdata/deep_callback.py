"""Recursion `rec` to depth argv[1]; at the bottom `sorted` (C) calls the Python key function
`key_of` for each item, which does the work: the C frame sits between `rec` and `key_of`. For
argv[2] seconds (default 3). Prints "ready". Runs on CPython 2.7 and 3.x."""
import os
import sys
import time

clock = getattr(time, "monotonic", time.time)
ITEMS = list(range(200))


def key_of(x):
    s = 0
    for i in range(2000):
        s += i ^ x
    return s


def rec(n):
    if n == 0:
        return sorted(ITEMS, key=key_of)
    return rec(n - 1)


depth = int(sys.argv[1])
end = clock() + (float(sys.argv[2]) if len(sys.argv) > 2 else 3)
sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
while clock() < end:
    rec(depth)
