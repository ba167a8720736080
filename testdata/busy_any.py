"""Busy loop in a function named hot_any, runnable by every CPython from 2.7 on.
Prints "ready PID" (flushed), runs for argv[1] seconds (default 5)."""
import os
import sys
import time


def hot_any(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


end = time.time() + (float(sys.argv[1]) if len(sys.argv) > 1 else 5)
sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
while time.time() < end:
    hot_any(100000)
