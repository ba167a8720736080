"""A parent that starts two children — one forked (`forked_work`), one a new interpreter
(`child_work`) — works itself (`parent_work`), waits for both, and exits: each part burns a
known amount of CPU (seconds of process time). Prints "ready" first and, at the end, the CPU
the whole family used. Python 3."""
import os
import subprocess
import sys
import time


def burn(secs):
    end = time.process_time() + secs
    n = 0
    while time.process_time() < end:
        n += 1
    return n


def parent_work():
    burn(0.6)


def forked_work():
    burn(0.8)


def child_work():
    burn(1.0)


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        child_work()
        sys.exit(0)
    print("ready", flush=True)
    sys.stdin.readline()  # the test says when perfpy samples
    pid = os.fork()
    if pid == 0:
        forked_work()
        os._exit(0)
    c = subprocess.Popen([sys.executable, __file__, "child"])
    parent_work()
    c.wait()
    os.waitpid(pid, 0)
    t = os.times()
    print("family %.3f" % (t.user + t.system + t.children_user + t.children_system), flush=True)
