"""pyperformance's `generators` benchmark as a workload with a known CPU split.

Each round builds a binary tree of N nodes (recursive calls: `build_tree` → `tree`), then walks
it with nested generators (`iterate_tree` → `Tree.__iter__`, `yield from` at every level). The
program measures its own CPU time (`time.process_time`) spent in each phase and, if
$SPLIT_REPORT names a file, writes the split there after every round (`name fraction` per line),
so that a test compares perfpy's split with it, and the program's split with and without
perfpy: a perf trampoline doubles the cost of resuming a generator and shifts it. Prints
"ready PID" (flushed) once it runs. `generators.py SECONDS [NODES]`: SECONDS of CPU time.
"""
import os
import sys
import time


class Tree:
    def __init__(self, left, value, right):
        self.left = left
        self.value = value
        self.right = right

    def __iter__(self):
        if self.left is not None:
            yield from self.left
        yield self.value
        if self.right is not None:
            yield from self.right


def tree(values):
    n = len(values)
    if n == 0:
        return None
    i = n // 2
    return Tree(tree(values[:i]), values[i], tree(values[i + 1:]))


def build_tree(n):
    return tree(range(n))


def iterate_tree(t):
    count = 0
    for _ in t:
        count += 1
    return count


SPENT = {"build_tree": 0.0, "iterate_tree": 0.0}


def report():
    path = os.environ.get("SPLIT_REPORT")
    total = sum(SPENT.values())
    if not path or total <= 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for name, v in SPENT.items():
            f.write("%s %.4f\n" % (name, v / total))
    os.replace(tmp, path)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1e9
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 14
    sys.stdout.write("ready %d\n" % os.getpid())
    sys.stdout.flush()
    # SECONDS of CPU time, not of the clock: as many samples on a busy machine as on an idle one.
    end = time.process_time() + seconds
    while time.process_time() < end:
        t0 = time.process_time()
        t = build_tree(nodes)
        t1 = time.process_time()
        assert iterate_tree(t) == nodes
        t2 = time.process_time()
        # Freed outside both phases (else the next round's `t = ...` counts it in the build).
        del t
        SPENT["build_tree"] += t1 - t0
        SPENT["iterate_tree"] += t2 - t1
        report()


if __name__ == "__main__":
    main()
