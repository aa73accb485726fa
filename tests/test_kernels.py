"""Numba kernels against plain NumPy twins on random small inputs."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from henderson import kernels


def random_spd_sparse(rng, n, density):
    A = sp.random(n, n, density=density, random_state=rng, format="csc")
    A = A + A.T + sp.identity(n) * (n * 1.0)
    return A.tocsc()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.floats(0.02, 0.4))
def test_selected_inverse_matches_dense_inverse(seed, n, density):
    from sksparse.cholmod import cholesky

    rng = np.random.default_rng(seed)
    A = random_spd_sparse(rng, n, density)
    factor = cholesky(A, ordering_method="natural", mode="simplicial")
    L = factor.L().tocsc()
    L.sort_indices()
    indptr, indices = L.indptr.astype(np.int64), L.indices.astype(np.int64)
    dense_inverse = np.linalg.inv(A.toarray())
    rows = L.indices
    cols = np.repeat(np.arange(n), np.diff(L.indptr))
    for kernel in (kernels.selected_inverse, kernels.selected_inverse_supernodal):
        values = kernel(indptr, indices, L.data)
        assert np.allclose(values, dense_inverse[rows, cols], rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(30, 120))
def test_supernodal_selected_inverse_on_supernodal_factors(seed, n):
    """CHOLMOD's supernodal factors come back with wide relaxed supernodes (explicit
    zeros kept): the supernodal kernel must still equal the dense inverse there."""
    from sksparse.cholmod import cholesky

    rng = np.random.default_rng(seed)
    A = random_spd_sparse(rng, n, 0.08)
    factor = cholesky(A, ordering_method="amd", mode="supernodal")
    L = factor.L().tocsc()  # L L' = P A P'
    L.sort_indices()
    perm = factor.P()
    indptr, indices = L.indptr.astype(np.int64), L.indices.astype(np.int64)
    starts = kernels.fundamental_supernodes(indptr, indices)
    values = kernels.selected_inverse_supernodal(indptr, indices, L.data)
    dense_inverse = np.linalg.inv(A.toarray()[np.ix_(perm, perm)])
    cols = np.repeat(np.arange(n), np.diff(L.indptr))
    assert np.allclose(values, dense_inverse[L.indices, cols], rtol=1e-9, atol=1e-12)
    assert len(starts) - 1 < n  # some supernodes are wider than one column


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 3))
def test_crossproduct_kernels_match_dense(seed, ka, kb):
    rng = np.random.default_rng(seed)
    n, la, lb = 60, 5, 4
    ca, cb = rng.integers(0, la, n), rng.integers(0, lb, n)
    za, zb, w = rng.normal(size=(n, ka)), rng.normal(size=(n, kb)), rng.uniform(0.5, 2, n)
    dense = rng.normal(size=(n, 3))

    def zmat(codes, z, levels):
        out = np.zeros((n, levels * z.shape[1]))
        for i in range(n):
            out[i, codes[i] * z.shape[1]:(codes[i] + 1) * z.shape[1]] = z[i]
        return out

    Za, Zb, W = zmat(ca, za, la), zmat(cb, zb, lb), np.diag(w)
    diag = kernels.grouped_crossprod(ca, za, za, w, la)
    full = Za.T @ W @ Za
    for lev in range(la):
        s = slice(lev * ka, (lev + 1) * ka)
        assert np.allclose(diag[lev], full[s, s])
    keys, pair = np.unique(ca * lb + cb, return_inverse=True)
    blocks = kernels.grouped_crossprod(pair.astype(np.int64), za, zb, w, len(keys))
    cross = Za.T @ W @ Zb
    for p, key in enumerate(keys):
        i, j = divmod(key, lb)
        assert np.allclose(blocks[p], cross[i * ka:(i + 1) * ka, j * kb:(j + 1) * kb])
    zx = kernels.grouped_crossprod(ca, za, dense, w, la)
    assert np.allclose(zx.reshape(la * ka, 3), Za.T @ W @ dense)
    by_columns = kernels.grouped_crossprod_columns(ca, za, np.ascontiguousarray(dense.T), w, la)
    assert np.allclose(by_columns.reshape(la * ka, 3), Za.T @ W @ dense)


def test_scatter_blocks_applies_lambda_on_both_sides():
    rng = np.random.default_rng(1)
    lam_a = np.tril(rng.normal(size=(2, 2)))
    lam_b = np.tril(rng.normal(size=(3, 3)))
    blocks = rng.normal(size=(4, 2, 3))
    positions = np.arange(24).reshape(4, 2, 3)
    positions[1, 0, 2] = -1
    data = np.zeros(24)
    kernels.scatter_blocks(lam_a, blocks, lam_b, positions, data)
    expected = np.einsum("ca,pcd,db->pab", lam_a, blocks, lam_b).ravel()
    expected[positions.ravel() == -1] = 0
    mask = positions.ravel() >= 0
    assert np.allclose(data[positions.ravel()[mask]], expected[mask])
    assert data[8] == 0.0  # the slot of the masked entry (1, 0, 2) is untouched


def test_add_rows_equals_numpy_add_at():
    from henderson.kernels import add_rows

    rng = np.random.default_rng(3)
    index = rng.integers(0, 7, 500)
    values = rng.normal(size=(500, 3))
    expected = np.zeros((7, 3))
    np.add.at(expected, index, values)
    out = np.zeros((7, 3))
    add_rows(out, index, values)
    np.testing.assert_allclose(out, expected, rtol=1e-13)


# ------------------------------------------------------------------ genotype blocks
def _genotype_block(seed, n=37, k=11):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(n, k)).astype(np.float32)
    counts[rng.random((n, k)) < 0.15] = np.nan
    counts[:, 0] = np.nan            # a variant never observed
    counts[:, 1] = 1.0               # and one without variation
    return np.asfortranarray(counts)


@pytest.mark.parametrize("seed", range(3))
def test_genotype_moments_equal_numpy(seed):
    counts = _genotype_block(seed)
    observed, mean, variance = kernels.genotype_moments(counts)
    assert np.array_equal(observed, (~np.isnan(counts)).sum(axis=0))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected_mean = np.nanmean(counts.astype(np.float64), axis=0)
        expected_var = np.nanvar(counts.astype(np.float64), axis=0)
    assert np.allclose(mean[1:], expected_mean[1:], atol=1e-12)
    assert np.allclose(variance[1:], expected_var[1:], atol=1e-12)
    assert mean[0] == 0 and variance[0] == 0
    # the same block as int8 codes (-1 missing), as the sparse GRM reads it
    codes = np.asfortranarray(np.where(np.isnan(counts), -1, counts).astype(np.int8))
    for ours, theirs in zip(kernels.genotype_moments(codes), (observed, mean, variance)):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("centre", [True, False])
def test_centred_genotypes_equal_numpy(centre):
    counts = _genotype_block(7)
    _, mean, variance = kernels.genotype_moments(counts)
    scale = np.where(variance > 0, 1 / np.sqrt(np.where(variance > 0, variance, 1)), 1.0)
    out = kernels.centred_genotypes(counts, mean, scale, centre)
    filled = np.where(np.isnan(counts), mean, counts)
    expected = (filled - mean) * scale if centre else filled
    assert out.dtype == np.float32 and out.flags["F_CONTIGUOUS"]
    assert np.allclose(out, expected, atol=1e-6)
    rows = np.random.default_rng(1).normal(size=counts.shape[1])
    complete = np.nan_to_num(counts)
    assert np.allclose(kernels.weighted_row_sums(complete, rows), complete @ rows, atol=1e-10)


@pytest.mark.parametrize("workspace_bytes", [1 << 28, 64])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("seed", range(8))
def test_selected_inverse_on_cholmods_supernodes_equals_the_dense_inverse(
        seed, fraction, workspace_bytes, monkeypatch):
    """The inverse written over CHOLMOD's supernodal storage: the dense last
    supernode by dpotri in place, the supernodes with many of its columns among their
    rows by dsymm on it (all of them with fraction 0), Z_RR whole or in row panels
    (64 bytes: panels of one row); on L's pattern it is the dense inverse."""
    from sksparse.cholmod import cholesky

    from henderson.linalg import cholmod_supernodes

    monkeypatch.setattr(kernels, "DENSE_TAIL_MIN", 4)
    monkeypatch.setattr(kernels, "DENSE_TAIL_FRACTION", fraction)
    monkeypatch.setattr(kernels, "SUPERNODE_WORKSPACE_BYTES", workspace_bytes)
    rng = np.random.default_rng(seed)
    n, n_block = 90, 20 + 2 * seed
    A = random_spd_sparse(rng, n, 0.03).toarray()
    B = rng.normal(size=(n_block, n_block + 2))
    block = np.arange(n - n_block, n)  # dense and last, as genotyped animals in H⁻¹
    A[np.ix_(block, block)] += B @ B.T
    A = sp.csc_matrix(A)
    ordering = "natural" if seed % 2 else "amd"
    factor = cholesky(A, ordering_method=ordering, mode="supernodal")
    nodes = cholmod_supernodes(factor)
    assert nodes is not None
    L = factor.L().tocoo()  # L L' = P A P'
    perm = factor.P()
    column_node = kernels.supernodal_selected_inverse_in_place(nodes)
    dense_inverse = np.linalg.inv(A.toarray()[np.ix_(perm, perm)])
    values = kernels.supernodal_lookup_symmetric(
        nodes.first_column, nodes.row_pointer, nodes.value_pointer, nodes.rows,
        column_node, nodes.values, L.row.astype(np.int64), L.col.astype(np.int64))
    assert np.allclose(values, dense_inverse[L.row, L.col], rtol=1e-10,
                       atol=1e-13 * np.abs(dense_inverse).max())
    # an entry outside L's pattern is refused, not read from another column
    outside = np.argwhere(np.tril(factor.L().toarray() == 0))
    if len(outside):
        with pytest.raises(ValueError):
            kernels.supernodal_lookup_symmetric(
                nodes.first_column, nodes.row_pointer, nodes.value_pointer, nodes.rows,
                column_node, nodes.values, outside[:1, 0], outside[:1, 1])


@pytest.mark.parametrize("seed", range(4))
def test_supernodal_gather_equals_the_dense_submatrix(seed):
    from sksparse.cholmod import cholesky

    from henderson.linalg import cholmod_supernodes

    rng = np.random.default_rng(seed)
    n = 40
    A = random_spd_sparse(rng, n, 0.05).toarray()
    A[-25:, -25:] += np.eye(25) + 0.1  # a dense trailing block
    factor = cholesky(sp.csc_matrix(A), ordering_method="natural", mode="supernodal")
    nodes = cholmod_supernodes(factor)
    column_node = np.repeat(np.arange(len(nodes.first_column) - 1),
                            np.diff(nodes.first_column))
    L = factor.L().toarray()
    left = np.sort(rng.choice(np.arange(15, n), 6, replace=False))
    right = np.sort(rng.choice(np.arange(15, n), 9, replace=False))
    out = kernels.supernodal_gather(nodes.first_column, nodes.row_pointer,
                                    nodes.value_pointer, nodes.rows, column_node,
                                    nodes.values, left, right)
    symmetric = np.tril(L) + np.tril(L, -1).T  # L's values, read as a symmetric matrix
    assert np.array_equal(out, symmetric[np.ix_(left, right)])
