"""Linear algebra the stages share: the one home of every call into CHOLMOD
(scikit-sparse) and the test for linearly dependent (aliased) columns of X'WX.

scikit-sparse 0.4.x (``analyze``, ``Factor.cholesky_inplace``, reads the lower
triangle) builds on SuiteSparse 5; 0.5 renames and reads the upper triangle: keeping
every call here is what lets either be supported.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

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


@dataclass
class Supernodes:
    """A numeric supernodal LL' factor as CHOLMOD stores it: supernode k holds columns
    ``first_column[k]`` .. ``first_column[k + 1]`` of L, its rows are
    ``rows[row_pointer[k]:row_pointer[k + 1]]`` (sorted, its own columns first) and its
    values the column-major block ``values[value_pointer[k]:]`` of that many rows (the
    upper triangle of its diagonal block is not part of L). ``values`` is a view on the
    factor's memory, which ``owner`` keeps alive; the integer arrays are copies."""

    first_column: np.ndarray
    row_pointer: np.ndarray
    value_pointer: np.ndarray
    rows: np.ndarray
    values: np.ndarray
    owner: object


def _cholmod_factor_struct():
    import ctypes

    size_t, pointer, integer = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int

    class CholmodFactor(ctypes.Structure):  # cholmod_core.h of SuiteSparse 4 to 5
        _fields_ = [("n", size_t), ("minor", size_t), ("Perm", pointer),
                    ("ColCount", pointer), ("IPerm", pointer), ("nzmax", size_t),
                    ("p", pointer), ("i", pointer), ("x", pointer), ("z", pointer),
                    ("nz", pointer), ("next", pointer), ("prev", pointer),
                    ("nsuper", size_t), ("ssize", size_t), ("xsize", size_t),
                    ("maxcsize", size_t), ("maxesize", size_t), ("super", pointer),
                    ("pi", pointer), ("px", pointer), ("s", pointer),
                    ("ordering", integer), ("is_ll", integer), ("is_super", integer),
                    ("is_monotonic", integer), ("itype", integer), ("xtype", integer),
                    ("dtype", integer), ("useGPU", integer)]

    return CholmodFactor


def cholmod_supernodes(factor) -> Supernodes | None:
    """The supernodes of a numeric supernodal factor of scikit-sparse 0.4
    (``sksparse.cholmod.Factor``), read in place, or None when they cannot be had
    safely (another scikit-sparse, a simplicial or int64 factor). They are those of
    ``L L' = P A P'`` (``P = factor.P()``).

    scikit-sparse 0.4 gives L only through ``Factor.L()``, which copies the factor
    and converts the copy to a simplicial one: for a dense 20,000² block, two more
    copies of L at once. Its ``Factor`` object is ``PyObject_HEAD``, then its
    ``Common``, then the ``cholmod_factor *``; that layout is checked against what
    the object says about itself (its ``_common``, the address of ``P()``) before
    the pointer is trusted, and the struct against the factor's size and flags.
    """
    import ctypes

    try:
        from sksparse.cholmod import Factor
    except ImportError:  # pragma: no cover - scikit-sparse 0.5
        return None
    if type(factor) is not Factor:
        return None
    try:
        words = (ctypes.c_void_p * 4).from_address(id(factor))
        if words[2] != id(factor._common):
            return None
        permutation = factor.P()
        n = len(permutation)
        struct = _cholmod_factor_struct().from_address(words[3])
        if not (struct.n == n and struct.Perm == permutation.ctypes.data
                and struct.is_super == 1 and struct.is_ll == 1 and struct.itype == 0
                and struct.xtype == 1 and struct.dtype == 0 and struct.minor == n
                and struct.x and struct.nsuper > 0):
            return None

        def view(address, size, ctype):
            return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctype)),
                                         shape=(size,))

        nsuper = struct.nsuper
        first_column = view(struct.super, nsuper + 1, ctypes.c_int).astype(np.int64)
        row_pointer = view(struct.pi, nsuper + 1, ctypes.c_int).astype(np.int64)
        value_pointer = view(struct.px, nsuper + 1, ctypes.c_int).astype(np.int64)
        rows = view(struct.s, struct.ssize, ctypes.c_int).copy()
        values = view(struct.x, struct.xsize, ctypes.c_double)
    except (AttributeError, TypeError, ValueError, OverflowError):  # pragma: no cover
        return None
    widths = np.diff(first_column)
    heights = np.diff(row_pointer)
    if not (first_column[0] == 0 and first_column[-1] == n and np.all(widths > 0)
            and np.all(heights >= widths) and row_pointer[-1] <= len(rows)
            and value_pointer[0] == 0
            and np.array_equal(np.diff(value_pointer), widths * heights)
            and value_pointer[-1] <= len(values)):
        return None
    # rows sorted within each supernode, its own columns first
    step = np.diff(rows[:row_pointer[-1]])
    inside = np.ones(len(step), dtype=bool)
    inside[row_pointer[1:-1] - 1] = False
    own = np.repeat(row_pointer[:-1] - first_column[:-1], widths) + np.arange(n)
    if not (np.all(step[inside] > 0) and np.array_equal(rows[own], np.arange(n))):
        return None
    return Supernodes(first_column, row_pointer, value_pointer, rows, values, factor)


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
