"""Benchmark sizes: ``HENDERSON_BENCH_SCALE=full`` runs the sizes the issues name
(1M-row crossed design, 1M-animal pedigree); the default ``ci`` runs each benchmark on
a smaller instance of the same simulator so that CI exercises them."""
from __future__ import annotations

import os

import pytest

SCALE = os.environ.get("HENDERSON_BENCH_SCALE", "ci")

SIZES = {
    "ci": {"crossed_rows": 100_000, "crossed_g1": 10_000, "crossed_g2": 100,
           "big_rows": 300_000, "big_g1": 30_000, "animals": 50_000,
           "stream_rows": 2_000_000, "stream_g1": 20_000, "stream_g2": 50},
    "full": {"crossed_rows": 1_000_000, "crossed_g1": 100_000, "crossed_g2": 1_000,
             "big_rows": 10_000_000, "big_g1": 1_000_000, "animals": 1_000_000,
             "stream_rows": 50_000_000, "stream_g1": 100_000, "stream_g2": 50},
}[SCALE]


@pytest.fixture(scope="session")
def sizes():
    return SIZES


def run_once(benchmark, func, *args, **kwargs):
    """One timed round: these fits take seconds to minutes."""
    return benchmark.pedantic(func, args=args, kwargs=kwargs, rounds=1, iterations=1)
