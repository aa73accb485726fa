"""InstEval REML alone, beside a second fit, and beside busy processes (issue 15).

Each fit runs in a fresh process: it imports henderson, loads the data and the
compiled kernels, reports that it is ready and waits; the fits of one case start
together when every process is ready (two fits side by side start within a
millisecond), and each process times ``repeats`` fits one after another. Busy
neighbours are ``python -c "while True: pass"`` processes started before the fits.

    python benchmarks/shared_machine.py [--runs 5] [--threads default 1 2 2/1]
        [--src OTHER/src] [--blas N] [--own-threads on|off]

prints a Markdown table: median fit seconds over the runs (each run's value is the
median of its process's fits; for side by side, of both processes), the runs, and the
1-minute load average read (``os.getloadavg``) before each run. ``2/1`` is two
threads of henderson's own with one BLAS thread. ``--src`` imports
another checkout (an earlier commit's ``src``) with the same data; ``--blas`` and
``--own-threads`` set OpenBLAS's threads and switch the block elimination's own
threads off by hand for a version without ``threads=``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMULA = "y ~ service * dept + (1 | s) + (1 | d)"

CHILD = """
import json, os, sys, time
import henderson as hd
threads, repeats, own = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = hd.datasets.load("insteval")
getattr(hd, "load_compiled_kernels", lambda: None)()
if own == "off":  # an older version: no threads in the block elimination
    import henderson.schur
    henderson.schur.THREADED_WORK = float("inf")
import contextlib
kwargs, outer = {}, contextlib.nullcontext()
if "/" in threads:  # "2/1": two threads of our own, one BLAS thread
    from henderson.threads import fit_threads
    own, blas = map(int, threads.split("/"))
    outer = fit_threads(own, blas=blas)
elif threads != "default":
    kwargs = {"threads": int(threads)}
print("ready", flush=True)
sys.stdin.readline()
times = []
with outer:
    for _ in range(repeats):
        t = time.perf_counter()
        m = hd.lmm(%r, data, **kwargs)
        times.append(time.perf_counter() - t)
print(json.dumps({"fits": times, "objective": m.objective}), flush=True)
""" % FORMULA

SPIN = "while True: pass"


def _start_fit(src: Path, threads: str, repeats: int, own: str, blas: int | None):
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("HENDERSON_THREADS", None)
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = str(blas)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, threads, str(repeats), own],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc


def run_case(case: str, threads: str = "default", repeats: int = 3,
             src: Path = ROOT / "src", own: str = "on", blas: int | None = None,
             busy: int = 2) -> dict:
    """One run of a case: ``alone``, ``side_by_side`` (two fits) or ``busy`` (one fit
    beside ``busy`` spinning processes). Returns the fit seconds of every process, the
    1-minute load average before the run and the objective."""
    load = os.getloadavg()[0]
    spinners = []
    if case == "busy":
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        n_fits = 2 if case == "side_by_side" else 1
        procs = [_start_fit(src, threads, repeats, own, blas) for _ in range(n_fits)]
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a fitting process failed to start")
        if spinners:
            time.sleep(0.5)  # the spinners are on the cores
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"a fitting process failed ({proc.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    fits = [t for r in results for t in r["fits"]]
    return {"case": case, "threads": threads, "load": load,
            "fit": statistics.median(fits), "fits": fits,
            "objective": results[0]["objective"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fits per process")
    parser.add_argument("--threads", nargs="+", default=["default", "1", "2"])
    parser.add_argument("--cases", nargs="+", default=["alone", "side_by_side", "busy"])
    parser.add_argument("--src", type=Path, default=ROOT / "src")
    parser.add_argument("--blas", type=int, default=None)
    parser.add_argument("--own-threads", choices=["on", "off"], default="on")
    parser.add_argument("--json", type=Path, default=None, help="append every run here")
    args = parser.parse_args(argv)
    print(f"henderson from {args.src}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| threads | case | median fit (s) | runs (s) | load before each run |")
    print("|---|---|---:|---|---|")
    for threads in args.threads:
        for case in args.cases:
            runs = []
            for _ in range(args.runs):
                runs.append(run_case(case, threads, args.repeats, args.src,
                                     args.own_threads, args.blas))
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(dict(runs[-1], src=str(args.src),
                                                blas=args.blas, own=args.own_threads))
                                + "\n")
            median = statistics.median(r["fit"] for r in runs)
            print(f"| {threads} | {case} | {median:.2f} | "
                  f"{', '.join(format(r['fit'], '.2f') for r in runs)} | "
                  f"{', '.join(format(r['load'], '.1f') for r in runs)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
