"""Target of `perfpy dump` tests: threads in known states. Runs on CPython 2.7 and 3.x.

Threads: "busy" and "busy2" in a one-line pure-Python loop (one of them waits for the GIL at
any moment), "sleeper" in time.sleep, "hasher" in a C extension (hashlib over 1 MB, which
releases the GIL), "clock" appending time.time() every 1 ms, and the main thread blocked
reading stdin (a pipe). Prints "ready" once all run. For each line on stdin: "frames" prints
one JSON line {native tid: [function, line]} of every thread's innermost frame from
sys._current_frames, taken while the main thread is back in its read only for itself (its
own entry is where it waits: the read line); "gaps" prints the clock thread's longest gap in
ms since the last "gaps" (and resets it). The sleeper's locals have known values (arg=7, i=42,
big=2**40, neg=-7, f=2.5, n=None, t=True, s="h\xe9llo", b=b"ab\x00", l of 3, d of 1, tup of 2). With argv[1] == "quiet": only the sleeper and the
clock thread (no thread competes with the clock for the GIL, so its jitter is the machine's).
"""
import ctypes
import hashlib
import json
import os
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_gettid = 186
tids = {}  # thread ident -> native tid


def register():
    tids[threading.current_thread().ident] = libc.syscall(SYS_gettid)


def busy():
    register()
    n = 0
    while True: n += 1  # noqa: E701 -- one line: the innermost line never changes


def sleeper(arg=7):
    register()
    # Locals of known values, for `perfpy dump --locals`.
    i, big, neg, f, n, t = 42, 2 ** 40, -7, 2.5, None, True
    s, b = u"h\xe9llo", b"ab\x00"
    l, d, tup = [1, 2, 3], {"a": 1}, (1, 2)
    while True: time.sleep(100)  # noqa: E701


def hasher():
    register()
    buf = b"x" * (1 << 20)
    while True: hashlib.sha256(buf).digest()  # noqa: E701


longest = [0.0]


def clock():
    register()
    last = time.time()
    while True:
        time.sleep(0.001)
        now = time.time()
        if now - last > longest[0]:
            longest[0] = now - last
        last = now


def read_line():
    return sys.stdin.readline()  # the main thread waits here


def main():
    register()
    quiet = sys.argv[1:] == ["quiet"]
    threads = [(sleeper, "sleeper"), (clock, "clock")]
    if not quiet:
        threads += [(busy, "busy"), (busy, "busy2"), (hasher, "hasher")]
    for f, name in threads:
        t = threading.Thread(target=f, name=name)
        t.daemon = True
        t.start()
    while len(tids) < len(threads) + 1:
        time.sleep(0.01)
    sys.stdout.write("ready %d\n" % os.getpid())
    sys.stdout.flush()
    while True:
        line = read_line()
        if not line:
            return
        if line.strip() == "gaps":
            g, longest[0] = longest[0], 0.0
            sys.stdout.write("%f\n" % (g * 1000))
        else:
            out = {}
            for ident, frame in sys._current_frames().items():
                if ident not in tids:
                    continue
                if tids[ident] == tids[threading.current_thread().ident]:
                    out[tids[ident]] = ["read_line", read_line.__code__.co_firstlineno + 1]
                else:
                    out[tids[ident]] = [frame.f_code.co_name, frame.f_lineno]
            sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


main()
