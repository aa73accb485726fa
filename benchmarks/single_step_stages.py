"""The single-step evaluation of issue 14 in two processes: H⁻¹ once, then BLUP + PEVs.

    PYTHONPATH=src python3 benchmarks/single_step_stages.py prepare DIR          # CI size
    PYTHONPATH=src python3 benchmarks/single_step_stages.py prepare DIR --full   # 1M animals
    PYTHONPATH=src python3 benchmarks/single_step_stages.py blup DIR

``prepare`` simulates ``test_bench_single_step.py``'s population and genotypes and
saves H⁻¹ (``hinv.npz``, its labels and log-determinant) and the records to DIR: at
full size the simulation and H⁻¹ take 15-35 minutes, the BLUP a few. ``blup`` fits
``y ~ sex + hys + (1 | animal)`` at the benchmark's known variances on them and asks
for every PEV, in a process that holds H⁻¹ as the benchmark's does; it prints each
stage's seconds, CPU seconds, peak resident memory (VmHWM, reset before it) and load,
and saves the breeding values to DIR/breeding_values.parquet (to compare two versions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from conftest import SIZES, peak_gb, reset_peak  # benchmarks/ is this script's folder

FORMULA = "y ~ sex + hys + (1 | animal)"
VARIANCES = {"animal": 30.0, "residual": 70.0}


def _report(name: str, seconds: float, cpu: float) -> None:
    print(json.dumps({"stage": name, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                      "peak_gib": round(peak_gb(), 2),
                      "load": [round(v, 2) for v in os.getloadavg()]}), flush=True)


def _timed(name: str, call):
    reset_peak()
    cpu, start = sum(os.times()[:2]), time.perf_counter()
    out = call()
    _report(name, time.perf_counter() - start, sum(os.times()[:2]) - cpu)
    return out


def prepare(directory: Path, full: bool) -> None:
    import henderson as hd
    from henderson.simulate import animal_population
    from test_bench_single_step import simulate_genotypes

    sizes = {k: v for k, v in (SIZES if not full else _full_sizes()).items()
             if k.startswith("ss_")}
    directory.mkdir(parents=True, exist_ok=True)

    def simulate():
        frame, records, truth = animal_population(sizes["ss_animals"], n_generations=8, seed=1)
        ped = hd.Pedigree.from_dataframe(frame)
        last_two_generations = frame["animal"].to_numpy()[-len(frame) // 4:]
        chosen = np.random.default_rng(2).choice(last_two_generations,
                                                 size=sizes["ss_genotyped"], replace=False)
        return ped, records, truth, simulate_genotypes(ped, chosen, sizes["ss_markers"], seed=3)

    ped, records, truth, genotypes = _timed("simulation", simulate)
    H = _timed("single_step", lambda: hd.single_step(ped, genotypes))
    del genotypes
    sp.save_npz(directory / "hinv.npz", H.matrix, compressed=False)
    pd.DataFrame({"label": np.asarray(H.labels)}).to_parquet(directory / "labels.parquet")
    records.to_parquet(directory / "records.parquet")
    pd.DataFrame({"truth": truth}).to_parquet(directory / "truth.parquet")
    (directory / "meta.json").write_text(json.dumps({"logdet": H.logdet(), **sizes}))


def _full_sizes() -> dict:
    os.environ["HENDERSON_BENCH_SCALE"] = "full"
    import importlib

    import conftest

    return importlib.reload(conftest).SIZES


def blup(directory: Path) -> None:
    import henderson as hd
    from henderson.genomic import RelationshipMatrix

    meta = json.loads((directory / "meta.json").read_text())
    labels = pd.read_parquet(directory / "labels.parquet")["label"].to_numpy()
    H = RelationshipMatrix(sp.load_npz(directory / "hinv.npz").tocsc(), labels,
                           kind="precision", logdet_covariance=meta["logdet"], check=False)
    records = pd.read_parquet(directory / "records.parquet")
    m = _timed("blup", lambda: hd.lmm(FORMULA, records, relationships={"animal": H},
                                      fixed_variances=VARIANCES))
    print(json.dumps({"lmm_stages": {k: round(v, 1) for k, v in m.timings.items()}}), flush=True)
    bv = _timed("pev", m.breeding_values)
    bv.to_parquet(directory / "breeding_values.parquet")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["prepare", "blup"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--full", action="store_true", help="1M animals, 20,000 genotyped")
    args = parser.parse_args(argv)
    if args.stage == "prepare":
        prepare(args.directory, args.full)
    else:
        blup(args.directory)


if __name__ == "__main__":
    sys.exit(main())
