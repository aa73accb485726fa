"""The block-elimination path against the CHOLMOD path on the same equations."""
import numpy as np
import pytest

import henderson as hd
from henderson.threads import blas_threads
from henderson.mme import MixedModelEquations
from henderson.schur import schur_applies


def BlockEliminationEquations(design, **options):
    """The equations factored by block elimination."""
    return MixedModelEquations(design, strategy="schur", **options)
from henderson.simulate import crossed

MODELS = [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy", None),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "penicillin", None),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy_weighted", "w"),
    ("strength ~ 1 + (1|batch/cask)", "pastes", None),
    ("height ~ moisture + (1|pot)", "plants", None),
]


def designs():
    for formula, data, weights in MODELS:
        yield hd.build_design(formula, hd.datasets.load(data), weights=weights)
    yield hd.build_design("y ~ x + (1 + x | g1) + (1 | g2)", crossed(3000, 300, 20, seed=4))


@pytest.mark.parametrize("design", list(designs()), ids=[m[1] for m in MODELS] + ["crossed"])
def test_block_elimination_equals_cholmod(design):
    assert schur_applies(design)
    rng = np.random.default_rng(2)
    theta = design.theta_start() * rng.uniform(0.3, 1.3, design.n_theta) + 0.05
    a, b = BlockEliminationEquations(design), MixedModelEquations(design, ordering="amd")
    a.factorize(theta)
    b.factorize(theta)
    assert a.logdet() == pytest.approx(b.logdet(), rel=1e-11)
    assert a.logdet_random() == pytest.approx(b.logdet_random(), rel=1e-11)
    rhs = rng.normal(size=a.size)
    assert np.allclose(a.solve(rhs), b.solve(rhs), rtol=1e-9, atol=1e-11)
    assert np.allclose(a.fixed_block_inverse(), b.fixed_block_inverse(), rtol=1e-9)
    # selected inverses on the whole pattern of C
    cols = np.repeat(np.arange(b.size), np.diff(b.indptr))
    rows = b.indices
    original_rows, original_cols = b.perm[rows], b.perm[cols]
    for random_only in (False, True):
        keep = np.ones(len(rows), bool)
        if random_only:
            keep = (original_rows < b.n_random) & (original_cols < b.n_random)
        sa = a.selected_inverse(random_only).entries(original_rows[keep], original_cols[keep])
        sb = b.selected_inverse(random_only).entries(original_rows[keep], original_cols[keep])
        assert np.allclose(sa, sb, rtol=1e-8, atol=1e-12)
    # the diagonal alone (potri and the per-level quadratic forms) against a dense
    # inverse of C and of C_zz; multi-column solves against one column at a time
    dense = np.linalg.inv(_dense_C(b))
    q = b.n_random
    vector = rng.normal(size=a.size)
    for equations in (a, b):
        assert np.allclose(equations.multiply(vector), _dense_C(b) @ vector, rtol=1e-12)
        assert np.allclose(equations.inverse_diagonal(), np.diag(dense)[:q], rtol=1e-9)
        assert np.allclose(equations.inverse_diagonal(random_block_only=True),
                           np.diag(np.linalg.inv(_dense_C(b)[:q, :q])), rtol=1e-9)
        # the k x k diagonal blocks per level (the interior gradient's), C⁻¹ and C_zz⁻¹
        offsets = design.column_offsets()
        for random_only, inverse in ((False, dense), (True, np.linalg.inv(_dense_C(b)[:q, :q]))):
            blocks = equations.inverse_level_blocks(random_only)
            assert len(blocks) == len(design.terms)
            for t, term in enumerate(design.terms):
                rows, cols = term.level_block_indices(offsets[t])
                assert blocks[t].shape == (term.n_levels, term.n_coefs, term.n_coefs)
                assert np.allclose(blocks[t], inverse[rows, cols], rtol=1e-9, atol=1e-12)
    block = rng.normal(size=(a.size, 3))
    assert np.allclose(a.solve(block), np.column_stack([a.solve(c) for c in block.T]),
                       rtol=1e-12, atol=1e-14)


def _dense_C(equations):
    """C(θ) as a dense matrix in original order, from the lower triangle the
    CHOLMOD path fills (permuted coordinates)."""
    lower = equations.matrix.toarray()
    permuted = lower + np.tril(lower, -1).T
    C = np.empty_like(permuted)
    C[np.ix_(equations.perm, equations.perm)] = permuted
    return C


def test_fit_strategies_agree():
    df = hd.datasets.load("penicillin")
    a = hd.lmm("diameter ~ 1 + (1|plate) + (1|sample)", df, strategy="schur")
    b = hd.lmm("diameter ~ 1 + (1|plate) + (1|sample)", df, strategy="cholmod")
    assert a.mme.ordering == "schur" and b.mme.ordering != "schur"
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
    for g in ("plate", "sample"):
        assert np.allclose(a.ranef_sd[g], b.ranef_sd[g], rtol=1e-5)  # θ to optimiser tolerance


def test_schur_not_used_for_pedigrees_or_large_trailing_blocks():
    ped = hd.Pedigree(["1", "2", "3", "4"], ["0", "0", "1", "1"], ["0", "0", "2", "2"])
    import pandas as pd
    data = pd.DataFrame({"animal": ["3", "4", "3", "4", "1", "2"], "y": [1., 2, 3, 4, 5, 6]})
    d = hd.build_design("y ~ 1 + (1|animal)", data, relationships={"animal": ped})
    assert not schur_applies(d)


@pytest.mark.parametrize("strategy", ["schur", "cholmod"])
def test_failed_factorisation_does_not_leave_a_stale_theta(strategy):
    from henderson.mme import NotPositiveDefiniteError

    d = hd.build_design("diameter ~ 1 + (1|plate) + (1|sample)", hd.datasets.load("penicillin"))
    mme = BlockEliminationEquations(d) if strategy == "schur" else MixedModelEquations(d)
    good = np.array([1.5, 3.5])
    mme.factorize(good)
    before = mme.logdet()
    try:  # block elimination raises; CHOLMOD may return a NaN factor instead
        mme.factorize(np.array([np.nan, 1.0]))
    except NotPositiveDefiniteError:
        assert mme.theta is None
    mme.factorize(good)                      # must refactor, not trust the old state
    assert mme.logdet() == pytest.approx(before, rel=1e-12)


@pytest.mark.parametrize("equations", [BlockEliminationEquations, MixedModelEquations])
def test_copies_have_their_own_numeric_workspace(equations):
    """The level factors and S (or CHOLMOD's factor) are written in place; a copy (the
    bootstrap refits copies) factorised at another θ must leave the original alone."""
    d = hd.build_design("diameter ~ 1 + (1|plate) + (1|sample)", hd.datasets.load("penicillin"))
    original = equations(d)
    original.factorize(np.array([1.5, 3.5]))
    rhs = original.rhs(np.array([1.5, 3.5]))
    before = original.solve(rhs)
    clone = original.with_private_workspace()
    clone.factorize(np.array([0.2, 0.4]))
    np.testing.assert_array_equal(original.solve(rhs), before)
    assert not np.allclose(clone.solve(rhs), before)


@pytest.mark.parametrize("formula,data", [
    ("diameter ~ 1 + (1|plate) + (1|sample)", "penicillin"),
    ("y ~ x + (1 + x | g1) + (1 | g2)", None),
])
def test_two_threads_give_the_one_thread_numbers(formula, data, monkeypatch):
    """The elimination split by rows of S and the inverse's diagonal split by levels
    over two threads (large designs) against one thread doing all of it."""
    import henderson.schur as schur

    frame = hd.datasets.load(data) if data else crossed(3000, 300, 20, seed=4)
    design = hd.build_design(formula, frame)
    theta = design.theta_start() * 0.7 + 0.1
    serial = BlockEliminationEquations(design)
    assert serial.factorization._row_split is None
    monkeypatch.setattr(schur, "THREADED_WORK", 0)
    threaded = BlockEliminationEquations(design)
    assert threaded.factorization._row_split is not None
    assert threaded.factorization._level_split is not None
    # one BLAS thread for both: the threaded plan runs S's LAPACK calls on one below
    # schur.SCHUR_SHARED_BLAS_FROM, and LAPACK's own rounding follows its thread count
    with blas_threads(1):
        for equations in (serial, threaded):
            equations.factorize(theta)
        assert threaded.logdet() == serial.logdet()
        np.testing.assert_array_equal(threaded.factorization.schur_factor,
                                      serial.factorization.schur_factor)
        np.testing.assert_array_equal(threaded.inverse_diagonal(), serial.inverse_diagonal())


def test_one_right_hand_side_is_the_column_solve():
    """A vector right-hand side (each evaluation of the objective) goes to LAPACK
    potrs directly: the same numbers, to the bit, as the same column solved as a
    matrix through cho_solve, and the dense solution."""
    design = hd.build_design("distance ~ age + Sex + (age | Subject)",
                             hd.datasets.load("orthodont"))
    equations = BlockEliminationEquations(design)
    rng = np.random.default_rng(3)
    theta = np.array([0.9, -0.1, 0.2])
    equations.factorize(theta)
    for _ in range(3):
        rhs = rng.normal(size=equations.size)
        vector = equations.solve(rhs)
        np.testing.assert_array_equal(vector, equations.solve(rhs[:, None])[:, 0])
        assert np.allclose(vector, np.linalg.solve(_dense_C(equations), rhs), rtol=1e-10)


def test_one_right_hand_side_without_a_trailing_block():
    """One term and no fixed effects: S is empty and the levels solve alone."""
    design = hd.build_design("distance ~ 0 + (age | Subject)", hd.datasets.load("orthodont"))
    equations = BlockEliminationEquations(design)
    assert equations.factorization.m == 0
    equations.factorize(np.array([0.9, -0.1, 0.2]))
    rhs = np.random.default_rng(4).normal(size=equations.size)
    assert np.allclose(equations.solve(rhs), np.linalg.solve(_dense_C(equations), rhs),
                       rtol=1e-10)
    np.testing.assert_array_equal(equations.solve(rhs), equations.solve(rhs[:, None])[:, 0])


@pytest.mark.parametrize("design", list(designs()), ids=[m[1] for m in MODELS] + ["crossed"])
def test_level_slots_without_a_sort_equal_the_sorted_ones(design):
    """The B slots read as column tails (sorted row indices) are the (level, row, coef)
    lexsort's."""
    from henderson.schur import _level_b_slots

    equations = BlockEliminationEquations(design)
    first = design.terms[0]
    args = (equations.indptr, equations.indices, first.n_columns, first.n_coefs,
            first.n_levels)
    assert equations.matrix.has_sorted_indices
    ranges, lexsorted = _level_b_slots(*args, True), _level_b_slots(*args, False)
    for a, b in zip(ranges, lexsorted):
        np.testing.assert_array_equal(a, b)
    assert len(ranges[1]) > 0 or len(design.terms) == 1 and design.n_fixed == 0
