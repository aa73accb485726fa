"""Linear algebra the stages share: the one home of every call into CHOLMOD
(scikit-sparse) and the test for linearly dependent (aliased) columns of X'WX.

scikit-sparse 0.4.x (``analyze``, ``Factor.cholesky_inplace``, reads the lower
triangle) builds on SuiteSparse 5; 0.5 renames and reads the upper triangle: keeping
every call here is what lets either be supported.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

def _cholmod():
    from sksparse import cholmod

    return cholmod


def cholmod_analyze(matrix: sp.csc_matrix, ordering: str = "natural", mode: str = "auto"):
    """Symbolic analysis of a symmetric matrix given by its lower triangle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _cholmod().analyze(matrix, mode=mode, ordering_method=ordering)


def cholmod_refactor(factor, matrix: sp.csc_matrix) -> None:
    """Numeric factorisation into an existing symbolic factor (same pattern)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factor.cholesky_inplace(matrix)


def cholmod_lower_factor(factor, in_place: bool = False) -> sp.csc_matrix:
    """``L`` with ``L L' = P C P'`` as CSC, from a copy: converting a supernodal
    factor in place would make later refactorisations simplicial. ``in_place=True``
    converts the factor itself (one copy of L fewer: 3.2 GB for a dense 20,000²
    block), which the caller must then give up."""
    lower = (factor if in_place else factor.copy()).L().tocsc()
    if not lower.has_sorted_indices:
        lower.sort_indices()
    return lower


def cholmod_permutation(factor) -> np.ndarray:
    return np.asarray(factor.P(), dtype=np.int64)


class NotPositiveDefiniteError(np.linalg.LinAlgError):
    pass



def independent_columns(gram, tol: float = 1e-7, block: int = 256) -> list[int]:
    """Columns to keep of a Gram matrix X'WX (dense or sparse): a column goes when its
    squared residual on the kept earlier columns (a Schur complement of X'WX) is below
    ``tol²`` times its squared norm, so that of two aliased columns the later goes, as
    R's ``qr()``.

    A sparse X'WX is first factored by CHOLMOD (fill-reducing order): with every pivot
    healthy it has full rank and all columns are kept at once. Otherwise (and for a
    dense one) a Cholesky factor of the kept columns grows block by block (BLAS-3 for
    the blocks, the greedy choice inside each): O(p³/3) flops in all.
    """
    from .errors import DataError

    if sp.issparse(gram):
        gram = sp.csc_matrix(gram, dtype=np.float64)
        if _full_rank_sparse(gram, tol):
            return list(range(gram.shape[0]))
        if gram.shape[0] > DENSE_ALIASING_LIMIT:
            raise DataError(
                f"the {gram.shape[0]} fixed-effect columns are linearly dependent "
                "(aliased), too many to find which to drop; remove nested or redundant "
                "fixed factors")
        gram = gram.toarray()
    import scipy.linalg

    gram = np.asarray(gram, dtype=np.float64)
    p = gram.shape[0]
    kept: list[int] = []
    factor = np.zeros((p, p))  # the kept columns' lower Cholesky factor, grown in place
    for start in range(0, p, block):
        cols = np.arange(start, min(start + block, p))
        k = len(kept)
        cross = scipy.linalg.solve_triangular(factor[:k, :k], gram[np.ix_(kept, cols)],
                                              lower=True) if k else np.zeros((0, len(cols)))
        schur = gram[np.ix_(cols, cols)] - cross.T @ cross
        local: list[int] = []
        local_factor = np.zeros((len(cols), len(cols)))
        for a, j in enumerate(cols):
            norm2 = gram[j, j]
            if not norm2 > 0:
                continue
            m = len(local)
            row = scipy.linalg.solve_triangular(local_factor[:m, :m], schur[local, a],
                                                lower=True) if m else np.zeros(0)
            residual2 = schur[a, a] - float(row @ row)
            if residual2 > tol * tol * norm2:
                local_factor[m, :m] = row
                local_factor[m, m] = np.sqrt(residual2)
                local.append(a)
        m = len(local)
        factor[k:k + m, :k] = cross[:, local].T
        factor[k:k + m, k:k + m] = local_factor[:m, :m]
        kept.extend(int(c) for c in cols[local])
    return kept


#: above this many fixed-effect columns aliasing is detected but not resolved (the
#: search for the columns to drop is dense: 8 p² bytes)
DENSE_ALIASING_LIMIT = 8000


def _full_rank_sparse(gram: sp.csc_matrix, tol: float) -> bool:
    """Whether CHOLMOD factors X'WX with every squared pivot above ``tol²`` times its
    diagonal entry (full rank, whatever the order of the columns)."""
    diagonal = gram.diagonal()
    if np.any(diagonal <= 0):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factor = _cholmod().cholesky(gram, ordering_method="amd")
            pivots = factor.L().diagonal() ** 2
    except Exception:  # not positive definite
        return False
    return bool(np.all(pivots > tol * tol * diagonal[cholmod_permutation(factor)]))
