"""Side-by-side wall time and peak memory: henderson, lme4, mixedlm and statsmodels.

Each fit runs in its own process under ``/usr/bin/time -v`` (peak resident memory)
on the same data, in the same run, for ``--rounds`` rounds in which the tools take
turns (so that a change in the machine's load falls on every tool); the 1-minute load
average is read before every fit. lme4 runs when ``Rscript`` with lme4 is installed;
mixedlm (the pip package, a Python/Rust port of lme4) when the Python named by
``HENDERSON_MIXEDLM_PYTHON`` (a venv with ``pip install mixedlm``) imports it;
statsmodels only on the small case it can finish. Each is skipped when absent.
Writes the table into ``docs/benchmarks.md``.

    HENDERSON_MIXEDLM_PYTHON=/work/venv-mixedlm/bin/python \\
        python benchmarks/compare.py [--quick] [--large] [--rounds 3] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
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
if len(sys.argv) > 4:
    data = data.iloc[:int(sys.argv[4])]
kernels = hd.load_compiled_kernels()  # once per process, as library(lme4) is for R
t1 = time.perf_counter()
m = hd.lmm(sys.argv[2], data, reml=sys.argv[3] == "REML")
t2 = time.perf_counter()
print(json.dumps({"objective": m.objective, "read": t1 - t0, "fit": t2 - t1,
                  "kernel_load": kernels,
                  "evaluations": m.n_evaluations, "optimizer": m.optimizer_result.method}))
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

MIXEDLM = """
import json, sys, time
import pandas as pd
import mixedlm
t0 = time.perf_counter()
d = pd.read_csv(sys.argv[1])
for g in sys.argv[4].split(","):
    d[g] = d[g].astype(str).astype("category")
t1 = time.perf_counter()
m = mixedlm.lmer(sys.argv[2], d, REML=sys.argv[3] == "REML")
t2 = time.perf_counter()
value = m.REMLcrit() if sys.argv[3] == "REML" else m.deviance
value = value() if callable(value) else value
print(json.dumps({"objective": float(value), "read": t1 - t0, "fit": t2 - t1}))
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

TOOLS = ("henderson", "lme4", "mixedlm", "statsmodels")


#: henderson's processes import this checkout's package
HENDERSON_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def timed(cmd: list[str], timeout: float) -> dict:
    """Run under /usr/bin/time -v; return the JSON it printed plus wall, peak RSS and
    the 1-minute load average read just before."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True,
                              timeout=timeout,
                              env=HENDERSON_ENV if cmd[0] == sys.executable else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "load": load}
    wall = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines()
                if not line.startswith(("\t", "Command exited"))][-2:]
        return {"error": " / ".join(tail)[:200], "load": load}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall=wall, peak_mb=int(peak.group(1)) / 1024 if peak else float("nan"),
                  load=load)
    return result


def have_lme4() -> bool:
    if not shutil.which("Rscript"):
        return False
    proc = subprocess.run(["Rscript", "-e", "library(lme4)"], capture_output=True)
    return proc.returncode == 0


def mixedlm_python() -> str | None:
    """The interpreter of ``HENDERSON_MIXEDLM_PYTHON`` when it imports mixedlm."""
    python = os.environ.get("HENDERSON_MIXEDLM_PYTHON")
    if not python:
        return None
    proc = subprocess.run([python, "-c", "import mixedlm"], capture_output=True)
    return python if proc.returncode == 0 else None


def have_statsmodels() -> bool:
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--large", action="store_true",
                        help="also 1,000,000 rows (every tool) and 10,000,000 (henderson)")
    parser.add_argument("--skip-10m", action="store_true")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fits per tool and case, taking turns (default 3)")
    parser.add_argument("--large-rounds", type=int, default=1,
                        help="rounds of the --large cases (default 1: lme4 takes minutes)")
    parser.add_argument("--only", default=None,
                        help="semicolon-separated case labels to run (default all)")
    parser.add_argument("--no-statsmodels", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import henderson as hd
    from henderson.simulate import crossed

    work = Path(tempfile.mkdtemp(prefix="henderson-bench-"))
    rows_200k, g1_200k = (20_000, 2_000) if args.quick else (200_000, 20_000)
    slopes = "y ~ x + (1 + x | g1) + (1 | g2)"
    insteval = "y ~ service * dept + (1 | s) + (1 | d)"
    insteval_factors = "s,d,service,dept,studage,lectage"
    # (label, formula, REML/ML, source, factor columns, henderson only)
    cases = [
        ("sleepstudy", "Reaction ~ Days + (Days | Subject)", "REML", "sleepstudy",
         "Subject", False),
        ("InstEval REML", insteval, "REML", "insteval", insteval_factors, False),
        ("InstEval ML", insteval, "ML", "insteval", insteval_factors, False),
        (f"slopes, {rows_200k:,} rows", slopes, "REML", ("crossed", rows_200k, g1_200k),
         "g1,g2", False),
    ]
    if args.large:
        cases.append(("slopes, 1,000,000 rows", slopes, "REML",
                      ("crossed", 1_000_000, 100_000), "g1,g2", False))
        if not args.skip_10m:
            cases.append(("slopes, 10,000,000 rows", slopes, "REML",
                          ("crossed", 10_000_000, 1_000_000), "g1,g2", True))
    if args.only:
        wanted = {label.strip() for label in args.only.split(";")}
        cases = [case for case in cases if case[0] in wanted]
    lme4 = have_lme4()
    mixedlm = mixedlm_python()
    script = work / "lme4.R"
    script.write_text(LME4)
    rows = []
    for label, formula, criterion, source, factors, henderson_only in cases:
        large = isinstance(source, tuple) and source[1] >= 1_000_000
        if isinstance(source, tuple):
            _, n_rows, n_g1 = source
            frame = crossed(n_rows, n_g1, 1_000, seed=1)
            data_arg = str(work / f"crossed_{n_rows}.parquet")
            frame.to_parquet(data_arg)
            csv = work / f"crossed_{n_rows}.csv"
        else:
            frame = hd.datasets.load(source)
            data_arg = source
            csv = work / f"{source}.csv"
        if not henderson_only and not csv.exists():
            frame.to_csv(csv, index=False)
        del frame
        commands = {"henderson": ([sys.executable, "-c", HENDERSON, data_arg, formula,
                                   criterion], 3600)}
        if lme4 and not henderson_only:
            commands["lme4"] = (["Rscript", str(script), str(csv), formula, criterion,
                                 factors], 3600)
        if mixedlm and not henderson_only:
            commands["mixedlm"] = ([mixedlm, "-c", MIXEDLM, str(csv), formula, criterion,
                                    factors], 3600)
        rows.append(run_rounds(label, commands, args.large_rounds if large else args.rounds))
    if have_statsmodels() and not args.no_statsmodels and not args.only:
        subset = hd.datasets.load("insteval").iloc[:20_000]
        csv = work / "insteval20k.csv"
        subset.to_csv(csv, index=False)
        formula = "y ~ 1 + (1 | s) + (1 | d)"
        commands = {"henderson": ([sys.executable, "-c", HENDERSON, "insteval", formula,
                                   "REML", "20000"], 600),
                    "statsmodels": ([sys.executable, "-c", STATSMODELS, str(csv), "y ~ 1",
                                     "s,d"], 1200)}
        if lme4:
            commands["lme4"] = (["Rscript", str(script), str(csv), formula, "REML", "s,d"], 600)
        if mixedlm:
            commands["mixedlm"] = ([mixedlm, "-c", MIXEDLM, str(csv), formula, "REML", "s,d"],
                                   600)
        # statsmodels takes minutes: one round
        rows.append(run_rounds("InstEval, first 20,000 rows, y ~ 1 + (1|s) + (1|d)",
                               commands, 1))
    write_report(rows, Path(args.out), quick=args.quick, lme4=lme4, mixedlm=mixedlm)
    return 0


def run_rounds(label: str, commands: dict, rounds: int) -> dict:
    """Every tool's command ``rounds`` times, the tools taking turns."""
    runs = {tool: [] for tool in commands}
    print(f"== {label}", file=sys.stderr)
    for round_ in range(rounds):
        for tool, (cmd, timeout) in commands.items():
            result = timed(cmd, timeout)
            runs[tool].append(result)
            print(f"   round {round_ + 1} {tool}: {result}", file=sys.stderr)
    return {"case": label, "runs": runs}


def summary(runs: list[dict]) -> dict | None:
    """Median fit, wall and peak over the runs that finished, with their load range."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"]} if runs else None
    return {key: statistics.median(r[key] for r in good)
            for key in ("fit", "wall", "peak_mb")} | {
        "objective": good[0]["objective"], "fits": [r["fit"] for r in good],
        "loads": [r["load"] for r in runs]}


def ratio(runs: dict, other: str) -> str:
    """Median over rounds of other's fit / henderson's fit in the same round."""
    if other not in runs or "henderson" not in runs:
        return "—"
    ratios = [b["fit"] / a["fit"] for a, b in zip(runs["henderson"], runs[other])
              if "error" not in a and "error" not in b and a["fit"] > 0]
    return f"{statistics.median(ratios):.1f}x" if ratios else "—"


def kernel_note(rows) -> str:
    seconds = [r["kernel_load"] for row in rows for r in row["runs"].get("henderson", [])
               if "kernel_load" in r]
    return (f"{statistics.median(seconds):.2f} s, median of {len(seconds)}" if seconds
            else "not measured")


def cell(result: dict | None) -> str:
    if result is None:
        return "not run"
    if "error" in result:
        return result["error"].replace("|", "\\|")
    return f"{result['fit']:.2f}"


def write_report(rows, path: Path, quick: bool, lme4: bool, mixedlm) -> None:
    import henderson as hd

    tools = [t for t in TOOLS if any(t in row["runs"] for row in rows)]
    rounds = max((len(r) for row in rows for r in row["runs"].values()), default=0)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/compare.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, henderson "
        f"{hd.__version__}, commit {commit or '?'}"
        + (", lme4 via Rscript" if lme4 else ", lme4 not installed")
        + (", mixedlm via HENDERSON_MIXEDLM_PYTHON" if mixedlm else ", mixedlm not installed")
        + ").",
        f"Every fit runs in its own process on the same data; {rounds} rounds in which the "
        "tools take turns (1,000,000 rows and more, and statsmodels: one).",
        "'fit' is the model call alone, the median over the rounds (the rounds' figures "
        "follow it; henderson's process loads its compiled kernels first, "
        "`hd.load_compiled_kernels()`, once per process as R's `library(lme4)` and "
        "mixedlm's import are: "
        + kernel_note(rows) + "); 'tool / henderson' is the median over rounds of the "
        "tool's fit over henderson's in the same round; peak memory is the maximum resident set size "
        "from `/usr/bin/time -v` (median); load is the 1-minute load average read "
        "before each fit (lowest-highest over the row). This machine is shared: read "
        "the ratios, not the seconds.",
        "",
        "| case | " + " | ".join(f"{t} fit (s)" for t in tools)
        + "".join(f" | {t} / henderson" for t in tools if t != "henderson")
        + " | peak MB (" + ", ".join(tools) + ") | objective | load |",
        "|---|" + "---:|" * len(tools) + "---:|" * (len(tools) - 1) + "---|---:|---|",
    ]
    for row in rows:
        runs = row["runs"]
        summaries = {t: summary(runs[t]) if t in runs else None for t in tools}
        fits = []
        for t in tools:
            s = summaries[t]
            if s is not None and "error" not in s and len(s["fits"]) > 1:
                fits.append(f"{cell(s)} ({', '.join(f'{f:.2f}' for f in s['fits'])})")
            else:
                fits.append(cell(s))
        ratios = [ratio(runs, t) for t in tools if t != "henderson"]
        peaks = ", ".join("—" if s is None or "error" in s else f"{s['peak_mb']:.0f}"
                          for s in summaries.values())
        objectives = sorted({f"{s['objective']:.4f}" for s in summaries.values()
                             if s is not None and "error" not in s})
        loads = [x for s in summaries.values() if s is not None and "loads" in s
                 for x in s["loads"]]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "—"
        case = row["case"].replace("|", "\\|")
        lines.append(f"| {case} | " + " | ".join(fits) + "".join(f" | {r}" for r in ratios)
                     + f" | {peaks} | {' / '.join(objectives)} | {load} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    marker = "<!-- other benchmarks -->"
    tail = existing[existing.index(marker):] if marker in existing else marker + "\n"
    path.write_text("\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    sys.exit(main())
