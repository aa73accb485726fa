"""Benchmark sizes: ``HENDERSON_BENCH_SCALE=full`` runs the sizes the issues name
(1M-row crossed design, 1M-animal pedigree); the default ``ci`` runs each benchmark on
a smaller instance of the same simulator so that CI exercises them."""
from __future__ import annotations

import os
import resource

import pytest

SCALE = os.environ.get("HENDERSON_BENCH_SCALE", "ci")

SIZES = {
    "ci": {"crossed_rows": 100_000, "crossed_g1": 10_000, "crossed_g2": 100,
           "big_rows": 300_000, "big_g1": 30_000, "animals": 50_000,
           "stream_rows": 2_000_000, "stream_g1": 20_000, "stream_g2": 50,
           "ss_animals": 20_000, "ss_genotyped": 1_000, "ss_markers": 2_000, "ss_core": 250,
           "ss_apy_genotyped": 2_000, "ss_apy_core": 500,
           "gwas_samples": 1_000, "gwas_variants": 10_000, "gwas_chromosomes": 22,
           "gwas_big_samples": 10_000, "gwas_big_variants": 20_000,
           "movie_rows": 1_000_000, "movie_users": 7_000, "movie_items": 1_000},
    "full": {"crossed_rows": 1_000_000, "crossed_g1": 100_000, "crossed_g2": 1_000,
             "big_rows": 10_000_000, "big_g1": 1_000_000, "animals": 1_000_000,
             "stream_rows": 50_000_000, "stream_g1": 100_000, "stream_g2": 50,
             "ss_animals": 1_000_000, "ss_genotyped": 20_000, "ss_markers": 50_000,
             "ss_core": 5_000, "ss_apy_genotyped": 60_000, "ss_apy_core": 10_000,
             "gwas_samples": 5_000, "gwas_variants": 100_000, "gwas_chromosomes": 22,
             "gwas_big_samples": 100_000, "gwas_big_variants": 1_000_000,
             "movie_rows": 10_000_000, "movie_users": 70_000, "movie_items": 10_000},
}[SCALE]


@pytest.fixture(scope="session")
def sizes():
    return SIZES


def run_once(benchmark, func, *args, **kwargs):
    """One timed round: these fits take seconds to minutes."""
    return benchmark.pedantic(func, args=args, kwargs=kwargs, rounds=1, iterations=1)


def reset_peak() -> None:
    """Start this process's peak resident memory afresh (Linux ≥ 4.0), so that a
    benchmark's peak is its own, not the simulation's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_gb() -> float:
    """The peak resident memory since the last reset (VmHWM), in GiB."""
    try:
        with open("/proc/self/status") as handle:
            return int(handle.read().split("VmHWM:")[1].split()[0]) / 2**20
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
