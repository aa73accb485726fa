"""Threads of the BLAS library, limited around the calls that suffer from them.

LAPACK's tridiagonal reduction (``?sytrd``, the first half of a symmetric
eigendecomposition) is bound by memory traffic (matrix-vector products): a second
OpenBLAS thread barely helps it on an idle machine, and on a machine where another
process is busy the spinning threads wait on each other. Measured on the 2-core
machine of the benchmarks with one other busy process, n = 2,000: ``dsytrd`` 0.5 s on
one thread against 11-14 s on two; ``eigh`` 1.2-1.7 s against 4-7 s.
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def blas_threads(limit: int = 1):
    """Run the block with at most ``limit`` BLAS threads (threadpoolctl); a no-op when
    threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield
