"""The mixed-model equations (mme.py) against dense twins: C assembled from its
pattern equals the dense C, and the BLUPs, the selected inverse and the PEVs from its
factor equal a dense solve and a dense inverse, for random known precisions with a
sparse part and a dense block (the shape of single-step H⁻¹)."""
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.sparse as sp

import henderson as hd
from henderson import kernels
from henderson.genomic import RelationshipMatrix
from henderson.mme import MixedModelEquations


def sparse_with_dense_block(rng, n, n_block, density=0.05, last=False):
    """A random SPD precision: sparse, plus a dense block over n_block random levels
    (or the last ones, as genotyped animals are the youngest of a pedigree)."""
    A = sp.random(n, n, density=density, random_state=rng).toarray()
    A = A + A.T
    block = np.arange(n - n_block, n) if last else rng.choice(n, size=n_block, replace=False)
    B = rng.normal(size=(n_block, n_block + 3))
    A[np.ix_(block, block)] += B @ B.T / n_block
    A += np.diag(np.abs(A).sum(axis=1) + 1.0)
    return A


def animal_data(rng, n_animals, n_block, n_records, n_groups, last=False):
    """A precision K⁻¹ with a dense block over ``n_animals`` and records on them."""
    precision = sparse_with_dense_block(rng, n_animals, n_block=n_block, last=last)
    K = RelationshipMatrix(sp.csc_matrix(precision), [str(i) for i in range(n_animals)],
                           kind="precision")
    return K, random_data(rng, n_animals, n_records, n_groups=n_groups)


def random_data(rng, n_animals, n_records, n_groups):
    return pd.DataFrame({
        "animal": rng.integers(0, n_animals, n_records).astype(str),
        "herd": rng.integers(0, n_groups, n_records).astype(str),
        "pen": rng.integers(0, 7, n_records).astype(str),
        "x": rng.normal(size=n_records),
        "y": rng.normal(size=n_records),
    })


def dense_c(design, theta):
    """[Λ'Z'WZΛ + P, Λ'Z'WX; X'WZΛ, X'WX] from the design's matrices."""
    w = design.weights
    blocks, precisions = [], []
    for term, sl in zip(design.terms, design.theta_slices()):
        lam = term.relative_factor(theta[sl])
        Z = term.z_matrix().toarray()
        blocks.append(Z @ np.kron(np.eye(term.n_levels), lam))
        precision = (np.eye(term.n_levels) if term.level_precision is None
                     else term.level_precision.toarray())
        precisions.append(np.kron(precision, np.eye(term.n_coefs)))
    ZL = np.hstack(blocks)
    X = design.X.toarray() if sp.issparse(design.X) else np.asarray(design.X)
    W = np.hstack([ZL, X]) * np.sqrt(w)[:, None]
    C = W.T @ W
    q = ZL.shape[1]
    C[:q, :q] += scipy.linalg.block_diag(*precisions)
    return C


def full_c(mme):
    """C in the original order from the lower triangle the equations hold."""
    lower = mme.matrix.toarray()
    permuted = lower + np.tril(lower, -1).T
    C = np.empty_like(permuted)
    C[np.ix_(mme.perm, mme.perm)] = permuted
    return C


CASES = {
    # one animal term, a herd factor sparse in X (in the fill-reducing ordering)
    "animal-sparse-x": ("y ~ x + herd + (1 | animal)", dict(sparse_fixed=True), {}),
    # the few dense fixed effects eliminated densely
    "animal-dense-x": ("y ~ x + herd + (1 | animal)", dict(sparse_fixed=False), {}),
    # a second, crossed term with no known covariance
    "animal-and-pen": ("y ~ x + (1 | animal) + (1 | pen)", {}, {}),
    # a random slope on a known covariance: K⁻¹ ⊗ I_2
    "slope-on-animal": ("y ~ x + (x | animal) + (1 | pen)", {}, {}),
}


@pytest.mark.parametrize("ordering", ["auto", "amd", "natural"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c_blups_and_pevs_equal_the_dense_twin(case, ordering, seed, monkeypatch):
    # the dense trailing block of L (the dense block of K⁻¹, ordered last) goes to
    # LAPACK from a few columns on, as the genotyped block of H⁻¹ does at full size
    monkeypatch.setattr(kernels, "DENSE_TAIL_MIN", 3)
    rng = np.random.default_rng(seed)
    formula, options, _ = CASES[case]
    n_animals = 40
    K, data = animal_data(rng, n_animals, 12 + seed, 150, 9, last=seed > 0)
    design = hd.build_design(formula, data, relationships={"animal": K}, **options)
    mme = MixedModelEquations(design, ordering=ordering)
    theta = design.theta_start() * rng.uniform(0.5, 1.5, design.n_theta) + 0.2
    mme.factorize(theta)
    C = dense_c(design, theta)
    assert np.allclose(full_c(mme), C, rtol=1e-13, atol=1e-12 * np.abs(C).max())
    rhs = mme.rhs(theta)
    assert np.allclose(mme.solve(rhs), np.linalg.solve(C, rhs), rtol=1e-10, atol=1e-12)
    inverse = np.linalg.inv(C)
    q = design.n_random
    assert np.allclose(mme.inverse_diagonal(), np.diag(inverse)[:q], rtol=1e-10, atol=1e-14)
    selected = mme.selected_inverse()
    rows, cols = np.tril_indices(mme.size)
    in_pattern = np.abs(C[rows, cols]) > 0
    rows, cols = rows[in_pattern], cols[in_pattern]
    assert np.allclose(mme.inverse_entries(selected, rows, cols), inverse[rows, cols],
                       rtol=1e-10, atol=1e-12 * np.abs(inverse).max())
    assert np.allclose(mme.fixed_block_inverse(), inverse[q:, q:], rtol=1e-10, atol=1e-14)


def test_pevs_and_ebvs_of_a_fit_equal_the_dense_twin():
    rng = np.random.default_rng(7)
    n_animals = 60
    K, data = animal_data(rng, n_animals, 25, 200, 12)
    m = hd.lmm("y ~ herd + (1 | animal)", data, relationships={"animal": K},
               fixed_variances={"animal": 2.0, "residual": 3.0}, sparse_fixed=True)
    design = m.design
    sigma2 = 3.0
    theta = np.array([np.sqrt(2.0 / 3.0)])
    C = dense_c(design, theta)
    solution = np.linalg.solve(C, m.mme.rhs(theta))
    q = design.n_random
    bv = m.breeding_values()
    assert np.allclose(bv["ebv"].to_numpy(), theta[0] * solution[:q], rtol=1e-10, atol=1e-12)
    pev = sigma2 * theta[0] ** 2 * np.diag(np.linalg.inv(C))[:q]
    assert np.allclose(bv["pev"].to_numpy(), pev, rtol=1e-10)


def test_set_crossproducts_replaces_only_the_fixed_block():
    """New weights (a residual model's W(γ)) rewrite X'WX in C and leave K⁻¹ alone."""
    rng = np.random.default_rng(3)
    n_animals = 30
    K, data = animal_data(rng, n_animals, 10, 100, 5)
    design = hd.build_design("y ~ x + herd + (1 | animal)", data,
                             relationships={"animal": K}, sparse_fixed=True)
    mme = MixedModelEquations(design)
    weights = rng.uniform(0.5, 2.0, len(data))
    reweighted = design.__class__(**{**design.__dict__, "weights": weights})
    from henderson.mme import CrossProducts

    mme.set_crossproducts(CrossProducts.from_design(reweighted, mme.xp.fixed_shift))
    theta = np.array([0.8])
    mme.factorize(theta)
    assert np.allclose(full_c(mme), dense_c(reweighted, theta), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- pattern kernels
@pytest.mark.parametrize("seed", range(5))
def test_lower_triangle_and_permutation_kernels(seed):
    rng = np.random.default_rng(seed)
    n = 30
    A = sp.csc_matrix(sparse_with_dense_block(rng, n, 8, density=0.1))
    indptr, indices, data = kernels.lower_triangle(A.indptr, A.indices, A.data)
    lower = sp.csc_matrix((data, indices, indptr), shape=(n, n))
    assert np.array_equal(lower.toarray(), np.tril(A.toarray()))
    new_position = rng.permutation(n)
    indptr, indices, data = kernels.permute_lower(indptr, indices, data, new_position)
    assert all(np.all(np.diff(indices[indptr[j]:indptr[j + 1]]) > 0) for j in range(n))
    permuted = sp.csc_matrix((data, indices, indptr), shape=(n, n)).toarray()
    dense = np.empty((n, n))
    dense[np.ix_(new_position, new_position)] = A.toarray()
    assert np.array_equal(permuted, np.tril(dense))
    rows, cols = np.nonzero(np.tril(dense))
    positions = kernels.pattern_positions(indptr, indices, rows, cols)
    assert np.array_equal(data[positions], dense[rows, cols])
    # a sub-pattern's values land on their slots
    piece = sp.csc_matrix(np.tril(dense[:10, :10]) * (rng.random((10, 10)) < 0.5))
    piece.sort_indices()
    out = np.zeros(len(data))
    kernels.add_into_pattern(indptr, indices, 0, piece.indptr, piece.indices, piece.data, out)
    back = sp.csc_matrix((out, indices, indptr), shape=(n, n)).toarray()
    assert np.array_equal(back[:10, :10], piece.toarray())
    assert not back[10:, :].any() and not back[:, 10:].any()


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("seed", range(6))
def test_selected_inverse_in_place_with_a_dense_trailing_block(seed, fraction, monkeypatch):
    """The trailing dense block by dpotri (mostly dense supernodes before it joined,
    or all of L with fraction 0), the supernodes before it by the Takahashi
    recurrences reading it: C⁻¹ on L's pattern, as the dense inverse."""
    from sksparse.cholmod import cholesky

    monkeypatch.setattr(kernels, "DENSE_TAIL_MIN", 4)
    monkeypatch.setattr(kernels, "DENSE_TAIL_FRACTION", fraction)
    rng = np.random.default_rng(seed)
    n = 50
    A = sp.csc_matrix(sparse_with_dense_block(rng, n, 15 + seed, density=0.04, last=True))
    factor = cholesky(A, ordering_method="natural", mode="supernodal")
    L = factor.L().tocsc()
    L.sort_indices()
    perm = factor.P()
    start = kernels.dense_tail_start(L.indptr, L.indices, 1.0)
    assert n - start >= 15  # the dense block is ordered last
    assert kernels.dense_tail_start(L.indptr, L.indices, 0.0) == 0
    counts = np.diff(L.indptr)
    assert np.array_equal(counts[start:], n - np.arange(start, n))  # dense from start on
    assert start == 0 or counts[start - 1] < n - start + 1
    values = L.data.copy()
    kernels.selected_inverse_in_place(L.indptr, L.indices, values)
    inverse = np.linalg.inv(A.toarray()[np.ix_(perm, perm)])
    cols = np.repeat(np.arange(n), np.diff(L.indptr))
    assert np.allclose(values, inverse[L.indices, cols], rtol=1e-10, atol=1e-14)
    # and the same numbers as the column sweep without LAPACK
    plain = kernels.selected_inverse_supernodal(L.indptr.astype(np.int64),
                                                L.indices.astype(np.int64), L.data)
    assert np.allclose(values, plain, rtol=1e-12, atol=1e-15)


def test_a_factor_given_up_for_the_selected_inverse_is_made_again(monkeypatch):
    """A large C's selected inverse converts the factor itself; solves, log|C| and
    new values of θ afterwards are as with the factor kept."""
    from henderson import factor as factor_module

    monkeypatch.setattr(factor_module, "RELEASE_FACTOR_NNZ", 0)
    rng = np.random.default_rng(11)
    n_animals = 40
    K, data = animal_data(rng, n_animals, 15, 120, 8, last=True)
    design = hd.build_design("y ~ x + herd + (1 | animal)", data,
                             relationships={"animal": K}, sparse_fixed=True)
    mme = MixedModelEquations(design)
    assert isinstance(mme.factorization, factor_module.SparseCholesky)
    for theta in (np.array([0.7]), np.array([1.3])):
        mme.factorize(theta)
        C = dense_c(design, theta)
        inverse = np.linalg.inv(C)
        q = design.n_random
        assert np.allclose(mme.inverse_diagonal(), np.diag(inverse)[:q], rtol=1e-10)
        assert mme.factorization._factor is None
        rhs = mme.rhs(theta)
        assert np.allclose(mme.solve(rhs), np.linalg.solve(C, rhs), rtol=1e-10, atol=1e-12)
        assert mme.logdet() == pytest.approx(np.linalg.slogdet(C)[1], rel=1e-12)


@pytest.mark.parametrize("strategy", ["schur", "cholmod"])
def test_values_follow_theta_changed_in_place(strategy):
    """Λ is built once per θ and shared by C's values and the right-hand side: a θ
    array the caller changes in place, and a return to an earlier θ, must still give
    C(θ) and Λ'Z'Wy of the θ passed, as the dense twin computes them."""
    design = hd.build_design("distance ~ age + Sex + (age | Subject)",
                             hd.datasets.load("orthodont"))
    mme = MixedModelEquations(design, strategy=strategy)
    assert mme.ordering == "schur" if strategy == "schur" else mme.ordering != "schur"
    rng = np.random.default_rng(5)
    theta = np.array([1.1, -0.2, 0.3])
    first = theta.copy()
    for step in range(4):
        mme.factorize(theta)
        C = dense_c(design, theta)
        assert np.allclose(full_c(mme), C, rtol=1e-12, atol=1e-12)
        lam = np.kron(np.eye(design.terms[0].n_levels),
                      design.terms[0].relative_factor(theta))
        y = design.y - np.asarray(design.X) @ mme.xp.shift
        dense_rhs = np.concatenate([lam.T @ (design.Z.T @ y), np.asarray(design.X).T @ y])
        rhs = mme.rhs(theta)
        assert np.allclose(rhs, dense_rhs, rtol=1e-12, atol=1e-10)
        assert np.allclose(mme.solve(rhs), np.linalg.solve(C, dense_rhs), rtol=1e-9)
        theta[:] = first if step == 2 else rng.uniform(0.1, 2.0, 3)  # in place


def test_orderings_of_a_large_pattern_are_not_timed(monkeypatch):
    """Past MEASURE_ORDERINGS_ENTRIES the natural ordering is taken without trial
    factorisations (each costs seconds to minutes at that size), and the fit is the
    one the timed choice gives."""
    import henderson.mme as mme_module
    from henderson.simulate import ratings

    data = ratings(20_000, 700, 150, seed=4)
    formula = "y ~ 1 + (1 | user) + (1 | item)"
    design = hd.build_design(formula, data)
    timed = hd.MixedModelEquations(design)
    assert len(timed.ordering_costs) >= 2  # natural, AMD (and METIS) were timed
    monkeypatch.setattr(mme_module, "MEASURE_ORDERINGS_ENTRIES", 1_000)
    untimed = hd.MixedModelEquations(design)
    assert untimed.ordering == "natural" and untimed.ordering_costs == {}
    theta = np.array([0.4, 0.6])
    timed.factorize(theta)
    untimed.factorize(theta)
    assert untimed.logdet() == pytest.approx(timed.logdet(), rel=1e-12)


@pytest.mark.parametrize("release", [False, True], ids=["copy", "release"])
@pytest.mark.parametrize("case", ["animal-sparse-x", "animal-and-pen", "slope-on-animal"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pevs_on_cholmods_supernodes_equal_the_dense_twin(case, seed, release, monkeypatch):
    """The selected inverse written over CHOLMOD's supernodal factor (its own values
    when C is large: ``release``): entries on C's pattern, PEVs and EBVs of a fit at
    known variances equal the dense inverse and solve; a released factor is made
    again for what comes after."""
    from henderson import factor as factor_module

    monkeypatch.setattr(kernels, "DENSE_TAIL_MIN", 3)
    monkeypatch.setattr(factor_module, "RELEASE_FACTOR_NNZ", 0 if release else 10 ** 12)
    rng = np.random.default_rng(seed)
    formula, options, _ = CASES[case]
    K, data = animal_data(rng, 50, 20 + seed, 180, 9, last=True)
    design = hd.build_design(formula, data, relationships={"animal": K}, **options)
    mme = MixedModelEquations(design, mode="supernodal", dense_fixed=False)
    assert isinstance(mme.factorization, factor_module.SparseCholesky)
    theta = design.theta_start() * rng.uniform(0.5, 1.5, design.n_theta) + 0.2
    mme.factorize(theta)
    C = dense_c(design, theta)
    inverse = np.linalg.inv(C)
    selected = mme.selected_inverse()
    assert isinstance(selected, factor_module.SupernodalInverse)
    assert (mme.factorization._factor is None) == release
    rows, cols = np.tril_indices(mme.size)
    in_pattern = np.abs(C[rows, cols]) > 0
    rows, cols = rows[in_pattern], cols[in_pattern]
    assert np.allclose(mme.inverse_entries(selected, rows, cols), inverse[rows, cols],
                       rtol=1e-10, atol=1e-12 * np.abs(inverse).max())
    rhs = mme.rhs(theta)
    assert np.allclose(mme.solve(rhs), np.linalg.solve(C, rhs), rtol=1e-10, atol=1e-12)
    assert np.allclose(mme.fixed_block_inverse(), inverse[design.n_random:, design.n_random:],
                       rtol=1e-10, atol=1e-14)
    # the inverse survives the factor being made again and refactored elsewhere
    mme.factorize(theta * 1.1)
    assert np.allclose(mme.inverse_entries(selected, rows, cols), inverse[rows, cols],
                       rtol=1e-10, atol=1e-12 * np.abs(inverse).max())
