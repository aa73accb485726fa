"""Small models and the fixed cost of a fit (issue 15): Orthodont's
``distance ~ age + Sex + (age | Subject)`` (108 rows, 27 subjects) fitted 100 times
in a loop, against lme4's loop in the same run; ``import henderson`` and the first fit
of a process.

Each run starts fresh processes, one per tool (and one per ``--src`` tree), one after
the other: the process times its import (``import henderson``; ``library(lme4)``), the
first fit (for henderson with the Numba kernels' load, ``timings["numba_kernel_load"]``,
shown apart) and then ``--fits`` fits in a loop on the same data, in wall and in CPU
seconds (user + system of the process: less sensitive to a busy machine's load).

    python benchmarks/small_fits.py [--runs 5] [--fits 100] [--src NAME=PATH ...]
        [--no-lme4]

prints a Markdown table: medians over the runs, each run's value in brackets, and
the 1-minute load average (``os.getloadavg``) before every run. ``--src main=../main/src``
times another checkout's henderson in the same runs (before/after figures); lme4
only when ``Rscript`` with lme4 is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMULA = "distance ~ age + Sex + (age | Subject)"

PYTHON_CHILD = """
import json, sys, time, warnings
start = time.perf_counter()
import henderson as hd
imported = time.perf_counter() - start
fits = int(sys.argv[1])
data = hd.datasets.load("orthodont")
formula = %r
start = time.perf_counter()
m = hd.lmm(formula, data)
first = time.perf_counter() - start
kernels = m.timings.get("numba_kernel_load", float("nan"))
start, cpu = time.perf_counter(), time.process_time()
for _ in range(fits):
    m = hd.lmm(formula, data)
loop, loop_cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"import": imported, "first": first, "kernels": kernels, "loop": loop,
                  "loop_cpu": loop_cpu, "objective": m.objective}))
""" % FORMULA

R_CHILD = r"""
args <- commandArgs(trailingOnly = TRUE)
fits <- as.integer(args[1])
t0 <- proc.time()[["elapsed"]]
suppressMessages(library(lme4))
imported <- proc.time()[["elapsed"]] - t0
d <- read.csv(args[2])
d$Sex <- factor(d$Sex, levels = c("Male", "Female"))
d$Subject <- factor(d$Subject)
f <- distance ~ age + Sex + (age | Subject)
t0 <- proc.time()[["elapsed"]]
m <- lmer(f, d)
first <- proc.time()[["elapsed"]] - t0
t0 <- proc.time()
for (i in seq_len(fits)) m <- lmer(f, d)
t1 <- proc.time()
loop <- t1[["elapsed"]] - t0[["elapsed"]]
loop_cpu <- (t1[["user.self"]] + t1[["sys.self"]]) - (t0[["user.self"]] + t0[["sys.self"]])
cat(sprintf('{"import": %.4f, "first": %.4f, "loop": %.4f, "loop_cpu": %.4f, "objective": %.10f}\n',
            imported, first, loop, loop_cpu, REMLcrit(m)))
"""


def lme4_available() -> bool:
    if not shutil.which("Rscript"):
        return False
    return subprocess.run(["Rscript", "-e", "library(lme4)"], capture_output=True).returncode == 0


def run_python(src: Path, fits: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", PYTHON_CHILD, str(fits)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_r(script: Path, csv: Path, fits: int) -> dict:
    out = subprocess.run(["Rscript", str(script), str(fits), str(csv)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: list[float], digits: int = 2) -> str:
    runs = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{statistics.median(values):.{digits}f} [{runs}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fits", type=int, default=100)
    parser.add_argument("--src", action="append", default=[],
                        help="NAME=PATH of another henderson source tree to time as well")
    parser.add_argument("--no-lme4", action="store_true")
    args = parser.parse_args(argv)
    trees = {"henderson": ROOT / "src"}
    for item in args.src:
        name, _, path = item.partition("=")
        trees[f"henderson ({name})"] = Path(path).resolve()
    with_r = not args.no_lme4 and lme4_available()
    results: dict[str, list[dict]] = {name: [] for name in trees}
    if with_r:
        results["lme4"] = []
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        script, csv = Path(tmp) / "lme4_loop.R", Path(tmp) / "orthodont.csv"
        script.write_text(R_CHILD)
        shutil.copy(ROOT / "src" / "henderson" / "datasets" / "orthodont.csv", csv)
        for run in range(args.runs):
            loads.append(os.getloadavg()[0])
            for name, src in trees.items():
                results[name].append(run_python(src, args.fits))
            if with_r:
                results["lme4"].append(run_r(script, csv, args.fits))
            print(f"run {run + 1}/{args.runs} (load {loads[-1]:.2f}): " + ", ".join(
                f"{name} {r[-1]['loop']:.2f} s" for name, r in results.items()),
                file=sys.stderr, flush=True)
    loads.append(os.getloadavg()[0])
    print(f"Orthodont `{FORMULA}`, {args.fits} fits in a loop, {args.runs} runs "
          f"(fresh processes, tools one after the other in each run); 1-minute load "
          f"before each run: {', '.join(f'{v:.2f}' for v in loads)}.\n")
    print("| tool | import (s) | first fit (s) | of which Numba kernels (s) "
          f"| {args.fits} fits (s) | per fit (ms) | {args.fits} fits, CPU (s) | objective |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        kernels = [r.get("kernels", float("nan")) for r in runs]
        per_fit = statistics.median(r["loop"] for r in runs) / args.fits * 1e3
        print(f"| {name} | {summary([r['import'] for r in runs])} "
              f"| {summary([r['first'] for r in runs])} "
              f"| {summary(kernels) if name != 'lme4' else '—'} "
              f"| {summary([r['loop'] for r in runs])} | {per_fit:.1f} "
              f"| {summary([r['loop_cpu'] for r in runs])} | {runs[-1]['objective']:.4f} |")
    if with_r:
        ratios = [h["loop"] / r["loop"] for h, r in zip(results["henderson"], results["lme4"])]
        cpu = [h["loop_cpu"] / r["loop_cpu"]
               for h, r in zip(results["henderson"], results["lme4"])]
        print(f"\nhenderson / lme4, loop of {args.fits} (each run's own ratio): wall "
              f"{summary(ratios)}; CPU {summary(cpu)}")


if __name__ == "__main__":
    main()
