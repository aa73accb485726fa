"""Side-by-side wall time and peak memory: henderson, lme4 and statsmodels.

Each fit runs in its own process under ``/usr/bin/time -v`` (peak resident memory)
on the same data, in the same run; lme4 only when ``Rscript`` with lme4 is installed,
statsmodels only where it can finish. Writes ``docs/benchmarks.md``.

    python benchmarks/compare.py [--quick] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HENDERSON = """
import json, sys, time
import pandas as pd
import henderson as hd
t0 = time.perf_counter()
data = pd.read_parquet(sys.argv[1]) if sys.argv[1].endswith(".parquet") else hd.datasets.load(sys.argv[1])
t1 = time.perf_counter()
m = hd.lmm(sys.argv[2], data, reml=sys.argv[3] == "REML")
t2 = time.perf_counter()
print(json.dumps({"objective": m.objective, "read": t1 - t0, "fit": t2 - t1,
                  "evaluations": m.n_evaluations, "ordering": m.mme.ordering}))
"""

LME4 = r"""
suppressMessages(library(lme4))
args <- commandArgs(TRUE)
t0 <- proc.time()[["elapsed"]]
d <- read.csv(args[1], stringsAsFactors = TRUE)
for (g in strsplit(args[4], ",")[[1]]) d[[g]] <- factor(d[[g]])
t1 <- proc.time()[["elapsed"]]
m <- lmer(as.formula(args[2]), d, REML = args[3] == "REML")
t2 <- proc.time()[["elapsed"]]
cat(sprintf('{"objective": %.10f, "read": %f, "fit": %f}\n',
            if (args[3] == "REML") REMLcrit(m) else deviance(m), t1 - t0, t2 - t1))
"""

STATSMODELS = """
import json, sys, time
import pandas as pd
import statsmodels.formula.api as smf
t0 = time.perf_counter()
d = pd.read_csv(sys.argv[1])
d["one"] = 1
t1 = time.perf_counter()
vc = {g: f"0 + C({g})" for g in sys.argv[3].split(",")}
model = smf.mixedlm(sys.argv[2], d, groups="one", vc_formula=vc)
result = model.fit(reml=True)
t2 = time.perf_counter()
print(json.dumps({"objective": -2 * result.llf, "read": t1 - t0, "fit": t2 - t1}))
"""


def timed(cmd: list[str], timeout: float) -> dict:
    """Run under /usr/bin/time -v; return the JSON it printed plus wall and peak RSS."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[:200]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall=wall, peak_mb=int(peak.group(1)) / 1024 if peak else float("nan"))
    return result


def have_lme4() -> bool:
    if not shutil.which("Rscript"):
        return False
    proc = subprocess.run(["Rscript", "-e", "library(lme4)"], capture_output=True)
    return proc.returncode == 0


def have_statsmodels() -> bool:
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--skip-10m", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import henderson as hd
    from henderson.simulate import crossed

    work = Path(tempfile.mkdtemp(prefix="henderson-bench-"))
    rows_1m, g1_1m = (100_000, 10_000) if args.quick else (1_000_000, 100_000)
    cases = [
        ("sleepstudy", "Reaction ~ Days + (Days | Subject)", "sleepstudy", "Subject", False),
        ("InstEval", "y ~ service * dept + (1 | s) + (1 | d)", "insteval",
         "s,d,service,dept,studage,lectage", False),
        (f"crossed {rows_1m:,} rows", "y ~ x + (1 + x | g1) + (1 | g2)", ("crossed", rows_1m, g1_1m),
         "g1,g2", False),
    ]
    if not args.skip_10m and not args.quick:
        cases.append(("crossed 10,000,000 rows", "y ~ x + (1 + x | g1) + (1 | g2)",
                      ("crossed", 10_000_000, 1_000_000), "g1,g2", True))
    lme4 = have_lme4()
    rows = []
    for label, formula, source, factors, henderson_only in cases:
        if isinstance(source, tuple):
            _, n_rows, n_g1 = source
            frame = crossed(n_rows, n_g1, 1_000, seed=1)
            parquet = work / f"crossed_{n_rows}.parquet"
            frame.to_parquet(parquet)
            data_arg = str(parquet)
            csv = work / f"crossed_{n_rows}.csv"
            if not henderson_only:
                frame.to_csv(csv, index=False)
        else:
            frame = hd.datasets.load(source)
            data_arg = source
            csv = work / f"{source}.csv"
            frame.to_csv(csv, index=False)
        print(f"== {label}", file=sys.stderr)
        result = {"case": label, "henderson": timed([sys.executable, "-c", HENDERSON, data_arg,
                                                     formula, "REML"], 3600)}
        print("   henderson", result["henderson"], file=sys.stderr)
        if lme4 and not henderson_only:
            script = work / "lme4.R"
            script.write_text(LME4)
            result["lme4"] = timed(["Rscript", str(script), str(csv), formula, "REML", factors],
                                   3600)
            print("   lme4", result["lme4"], file=sys.stderr)
        rows.append(result)
    if have_statsmodels():
        subset = hd.datasets.load("insteval").iloc[:20_000]
        csv = work / "insteval20k.csv"
        subset.to_csv(csv, index=False)
        label = "InstEval, first 20,000 rows, y ~ 1 + (1|s) + (1|d)"
        formula = "y ~ 1 + (1 | s) + (1 | d)"
        result = {"case": label,
                  "henderson": timed([sys.executable, "-c", HENDERSON.replace(
                      'hd.datasets.load(sys.argv[1])',
                      'hd.datasets.load("insteval").iloc[:20000]'), "insteval20k", formula,
                      "REML"], 600),
                  "statsmodels": timed([sys.executable, "-c", STATSMODELS, str(csv), "y ~ 1",
                                        "s,d"], 1200)}
        if lme4:
            script = work / "lme4.R"
            script.write_text(LME4)
            result["lme4"] = timed(["Rscript", str(script), str(csv), formula, "REML", "s,d"], 600)
        print("   ", result, file=sys.stderr)
        rows.append(result)
    write_report(rows, Path(args.out), quick=args.quick, lme4=lme4)
    return 0


def cell(result: dict | None, key: str, fmt: str) -> str:
    if result is None:
        return "not run"
    if "error" in result:
        return result["error"]
    return format(result[key], fmt)


def write_report(rows, path: Path, quick: bool, lme4: bool) -> None:
    import henderson as hd

    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/compare.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, henderson {hd.__version__}"
        + (", lme4 via Rscript" if lme4 else ", lme4 not installed") + ").",
        "Every fit runs in its own process on the same data in the same run; wall time is",
        "the whole process (start-up, reading the data, fitting), peak memory is the",
        "maximum resident set size from `/usr/bin/time -v`; 'fit' is the model call alone.",
        "",
        "| case | tool | wall (s) | fit (s) | peak memory (MB) | objective |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for tool in ("henderson", "lme4", "statsmodels"):
            if tool not in row:
                continue
            r = row[tool]
            case = row["case"].replace("|", "\\|")
            lines.append(f"| {case} | {tool} | {cell(r, 'wall', '.1f')} | "
                         f"{cell(r, 'fit', '.2f')} | {cell(r, 'peak_mb', '.0f')} | "
                         f"{cell(r, 'objective', '.4f')} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    marker = "<!-- other benchmarks -->"
    tail = existing[existing.index(marker):] if marker in existing else marker + "\n"
    path.write_text("\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    sys.exit(main())
