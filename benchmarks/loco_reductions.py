"""LOCO's tridiagonal reductions one at a time against two side by side (issue 14).

Builds one symmetric K of order n, reduces it ``count`` times one at a time on one
BLAS thread, then two at a time (``henderson.gwas.reduce_side_by_side``), in rounds,
with the machine's load before each.

    python benchmarks/loco_reductions.py [n] [count] [rounds]     # 5000 4 2
"""
import sys
import time

import numpy as np

from henderson.gwas import reduce_side_by_side
from henderson.linalg import tridiagonal_reduction
from henderson.threads import blas_threads


def load() -> str:
    with open("/proc/loadavg") as handle:
        return handle.read().split()[0]


def main(n: int = 5000, count: int = 4, rounds: int = 2) -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n // 2)).astype(np.float32)
    K = (A @ A.T).astype(np.float64) / n
    matrices = [K] * count
    for _ in range(rounds):
        before_one = load()
        start = time.perf_counter()
        with blas_threads(1):
            for matrix in matrices:
                tridiagonal_reduction(matrix)
        one = time.perf_counter() - start
        before_two = load()
        start = time.perf_counter()
        for i in range(0, count, 2):
            reduce_side_by_side(matrices[i:i + 2])
        two = time.perf_counter() - start
        print(f"n={n} x{count}: one at a time {one:.1f} s (load {before_one}), "
              f"two side by side {two:.1f} s (load {before_two}), ratio {one / two:.2f}",
              flush=True)


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:4]])
