"""The sparse-GRM score scan of issue 14, stage by stage: simulate, GRM, null fit, scan.

    PYTHONPATH=src python3 benchmarks/sparse_gwas_stages.py            # CI size
    PYTHONPATH=src python3 benchmarks/sparse_gwas_stages.py --full     # 100,000 x 1M

simulates a PLINK set of people in families of four siblings (``gwas_panel``; the
panel repeats ``--distinct`` simulated variants up to ``--variants``: a scan's cost
does not depend on the values, and simulating 1e11 genotypes would take longer than
the scan), builds ``hd.grm(g, cutoff=...)`` from the first ``--grm-variants`` variants,
fits the null model (``SparseSpace``: CHOLMOD of h² K + (1 − h²) I) and runs
``hd.gwas(..., test="score")`` over every variant, streaming to Parquet. The scan's
figure includes its own null fit (the user's call); the null fit is also timed alone.

Each stage prints a JSON line when it ends: seconds, the peak resident memory of the
stage (VmHWM, reset before it), and the 1-minute load average sampled every 15 s
during it (min, max). A Markdown table of the stages follows at the end.

Cutoff and variants: the off-diagonal noise of a GRM from m variants has an sd near
1/sqrt(m), shifted by population structure. With two subpopulations (F_ST 0.02) and
4,000 people, the share of unrelated pairs above 0.05 was 1.1e-2 from 5,000 variants,
1.0e-3 from 10,000 and 1.5e-5 from 20,000 (1,060, 104 and 1.5 spurious entries per
person at 100,000 people); above 0.1 it was 1.3e-7 from 5,000. Hence the defaults:
cutoff 0.05 from 20,000 variants.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from conftest import peak_gb, reset_peak  # benchmarks/ is this script's folder

SIZES = {
    "ci": {"samples": 10_000, "variants": 40_000, "distinct": 20_000},
    "full": {"samples": 100_000, "variants": 1_000_000, "distinct": 20_000},
}
COVARIATES = "y ~ age + sex + batch"


class _LoadSampler:
    """The 1-minute load average every ``interval`` seconds while a stage runs."""

    def __init__(self, interval: float = 15.0):
        self.interval, self.values = interval, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.values.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.values.append(os.getloadavg()[0])


def stage(name: str, rows: list, func, *args, **kwargs):
    """Run one stage; print and keep its seconds, peak memory and load."""
    reset_peak()
    with _LoadSampler() as load:
        start = time.perf_counter()
        result = func(*args, **kwargs)
        seconds = time.perf_counter() - start
    row = {"stage": name, "seconds": round(seconds, 1), "peak_gb": round(peak_gb(), 2),
           "load_min": round(min(load.values), 2), "load_max": round(max(load.values), 2)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="100,000 people x 1M variants")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--variants", type=int)
    parser.add_argument("--distinct", type=int, help="variants simulated (repeated)")
    parser.add_argument("--grm-variants", type=int, default=20_000)
    parser.add_argument("--cutoff", type=float, default=0.05)
    parser.add_argument("--dir", help="where the PLINK set goes (a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the PLINK set")
    args = parser.parse_args(argv)
    size = dict(SIZES["full" if args.full else "ci"])
    for key in ("samples", "variants", "distinct"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    size["distinct"] = min(size["distinct"], size["variants"])

    import henderson as hd
    from henderson.gwas import SparseSpace, _relationship_for, phenotypes
    from henderson.simulate import gwas_panel

    where = Path(args.dir or tempfile.mkdtemp(prefix="sparse-gwas-"))
    where.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    print(json.dumps({"size": size, "grm_variants": args.grm_variants, "cutoff": args.cutoff,
                      "dir": str(where), "cores": os.cpu_count(), "load": os.getloadavg()[0]}),
          flush=True)
    try:
        genotypes, pheno = stage(
            "simulate", rows, gwas_panel, size["samples"], size["variants"],
            n_chromosomes=22, family_size=4, n_causal=20, causal_share=0.05, seed=9,
            block=500, path=where / "panel", distinct=size["distinct"])
        grm_variants = min(args.grm_variants, size["distinct"])
        K = stage("grm", rows, hd.grm, genotypes, cutoff=args.cutoff,
                  variants=np.arange(grm_variants))
        off_diagonal = (K.matrix.nnz - size["samples"]) / size["samples"]
        print(json.dumps({"grm_nnz": int(K.matrix.nnz), "grm_variants": grm_variants,
                          "off_diagonal_per_person": round(off_diagonal, 2)}), flush=True)

        def null_fit():
            phenotype = phenotypes(COVARIATES, pheno, genotypes, "iid")[0]
            space = SparseSpace(_relationship_for(K, genotypes, phenotype.sample_rows,
                                                  None, 0.0)[0])
            return space.fit(phenotype, reml=True)

        null = stage("null fit", rows, null_fit)
        print(json.dumps({"h2": null.h2}), flush=True)
        result = stage("gwas (null fit + scan)", rows, hd.gwas, COVARIATES, pheno, genotypes,
                       grm=K, test="score", progress=True, out=where / "scan.parquet")
        causal = result.set_index("snp").loc[pheno.attrs["causal"], "pvalue"]
        print(json.dumps({"rows": len(result), "causal_min_log10p":
                          round(float(np.log10(causal.min())), 1)}), flush=True)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(where, ignore_errors=True)
    print("\n| stage | seconds | peak GB | load (1-min, min-max) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['seconds']:,.0f} | {row['peak_gb']:.2f} | "
              f"{row['load_min']:.1f}-{row['load_max']:.1f} |")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
