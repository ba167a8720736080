"""Methods whose class perfpy must name right, runnable by every CPython from 2.7 on.
Prints "ready PID" (flushed), runs for argv[1] seconds (default 5). About a quarter of the CPU
in each of:
- Job.work on short-lived objects whose memory Other objects take over at once (the class must
  be the one `self` had at the sample, not what its memory holds later);
- Grid.total, whose `self` a lambda captures, and Board.solve, whose `self` a comprehension's
  closure captures (3.x: `self` becomes a cell and its local slot is cleared);
- Old.step, an old-style class on 2.7 (its instances' type is `instance`), short-lived too."""
import os
import sys
import time


class Job(object):
    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n

    def work(self):
        s = 0
        for i in range(self.n):
            s += i
        return s


class Other(object):
    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n


class Grid(object):
    k = 2

    def total(self, n):
        scale = lambda i: self.k * i
        s = 0
        for i in range(n):
            s += i
        return scale(s)


class Board(object):
    w = 3

    def solve(self, n):
        vals = [self.w * i for i in range(3)]
        s = 0
        for i in range(n):
            s += i
        return s + sum(vals)


class Old:
    def __init__(self, n):
        self.n = n

    def step(self):
        s = 0
        for i in range(self.n):
            s += i
        return s


end = time.time() + (float(sys.argv[1]) if len(sys.argv) > 1 else 5)
sys.stdout.write("ready %d\n" % os.getpid())
sys.stdout.flush()
keep = []
g, b = Grid(), Board()
while time.time() < end:
    Job(20000).work()
    keep = [Other(i) for i in range(50)]
    g.total(20000)
    b.solve(20000)
    Old(20000).step()
    keep = [Other(i) for i in range(50)]
