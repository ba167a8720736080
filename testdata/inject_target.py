"""Target for the injection tests. Mode argv[1]:
  busy     main thread computes without pause (polls stdin without blocking)
  sleep    main thread sleeps 0.3 s at a time, measuring each sleep
  pipe     main thread blocks reading stdin
  threads  8 threads allocating without pause, main thread polls stdin without blocking
  signals  as busy, and counts SIGRTMIN (queued, never merged)
Commands on stdin, one per line, answered on stdout: state (1/0: trampoline active),
check (a computation with a known result), slept (shortest sleep seen / asked, as a ratio),
count (SIGRTMIN seen), quit. Prints "ready PID" first."""
import os
import select
import signal
import sys
import threading
import time

mode = sys.argv[1]
count = [0]
shortest = [10.0]


def handler(signum, frame):
    pass


# A real-time signal: each one sent is queued and delivered (standard signals may merge).
# Counted from the wakeup fd, where CPython's C-level handler writes one byte per delivery:
# the Python-level handler runs once for several deliveries that arrive before it can run.
signal.signal(signal.SIGRTMIN, handler)
wake_r, wake_w = os.pipe()
os.set_blocking(wake_r, False)
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)


def delivered():
    while True:
        try:
            b = os.read(wake_r, 4096)
        except BlockingIOError:
            break
        count[0] += len(b)
    return count[0]


def work():
    return sum(i * i for i in range(10000))


def answer(cmd):
    if cmd == "state":
        return str(int(sys.is_stack_trampoline_active()))
    if cmd == "check":
        return str(work())
    if cmd == "slept":
        return "%.3f" % shortest[0]
    if cmd == "count":
        return str(delivered())
    if cmd == "quit":
        sys.exit(0)
    return "?"


def allocate():
    while True:
        d = {}
        for i in range(1000):
            d[i] = [i] * 10
        del d


if mode == "threads":
    for _ in range(8):
        threading.Thread(target=allocate, daemon=True).start()

print("ready %d" % os.getpid(), flush=True)
stdin = sys.stdin
while True:
    if mode == "pipe":
        line = stdin.readline()
        if not line:
            break
        print(answer(line.strip()), flush=True)
        continue
    if mode == "sleep":
        t = time.monotonic()
        time.sleep(0.3)
        shortest[0] = min(shortest[0], (time.monotonic() - t) / 0.3)
    else:
        work()
    r, _, _ = select.select([stdin], [], [], 0)
    if r:
        line = stdin.readline()
        if not line:
            break
        print(answer(line.strip()), flush=True)
