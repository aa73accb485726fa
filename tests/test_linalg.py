"""linalg.py: CHOLMOD's supernodes read in place."""
import numpy as np
import pytest
import scipy.sparse as sp

from henderson.linalg import cholmod_supernodes


def _spd(rng, n):
    A = sp.random(n, n, density=0.06, random_state=rng).toarray()
    A = A + A.T
    A[-12:, -12:] += 1.0  # a dense trailing block: one wide supernode
    return sp.csc_matrix(A + np.diag(np.abs(A).sum(axis=1) + 1.0))


@pytest.mark.parametrize("ordering", ["natural", "amd"])
@pytest.mark.parametrize("seed", range(4))
def test_cholmod_supernodes_hold_the_factor_l(seed, ordering):
    """Each supernode's columns, rows and values are L's (``factor.L()``) exactly; the
    values are the factor's own memory."""
    from sksparse.cholmod import cholesky

    rng = np.random.default_rng(seed)
    A = _spd(rng, 60)
    factor = cholesky(A, ordering_method=ordering, mode="supernodal")
    nodes = cholmod_supernodes(factor)
    assert nodes is not None and nodes.owner is factor
    L = factor.L().toarray()
    rebuilt = np.zeros_like(L)
    for k in range(len(nodes.first_column) - 1):
        first, stop = nodes.first_column[k], nodes.first_column[k + 1]
        rows = nodes.rows[nodes.row_pointer[k]:nodes.row_pointer[k + 1]]
        height = len(rows)
        block = nodes.values[nodes.value_pointer[k]:nodes.value_pointer[k] + height
                             * (stop - first)].reshape((height, stop - first), order="F")
        for c in range(stop - first):
            rebuilt[rows[c:], first + c] = block[c:, c]
    assert np.array_equal(rebuilt, L)
    assert np.shares_memory(nodes.values, cholmod_supernodes(factor).values)


def test_cholmod_supernodes_are_none_where_they_cannot_be_read():
    from sksparse.cholmod import analyze, cholesky

    rng = np.random.default_rng(0)
    A = _spd(rng, 30)
    assert cholmod_supernodes(cholesky(A, mode="simplicial")) is None
    assert cholmod_supernodes(analyze(A, mode="supernodal")) is None  # no numbers yet
    assert cholmod_supernodes(object()) is None
