"""A workload that spends about 10% of its CPU time hashing in a C extension (`hashlib`, over
1 MiB buffers: long calls during which no Python code runs) and the rest in Python (`compute`).
Measures the CPU time of each part (`time.thread_time`) and writes the split to $SPLIT_REPORT
after every round (`name fraction` per line). Prints "ready PID" (flushed) once it runs.
`hashing.py SECONDS`."""
import hashlib
import os
import sys
import time

DATA = b"y" * (1 << 20)


def compute(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


def hash_blocks(k):
    h = hashlib.sha256()
    for _ in range(k):
        h.update(DATA)
    return h.hexdigest()


SPENT = {"compute": 0.0, "hash_blocks": 0.0}


def report():
    path = os.environ.get("SPLIT_REPORT")
    total = sum(SPENT.values())
    if not path or total <= 0:
        return
    with open(path + ".tmp", "w") as f:
        for name, v in SPENT.items():
            f.write("%s %.4f\n" % (name, v / total))
    os.replace(path + ".tmp", path)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1e9
    cpu = time.thread_time
    # ~45 ms of Python, ~5 ms of hashing per round.
    t = cpu()
    compute(200000)
    n = max(1000, int(0.045 / max(cpu() - t, 1e-6) * 200000))
    t = cpu()
    hash_blocks(8)
    k = max(1, round(0.005 / max((cpu() - t) / 8, 1e-6)))
    sys.stdout.write("ready %d\n" % os.getpid())
    sys.stdout.flush()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = cpu()
        compute(n)
        t1 = cpu()
        hash_blocks(k)
        t2 = cpu()
        SPENT["compute"] += t1 - t0
        SPENT["hash_blocks"] += t2 - t1
        report()


if __name__ == "__main__":
    main()
