"""Core engine benchmarks: InstEval, and crossed designs from the simulator."""
import numpy as np
import pytest

import henderson as hd
from henderson.simulate import crossed

from conftest import run_once


def test_insteval_reml(benchmark):
    data = hd.datasets.load("insteval")
    m = run_once(benchmark, hd.lmm, "y ~ service * dept + (1 | s) + (1 | d)", data)
    assert abs(m.objective - 237688.733511) < 2e-7 * 237688.733511
    benchmark.extra_info.update(evaluations=m.n_evaluations, ordering=m.mme.ordering,
                                **{k: round(v, 4) for k, v in m.timings.items()})


def test_sleepstudy_reml(benchmark):
    data = hd.datasets.load("sleepstudy")
    m = benchmark(hd.lmm, "Reaction ~ Days + (Days | Subject)", data)
    assert abs(m.objective - 1743.62827195995) < 1e-6


def test_crossed_design(benchmark, sizes):
    data = crossed(sizes["crossed_rows"], sizes["crossed_g1"], sizes["crossed_g2"], seed=1)
    m = run_once(benchmark, hd.lmm, "y ~ x + (1 + x | g1) + (1 | g2)", data)
    assert m.converged and m.sigma == pytest.approx(1.0, rel=0.05)
    benchmark.extra_info.update(rows=len(data), evaluations=m.n_evaluations,
                                ordering=m.mme.ordering,
                                **{k: round(v, 4) for k, v in m.timings.items()})


@pytest.mark.slow
def test_crossed_design_large(benchmark, sizes):
    data = crossed(sizes["big_rows"], sizes["big_g1"], 1_000, seed=2)
    m = run_once(benchmark, hd.lmm, "y ~ x + (1 + x | g1) + (1 | g2)", data)
    assert m.converged and m.sigma == pytest.approx(1.0, rel=0.05)
    benchmark.extra_info.update(rows=len(data), evaluations=m.n_evaluations,
                                **{k: round(v, 4) for k, v in m.timings.items()})


def test_selected_inverse_kernel(benchmark):
    data = hd.datasets.load("insteval")
    d = hd.build_design("y ~ service * dept + (1 | s) + (1 | d)", data)
    mme = hd.MixedModelEquations(d)
    mme.factorize(np.array([0.28, 0.44]))
    selected = benchmark(mme.selected_inverse)
    assert selected.matrix.nnz > 0


def test_supernodal_selected_inverse_kernel(benchmark):
    """The same on CHOLMOD's supernodes (fixed effects in the sparse factor), written
    over a copy of the factor's values."""
    from henderson.factor import SupernodalInverse

    data = hd.datasets.load("insteval")
    d = hd.build_design("y ~ service * dept + (1 | s) + (1 | d)", data)
    mme = hd.MixedModelEquations(d, mode="supernodal", dense_fixed=False)
    mme.factorize(np.array([0.28, 0.44]))
    selected = benchmark(mme.selected_inverse)
    assert isinstance(selected, SupernodalInverse)
