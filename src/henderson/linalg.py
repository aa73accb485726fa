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


# ------------------------------------------------------------- LAPACK without the GIL
_LAPACK_ROUTINES: dict = {}


def _lapack_routine(name: str):
    """SciPy's own LAPACK routine ``name`` (from ``scipy.linalg.cython_lapack``) as a
    ctypes function: a ctypes call releases the GIL, which SciPy's f2py wrappers
    (``scipy.linalg.lapack``) hold for the whole call. None when it cannot be had."""
    if name not in _LAPACK_ROUTINES:
        routine = None
        try:
            import ctypes

            import scipy.linalg.cython_lapack as cython_lapack

            capsule = cython_lapack.__pyx_capi__[name]
            api = ctypes.pythonapi
            api.PyCapsule_GetName.restype = ctypes.c_char_p
            api.PyCapsule_GetName.argtypes = [ctypes.py_object]
            api.PyCapsule_GetPointer.restype = ctypes.c_void_p
            api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
            address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
            routine = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 10))(address)
        except (ImportError, KeyError, AttributeError, ValueError):  # pragma: no cover
            routine = None
        _LAPACK_ROUTINES[name] = routine
    return _LAPACK_ROUTINES[name]


def tridiagonal_reduction(matrix: np.ndarray):
    """LAPACK ``dsytrd`` of a symmetric matrix (its lower triangle): ``K = Q T Q'``.

    Returns ``(reflectors, diagonal, offdiagonal, tau)`` as
    ``scipy.linalg.lapack.dsytrd(K, lower=1)`` does (``reflectors`` in Fortran order,
    holding the Householder vectors below its first subdiagonal), bit for bit. The call
    releases the GIL, so that two reductions run side by side on two Python threads
    (each on one BLAS thread: the reduction is half matrix-vector products, which one
    thread per core runs best; see :func:`henderson.threads.dense_blas_threads`).

    Examples
    --------
    >>> import numpy as np
    >>> from henderson.linalg import tridiagonal_reduction
    >>> K = np.array([[2.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]])
    >>> _, diagonal, offdiagonal, _ = tridiagonal_reduction(K)
    >>> T = np.diag(diagonal) + np.diag(offdiagonal, 1) + np.diag(offdiagonal, -1)
    >>> bool(np.allclose(np.linalg.eigvalsh(T), np.linalg.eigvalsh(K)))
    True
    """
    import ctypes

    import scipy.linalg

    n = len(matrix)
    routine = _lapack_routine("dsytrd")
    if routine is None or n < 2:  # pragma: no cover - SciPy without cython_lapack
        lwork = int(scipy.linalg.lapack.dsytrd_lwork(n, lower=1)[0])
        reflectors, diagonal, offdiagonal, tau, info = scipy.linalg.lapack.dsytrd(
            matrix, lower=1, lwork=max(lwork, 1))
        if info != 0:
            raise np.linalg.LinAlgError(f"dsytrd failed (info {info})")
        return np.asfortranarray(reflectors), diagonal, offdiagonal, tau
    reflectors = np.array(matrix, dtype=np.float64, order="F")
    diagonal, offdiagonal, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
    order, info = ctypes.c_int(n), ctypes.c_int(0)
    query, size = np.empty(1), ctypes.c_int(-1)

    def call(work, size):
        routine(b"L", ctypes.byref(order), reflectors.ctypes.data, ctypes.byref(order),
                diagonal.ctypes.data, offdiagonal.ctypes.data, tau.ctypes.data,
                work.ctypes.data, ctypes.byref(size), ctypes.byref(info))

    call(query, size)
    work = np.empty(max(int(query[0]), 1))
    call(work, ctypes.c_int(len(work)))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"dsytrd failed (info {info.value})")
    return reflectors, diagonal, offdiagonal, tau



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
