#!/usr/bin/env python3
"""perfpy benchmarks, side by side with py-spy and perf, in one interleaved run.

For each interpreter and profiler configuration it runs the same fixed Python work
(bench/work.py) several times, interleaving configurations so that the machine's noise hits all
of them alike, and reports medians: the work's wall time, its slowdown against the bare runs of
the same round, and for perfpy its own CPU time per sample (user + sys of the perfpy process
divided by its samples) and peak RSS. Results go to stdout and bench/out/results.md.

Usage: bench/run.sh [ROUNDS]   (builds perfpy, makes the py-spy venv, then runs this)
"""
import os
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERFPY = os.path.join(ROOT, "target", "release", "perfpy")
PYSPY = os.path.join(ROOT, "bench", ".venv", "bin", "py-spy")
WORK = os.path.join(ROOT, "bench", "work.py")
OUT = os.path.join(ROOT, "bench", "out")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
UNITS = os.environ.get("UNITS", "1500")


def pyenv(minor):
    base = "/root/.pyenv/versions"
    for d in sorted(os.listdir(base)):
        if d.startswith(minor + "."):
            return os.path.join(base, d, "bin", "python" + minor)
    raise SystemExit("CPython %s not found under %s" % (minor, base))


def run_work(cmd_prefix, py, pyargs, tmp):
    """Runs the work under an optional profiler; returns (wall, profiler_cpu, samples, rss_kb)."""
    work = [py] + pyargs + [WORK, UNITS]
    if not cmd_prefix:
        out = subprocess.run(work, capture_output=True, text=True, check=True).stdout
        return float(re.search(r"elapsed ([\d.]+)", out).group(1)), None, None, None
    cmd = cmd_prefix + work
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    out = p.stdout.read()
    err = p.stderr.read()
    m = re.search(r"elapsed ([\d.]+) ([\d.]+)", out)
    if not m:
        raise SystemExit("run failed: %s\n%s\n%s" % (cmd, out, err))
    wall, work_cpu = float(m.group(1)), float(m.group(2))
    samples = None
    # perfpy: "N samples,"; perf: "(N samples)"; py-spy: "Samples: N".
    s = re.search(r"(\d+) samples", err) or re.search(r"Samples: (\d+)", err)
    if s:
        samples = int(s.group(1))
    # ru covers the profiler process itself (the work is its child, accounted separately
    # only once reaped by it; wait4 on the profiler includes reaped children: subtract the work).
    # wait4 reports the profiler together with the children it reaped: take the work's own CPU
    # (which it printed) away.
    return wall, max(0.0, ru.ru_utime + ru.ru_stime - work_cpu), samples, ru.ru_maxrss


def main():
    os.makedirs(OUT, exist_ok=True)
    tmp = os.path.join(OUT, "tmp")
    os.makedirs(tmp, exist_ok=True)
    configs = []
    for minor, pyargs, label in [("3.11", [], "3.11"), ("3.12", ["-X", "perf"], "3.12 -X perf")]:
        py = pyenv(minor)
        configs.append((label, "bare", py, pyargs, None))
        for rate in (100, 1000):
            configs.append((label, "perfpy %d Hz" % rate, py, pyargs,
                            [PERFPY, "record", "-r", str(rate), "-o", os.path.join(tmp, "p.pb.gz"), "--"]))
            configs.append((label, "py-spy %d Hz" % rate, py, pyargs,
                            [PYSPY, "record", "-r", str(rate), "-o", os.path.join(tmp, "s.txt"), "-f", "raw", "--"]))
            configs.append((label, "perf dwarf %d Hz" % rate, py, pyargs,
                            ["perf", "record", "-e", "cpu-clock", "-F", str(rate), "--call-graph", "dwarf,16384",
                             "-o", os.path.join(tmp, "perf.data"), "--"]))
    # The trampoline's own cost: 3.12 without -X perf, bare.
    configs.append(("3.12 (no -X perf)", "bare", pyenv("3.12"), [], None))
    results = {}
    for r in range(ROUNDS):
        for label, name, py, pyargs, prefix in configs:
            wall, cpu, samples, rss = run_work(prefix, py, pyargs, tmp)
            results.setdefault((label, name), []).append((wall, cpu, samples, rss))
        print("round %d/%d done" % (r + 1, ROUNDS), file=sys.stderr)

    lines = ["| python | profiler | median wall (s) | slowdown | profiler CPU per sample (µs) | samples | peak RSS (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (label, name), rs in results.items():
        wall = statistics.median(x[0] for x in rs)
        bare = statistics.median(x[0] for x in results[(label, "bare")])
        slow = (wall / bare - 1) * 100
        per = samples = rss = "—"
        if rs[0][2]:
            prof_cpu = statistics.median(x[1] for x in rs)
            n = statistics.median(x[2] for x in rs)
            per = "%.0f" % (prof_cpu / n * 1e6) if n else "—"
            samples = "%d" % n
        if rs[0][3] and name.startswith("perfpy"):
            rss = "%.1f" % (statistics.median(x[3] for x in rs) / 1024)
        lines.append("| %s | %s | %.3f | %+.1f%% | %s | %s | %s |" % (label, name, wall, slow, per, samples, rss))
    spread = {k: (max(x[0] for x in v) - min(x[0] for x in v)) / statistics.median(x[0] for x in v) * 100
              for k, v in results.items()}
    lines.append("")
    lines.append("Rounds: %d, interleaved. Largest spread of a configuration's wall times (max-min)/median: %.1f%%."
                 % (ROUNDS, max(spread.values())))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M UTC\n\n", time.gmtime()) + text + "\n")


if __name__ == "__main__":
    main()
