#!/usr/bin/env python3
"""A probe, not a benchmark row: how fast can this machine hard-link a snapshot, by one process or several?

``python bench/link_probe.py [--files N] [--runs R] [--workdir DIR] [--cold]`` builds a synthetic tree shaped
like a contentstore (``Y/M/D/H/M/<name>.bin``, 6 small files per minute bucket), a previous snapshot of it
(``cp -al``), then measures, alternating, R times each:

* ``cp -al`` of the previous snapshot (the floor of bench/RESULTS.md), one process;
* the same work split over 2 and 3 ``cp -al`` processes (the months shared out, one directory per year made
  first);
* :func:`linktree.snapshot` with every directory trusted (the nightly path): its own worker rule, 1 process
  (``workers=1``) and 2 worker processes;
* the walk alone: ``lstat`` of every source directory and its twin in the previous snapshot (what deciding
  that a whole subtree is unchanged costs).

``--cold`` drops the page cache before every sample (root only). It prints the machine and each median with
its ratio to one ``cp -al``. Every tree stays until the end, as in the benchmark (deleting between samples
made the samples pay for the deletes' write-back). Measured on machine E (bench/RESULTS.md): two processes
took 0.40-0.75x of one ``cp -al``; linktree with threads (before its worker processes) 0.77-1.06x, with its
worker processes 0.54x warm, 0.70x cold (linktree in 2 processes forked by hand, the experiment that led
there, 0.56x / 0.83x).
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)
sys.path.insert(0, os.path.join(PROJECT_DIR, "bench"))

import linktree  # noqa: E402
import measure  # noqa: E402  (bench/measure.py: drop_caches)
import report  # noqa: E402  (bench/report.py: machine_line)
import run  # noqa: E402  (bench/run.py: machine_info)
from snapshots import order_of, warm_up  # noqa: E402


def build_tree(src, files, seed=1):
    """``files`` small files, 6 per minute bucket, in a Y/M/D/H/M tree under ``src``."""
    rng = random.Random(seed)
    written, year = 0, 2020
    while written < files:
        for month in range(1, 13):
            for day in range(1, 29):
                for hour in range(8, 18, 2):
                    for minute in sorted(rng.sample(range(60), 3)):
                        bucket = "%s/%d/%d/%d/%d/%d" % (src, year, month, day, hour, minute)
                        os.makedirs(bucket)
                        for _ in range(6):
                            with open("%s/%032x.bin" % (bucket, rng.getrandbits(128)), "wb") as handle:
                                handle.write(b"x" * rng.randint(100, 4000))
                            written += 1
                        if written >= files:
                            return written
        year += 1
    return written


def month_dirs(previous, dest):
    """Make ``dest``'s year directories; returns the months of ``previous`` as [(year, month)], in order."""
    months = []
    for year in sorted(os.listdir(previous)):
        os.mkdir(os.path.join(dest, year), 0o700)
        months += [(year, month) for month in sorted(os.listdir(os.path.join(previous, year)))]
    return months


def parallel_cp(previous, dest, processes):
    """``cp -al`` of ``previous`` into ``dest`` by ``processes`` processes at once, the months shared out."""
    months = month_dirs(previous, dest)
    jobs = []
    for year in sorted({year for year, _month in months}):
        in_year = [m for y, m in months if y == year]
        for share in range(processes):
            part = in_year[share::processes]
            if part:
                jobs.append(["cp", "-al"] + [os.path.join(previous, year, m) for m in part]
                            + [os.path.join(dest, year)])
    running = []
    for argv in jobs:
        running.append(subprocess.Popen(argv))
        if len(running) >= processes:
            if running.pop(0).wait() != 0:
                raise RuntimeError("cp -al failed")
    if any(proc.wait() != 0 for proc in running):
        raise RuntimeError("cp -al failed")


def walk_dirs(src, previous):
    """lstat every directory of ``src`` and of its twin under ``previous``; list only non-leaf ones."""
    stack, seen = [(src.encode(), previous.encode())], 0
    while stack:
        source, twin = stack.pop()
        st = os.lstat(source)
        os.lstat(twin)
        seen += 1
        if st.st_nlink > 2:
            with os.scandir(source) as listing:
                stack.extend((e.path, twin + b"/" + e.name) for e in listing if e.is_dir(follow_symlinks=False))
    return seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=60000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every sample (root)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="linkprobe-", dir=args.workdir)
    try:
        src, previous = os.path.join(root, "src"), os.path.join(root, "previous")
        count = build_tree(src, args.files)
        subprocess.run(["cp", "-al", src, previous], check=True)
        trust_before_ns = time.time_ns()
        print("%s\n%d files, %s cache" % (report.machine_line({"machine": run.machine_info(args.workdir)}), count,
                                           "cold" if args.cold else "warm"))
        sides = {
            "cp -al, 1 process": lambda d: subprocess.run(["cp", "-al", previous + "/.", d], check=True),
            "cp -al, 2 processes": lambda d: parallel_cp(previous, d, 2),
            "cp -al, 3 processes": lambda d: parallel_cp(previous, d, 3),
            "linktree, its rule": lambda d: linktree.snapshot(src, d, previous, trust_before_ns=trust_before_ns),
            "linktree, workers=1": lambda d: linktree.snapshot(src, d, previous, workers=1,
                                                               trust_before_ns=trust_before_ns),
            "linktree, workers=2": lambda d: linktree.snapshot(src, d, previous, workers=2,
                                                               trust_before_ns=trust_before_ns),
            "walk of the directories": lambda d: walk_dirs(src, previous),
        }
        if not args.cold:
            warm_up(src, previous)
        samples = {name: [] for name in sides}
        for sample in range(args.runs):
            for index, name in enumerate(order_of(list(sides), sample)):
                dest = os.path.join(root, "dest-%d-%d" % (sample, index))
                if name != "walk of the directories":
                    os.mkdir(dest, 0o700)
                if args.cold:
                    measure.drop_caches()  # syncs first
                else:
                    os.sync()
                started = time.monotonic()
                sides[name](dest)
                samples[name].append(time.monotonic() - started)
        floor = statistics.median(samples["cp -al, 1 process"])
        for name, values in samples.items():
            median = statistics.median(values)
            print("%-26s median %6.3f s  %.2fx   (%s)" % (name, median, median / floor,
                                                        " / ".join("%.2f" % v for v in values)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
