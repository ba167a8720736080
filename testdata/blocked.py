"""A process whose threads are all blocked before any recording starts: the main thread sleeps
in `nap`, a thread named `reader` waits in `read_forever` for a pipe nobody writes to. A
recording attached later with --off-cpu sees no switch of theirs: perfpy stacks the waits with
the stacks the threads have at its end. Prints "ready" once both wait. Python 2.7 and 3."""
import os
import sys
import threading
import time


def read_forever(fd):
    os.read(fd, 1)


def nap():
    time.sleep(600)


r, w = os.pipe()
t = threading.Thread(target=read_forever, args=(r,), name="reader")
t.daemon = True
t.start()
time.sleep(0.2)
sys.stdout.write("ready\n")
sys.stdout.flush()
nap()
