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
YIELD = 20000 if sys.version_info[0] == 2 else 10 ** 12
HASH_YIELD = 1 if sys.version_info[0] == 2 else 10 ** 12
tids = {}  # thread ident -> native tid


def register():
    tids[threading.current_thread().ident] = libc.syscall(SYS_gettid)


def busy():
    register()
    n = 0
    # One line: the innermost line never changes. Under 2.7 a 1 ms sleep every YIELD turns
    # lets the other threads in: 2.7's GIL has no forced switching, so a busy thread re-takes
    # the GIL as it drops it and the main thread can wait for it for minutes.
    while True: n += 1; n % YIELD or time.sleep(0.001)  # noqa: E701,E702


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
    n = 0
    # 2.7's builtin sha256 keeps the GIL: a 1 ms sleep after each hash (see busy).
    while True: hashlib.sha256(buf).digest(); n += 1; n % HASH_YIELD or time.sleep(0.001)  # noqa: E701,E702


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
