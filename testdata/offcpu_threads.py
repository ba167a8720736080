# Threads that wait in known ways, forever, for `perfpy agent --off-cpu` (tests/it/otlp.rs):
#   nap        sleeps in time.sleep            (off-CPU, kind sleep)
#   wait_pipe  blocks reading a pipe that a helper process writes one byte to every 20 ms
#              (off-CPU, kind I/O read)
#   spin_a/b   two busy loops contending for the GIL (on CPU about half the time each, the
#              rest waiting for the GIL)
# Prints "ready" once every thread runs; runs until killed. Python 2.7 and 3.x.
import os
import subprocess
import sys
import threading
import time


def nap():
    while True:
        time.sleep(0.02)  # line: nap-sleep


def wait_pipe(fd):
    while True:
        os.read(fd, 1)  # line: pipe-read


def spin():
    x = 0
    while True:
        x += 1  # line: spin


def main():
    r, w = os.pipe()
    # The helper is another process: its writes cost this one no GIL. It ends with this
    # process (a failed write, or this pid gone: SIGPIPE may be ignored).
    subprocess.Popen(
        ["sh", "-c", "while printf x 2>/dev/null && kill -0 %d 2>/dev/null; do sleep 0.02; done" % os.getpid()],
        stdout=w,
        close_fds=True,
    )
    os.close(w)
    names = [("nap", nap, ()), ("wait_pipe", wait_pipe, (r,)), ("spin_a", spin, ()), ("spin_b", spin, ())]
    for name, f, args in names:
        t = threading.Thread(target=f, args=args, name=name)
        t.daemon = True
        t.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
