"""The same fits with this checkout and with an earlier commit, in the same run.

Each fit runs in a fresh process; the two versions alternate (A B A B ...), so that a
load that comes and goes on a shared machine lands on both. Prints the median wall
time of the fit alone and of the whole process, the objective of each version, and
the machine's load average before and after.

    python benchmarks/versus.py BASELINE_COMMIT [--runs 5] [--quick]

The baseline is checked out into a temporary git worktree (removed afterwards) and
imported from its ``src/``; the data are the same files for both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIT = """
import json, sys, time
t0 = time.perf_counter()
import pandas as pd
import henderson as hd
data = pd.read_parquet(sys.argv[1]) if sys.argv[1].endswith(".parquet") else hd.datasets.load(sys.argv[1])
# kernels loaded before the fit's clock starts (older versions did it in the import)
getattr(hd, "load_compiled_kernels", lambda: None)()
t1 = time.perf_counter()
m = hd.lmm(sys.argv[2], data, reml=sys.argv[3] == "REML")
t2 = time.perf_counter()
print(json.dumps({"objective": m.objective, "fit": t2 - t1, "process": t2 - t0,
                  "converged": bool(m.converged)}))
"""


def run(src: Path, data: str, formula: str, reml: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.run([sys.executable, "-c", FIT, data, formula, reml], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("baseline", help="a commit to compare with (e.g. a tag or hash)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100,000 crossed rows")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from henderson.simulate import crossed

    work = Path(tempfile.mkdtemp(prefix="henderson-versus-"))
    baseline = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach",
                    str(baseline), args.baseline], check=True)
    try:
        rows, g1 = (100_000, 10_000) if args.quick else (1_000_000, 100_000)
        parquet = work / "crossed.parquet"
        crossed(rows, g1, 1_000, seed=1).to_parquet(parquet)
        cases = [("InstEval REML", "insteval", "y ~ service * dept + (1 | s) + (1 | d)", "REML"),
                 ("InstEval ML", "insteval", "y ~ service * dept + (1 | s) + (1 | d)", "ML"),
                 (f"crossed {rows:,} rows", str(parquet),
                  "y ~ x + (1 + x | g1) + (1 | g2)", "REML")]
        versions = {"this": ROOT / "src", args.baseline[:10]: baseline / "src"}
        for label, data, formula, reml in cases:
            load = os.getloadavg()[0]
            results = {name: [] for name in versions}
            for _ in range(args.runs):
                for name, src in versions.items():
                    results[name].append(run(src, data, formula, reml))
            print(f"{label} (load {load:.2f} -> {os.getloadavg()[0]:.2f}, {args.runs} runs each)")
            for name, runs in results.items():
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    print(f"  {name:>12}: {runs[0]['error']}")
                    continue
                fit = statistics.median(r["fit"] for r in ok)
                process = statistics.median(r["process"] for r in ok)
                each = ", ".join(f"{r['fit']:.2f}" for r in ok)
                print(f"  {name:>12}: fit {fit:7.2f} s (runs {each}),"
                      f" process {process:6.2f} s, objective {ok[0]['objective']:.6f},"
                      f" converged {all(r['converged'] for r in ok)}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(baseline)], check=False)
        time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
