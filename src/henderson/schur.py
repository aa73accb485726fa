"""The MME by block elimination of the largest grouping factor (no CHOLMOD).

When the first (largest) random term has an identity level covariance, its block of
C is block diagonal (one k x k block ``A_l`` per level). Eliminating it leaves the
Schur complement ``S = D − B A⁻¹ B'`` on everything else (the other terms and the
fixed effects), which is small and dense for crossed designs (InstEval: 1,156 x 1,156;
a million rows with 1,000 levels of the second factor: 1,002 x 1,002). Per θ this
costs one pass over the level blocks and one LAPACK Cholesky of S, far less than a
sparse factorisation with hundreds of thousands of tiny supernodes. MixedModels.jl's
blocked factor takes the same route.

``log|C| = Σ log|A_l| + log|S|``; with the fixed effects last in S, the leading block
of chol(S) gives ``log|C_zz|``. The selected inverse is
``Z_DD = S⁻¹``, ``Z_{R_l,l} = −S⁻¹[R_l,R_l] V_l``, ``Z_ll = A_l⁻¹ + V_l' S⁻¹[R_l,R_l] V_l``
with ``V_l = B_l A_l⁻¹`` and ``R_l`` the rows of B in level l's columns.
"""
from __future__ import annotations

import copy

import numba
import numpy as np
import scipy.linalg
import scipy.sparse as sp

from .kernels import _find_row
from .linalg import NotPositiveDefiniteError
from .threads import active_threads, blas_threads, dense_blas_threads

_POTRS = scipy.linalg.lapack.dpotrs

#: the trailing dense block may have at most this many rows (8·m² bytes, m³/3 flops)
SCHUR_LIMIT = 3000

_NJIT = dict(nogil=True, cache=True)

#: below this order of S, its Cholesky and inverse run on one BLAS thread in a fit
#: whose own kernels run in two threads (:func:`_schur_blas`)
SCHUR_SHARED_BLAS_FROM = 1500


@numba.njit(**_NJIT)
def _factor_levels(data, a_take, b_ptr, b_take, k, chol, W):
    """Cholesky of each level block A_l (into ``chol``) and ``W_l = B_l L_l⁻ᵀ`` (into
    ``W``). Returns Σ log|A_l| (NaN if an A_l is not positive definite)."""
    logdet = 0.0
    A = np.empty((k, k))
    for lev in range(a_take.shape[0]):
        for a in range(k):
            for b in range(a + 1):
                A[a, b] = data[a_take[lev, a, b]]
        for j in range(k):
            s = A[j, j]
            for c in range(j):
                s -= chol[lev, j, c] * chol[lev, j, c]
            if s <= 0.0:
                return np.nan
            d = np.sqrt(s)
            chol[lev, j, j] = d
            logdet += 2.0 * np.log(d)
            for i in range(j + 1, k):
                s = A[i, j]
                for c in range(j):
                    s -= chol[lev, i, c] * chol[lev, j, c]
                chol[lev, i, j] = s / d
        for e in range(b_ptr[lev], b_ptr[lev + 1]):  # W row = B row solved against L'
            for a in range(k):
                s = data[b_take[e, a]]
                for c in range(a):
                    s -= W[e, c] * chol[lev, a, c]
                W[e, a] = s / chol[lev, a, a]
    return logdet


@numba.njit(**_NJIT)
def _start_schur(data, d_take, d_rows, d_cols, U):
    """U = D' on its upper triangle: S before the levels are eliminated."""
    m = U.shape[0]
    for j in range(m):
        for i in range(j, m):
            U[j, i] = 0.0
    for e in range(len(d_take)):
        U[d_cols[e], d_rows[e]] += data[d_take[e]]


@numba.njit(**_NJIT)
def _update_schur(b_ptr, b_rows, W, k, U, row_lo, row_hi):
    """``S -= Σ_l W_l W_l'`` on the rows ``row_lo .. row_hi-1`` of U = S' (upper
    triangle, row-major: the lower triangle of S column-major, LAPACK's layout).

    For a row j of B, its updates ``U[j, i >= j]`` run along one row of U, and the
    fixed-effect columns (last in S) are contiguous there. Two threads each take a
    range of rows (no copy of S, no conflicting writes): Python threads on a nogil
    kernel, not an OpenMP region, whose idle threads kept spinning and slowed the
    LAPACK Cholesky that follows (0.09 -> 0.27 s)."""
    for lev in range(len(b_ptr) - 1):
        start, stop = b_ptr[lev], b_ptr[lev + 1]
        first = start
        while first < stop and b_rows[first] < row_lo:
            first += 1
        if k == 1:  # one coefficient: a scalar loop numba compiles tightly (25 -> 10 ms)
            for f in range(first, stop):
                j = b_rows[f]
                if j >= row_hi:
                    break
                row = U[j]
                wf = W[f, 0]
                for e in range(f, stop):
                    row[b_rows[e]] -= W[e, 0] * wf
            continue
        for f in range(first, stop):
            j = b_rows[f]
            if j >= row_hi:
                break
            row = U[j]
            for e in range(f, stop):
                s = 0.0
                for a in range(k):
                    s += W[e, a] * W[f, a]
                row[b_rows[e]] -= s


def _split_by_work(work: np.ndarray) -> int:
    """The index that splits ``work`` (per row or per level) into two equal halves."""
    total = np.cumsum(work, dtype=np.float64)
    return int(np.searchsorted(total, total[-1] / 2.0)) if len(total) else 0


_POOL = None


def _in_two_threads(first, second):
    """Run ``first()`` on a worker thread and ``second()`` here; both results. Only
    called when the fit may use two threads (:func:`henderson.threads.active_threads`);
    the halves are Numba kernels without BLAS calls, so BLAS's threads are idle
    meanwhile."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="henderson")
    future = _POOL.submit(first)
    other = second()
    return future.result(), other


#: from this many multiply-adds in a pass over the levels, two threads share it
THREADED_WORK = 200_000


@numba.njit(**_NJIT)
def _forward(chol, W, b_ptr, b_rows, r1, r2):
    n_levels, k, _ = chol.shape
    y1 = np.empty_like(r1)
    out = r2.copy()
    for lev in range(n_levels):
        for a in range(k):
            s = r1[lev, a]
            for c in range(a):
                s -= chol[lev, a, c] * y1[lev, c]
            y1[lev, a] = s / chol[lev, a, a]
        for e in range(b_ptr[lev], b_ptr[lev + 1]):
            for a in range(k):
                out[b_rows[e]] -= W[e, a] * y1[lev, a]
    return y1, out


@numba.njit(**_NJIT)
def _backward(chol, W, b_ptr, b_rows, y1, x2):
    n_levels, k, _ = chol.shape
    x1 = np.empty_like(y1)
    t = np.empty(k)
    for lev in range(n_levels):
        for a in range(k):
            t[a] = y1[lev, a]
        for e in range(b_ptr[lev], b_ptr[lev + 1]):
            for a in range(k):
                t[a] -= W[e, a] * x2[b_rows[e]]
        for a in range(k - 1, -1, -1):
            s = t[a]
            for c in range(a + 1, k):
                s -= chol[lev, c, a] * x1[lev, c]
            x1[lev, a] = s / chol[lev, a, a]
    return x1


@numba.njit(**_NJIT)
def _level_buffers(b_ptr, k):
    """Work arrays for :func:`_level_rows`, sized for the level with most B rows:
    ``L_l⁻¹`` (k x k), ``V`` and the rows and slots kept."""
    widest = 0
    for lev in range(len(b_ptr) - 1):
        widest = max(widest, b_ptr[lev + 1] - b_ptr[lev])
    return (np.zeros((k, k)), np.empty((widest, k)), np.empty(widest, dtype=np.int64),
            np.empty(widest, dtype=np.int64))


@numba.njit(**_NJIT)
def _level_rows(chol, lev, W, b_ptr, b_rows, limit, Linv, V, rows, slots):
    """For level ``lev``: ``Linv = L_l⁻¹`` (forward substitution on the k x k factor)
    and, for its B rows before ``limit``, their rows, slots and ``V = W_l L_l⁻¹ =
    B_l A_l⁻¹``. Returns how many rows were kept."""
    k = chol.shape[1]
    for j in range(k):
        for i in range(k):
            if i < j:
                Linv[i, j] = 0.0
            elif i == j:
                Linv[i, j] = 1.0 / chol[lev, i, i]
            else:
                s = 0.0
                for c in range(j, i):
                    s -= chol[lev, i, c] * Linv[c, j]
                Linv[i, j] = s / chol[lev, i, i]
    c = 0
    for e in range(b_ptr[lev], b_ptr[lev + 1]):
        if b_rows[e] < limit:
            rows[c] = b_rows[e]
            slots[c] = e
            for a in range(k):
                s = 0.0
                for d in range(a, k):
                    s += W[e, d] * Linv[d, a]
                V[c, a] = s
            c += 1
    return c


@numba.njit(**_NJIT)
def _level_inverses(chol, W, b_ptr, b_rows, s_inverse, limit):
    """Z_ll (n_levels, k, k) and Z_{R_l,l} (rows of B, k) from S⁻¹; B rows at or
    beyond ``limit`` (fixed effects, for C_zz⁻¹) are left out. S⁻¹[R_l, R_l] is read
    once per pair (it is symmetric): the reads are what costs (0.32 -> 0.25 s at a
    million rows). Serial on purpose: a parallel version (prange over level ranges)
    left OpenMP threads spinning that slowed the next factorisation more (0.09 ->
    0.27 s) than it saved."""
    n_levels, k, _ = chol.shape
    diag = np.zeros((n_levels, k, k))
    cross = np.zeros((len(b_rows), k))
    Linv, V, rows, slots = _level_buffers(b_ptr, k)
    SV = np.empty_like(V)
    for lev in range(n_levels):
        c = _level_rows(chol, lev, W, b_ptr, b_rows, limit, Linv, V, rows, slots)
        for i in range(c):
            for a in range(k):
                SV[i, a] = 0.0
        for i in range(c):
            row = rows[i]
            for j in range(i):
                sij = s_inverse[row, rows[j]]
                for a in range(k):
                    SV[i, a] += sij * V[j, a]
                    SV[j, a] += sij * V[i, a]
            sii = s_inverse[row, row]
            for a in range(k):
                SV[i, a] += sii * V[i, a]
        for a in range(k):
            for b in range(k):
                s = 0.0
                for d in range(max(a, b), k):   # (L⁻¹)'L⁻¹
                    s += Linv[d, a] * Linv[d, b]
                for i in range(c):
                    s += V[i, a] * SV[i, b]
                diag[lev, a, b] = s
        for i in range(c):
            for a in range(k):
                cross[slots[i], a] = -SV[i, a]
    return diag, cross


@numba.njit(**_NJIT)
def _symmetrize_upper(T):
    """Copy the upper triangle of T onto its lower triangle, in place."""
    m = T.shape[0]
    for i in range(m):
        for j in range(i):
            T[i, j] = T[j, i]


@numba.njit(**_NJIT)
def _scalar_level_inverses(chol, W, b_ptr, b_rows, upper_inverse, limit):
    """:func:`_level_inverse_blocks` of a one-coefficient first term, shape (n_levels,):
    ``(1 + w_l' S⁻¹[R_l,R_l] w_l) / a_l`` with ``w_l = B_l / √a_l`` (W). A scalar loop
    along one row of the upper triangle per B row (InstEval, 53 B rows a level: 17 ->
    10 ms)."""
    n_levels = chol.shape[0]
    out = np.empty(n_levels)
    for lev in range(n_levels):
        stop = b_ptr[lev + 1]
        s = 0.0
        for f in range(b_ptr[lev], stop):
            i = b_rows[f]
            if i >= limit:
                break
            row = upper_inverse[i]
            wf = W[f, 0]
            t = 0.5 * row[i] * wf
            for e in range(f + 1, stop):
                j = b_rows[e]
                if j >= limit:
                    break
                t += row[j] * W[e, 0]
            s += wf * t
        inverse = 1.0 / chol[lev, 0, 0]
        out[lev] = inverse * inverse * (1.0 + 2.0 * s)
    return out


@numba.njit(**_NJIT)
def _level_inverse_diagonals(chol, W, b_ptr, b_rows, upper_inverse, limit):
    """The diagonals of the Z_ll blocks, ``diag(A_l⁻¹ + V_l' S⁻¹[R_l,R_l] V_l)``, with
    S⁻¹ given by its upper triangle (row-major; B rows ascend within a level, so
    ``upper_inverse[R_i, R_j]`` for i <= j runs along one row). B rows at or beyond
    ``limit`` are left out (C_zz⁻¹)."""
    n_levels, k, _ = chol.shape
    if k == 1:
        return _scalar_level_inverses(chol, W, b_ptr, b_rows, upper_inverse,
                                      limit).reshape(n_levels, 1)
    out = np.zeros((n_levels, k))
    Linv, V, rows, slots = _level_buffers(b_ptr, k)
    for lev in range(n_levels):
        c = _level_rows(chol, lev, W, b_ptr, b_rows, limit, Linv, V, rows, slots)
        for a in range(k):
            s = 0.0
            for d in range(a, k):
                s += Linv[d, a] * Linv[d, a]
            for i in range(c):
                row = upper_inverse[rows[i]]
                vi = V[i, a]
                t = 0.5 * row[rows[i]] * vi
                for j in range(i + 1, c):
                    t += row[rows[j]] * V[j, a]
                s += 2.0 * vi * t
            out[lev, a] = s
    return out


@numba.njit(**_NJIT)
def _level_inverse_blocks(chol, W, b_ptr, b_rows, upper_inverse, limit):
    """The Z_ll blocks themselves (n_levels, k, k), ``A_l⁻¹ + V_l' S⁻¹[R_l,R_l] V_l``,
    with S⁻¹ given by its upper triangle (row-major, as for
    :func:`_level_inverse_diagonals`); B rows at or beyond ``limit`` are left out
    (C_zz⁻¹). All that the interior gradient of a vector-valued term needs."""
    n_levels, k, _ = chol.shape
    if k == 1:
        return _scalar_level_inverses(chol, W, b_ptr, b_rows, upper_inverse,
                                      limit).reshape(n_levels, 1, 1)
    out = np.zeros((n_levels, k, k))
    Linv, V, rows, slots = _level_buffers(b_ptr, k)
    SV = np.empty_like(V)
    for lev in range(n_levels):
        c = _level_rows(chol, lev, W, b_ptr, b_rows, limit, Linv, V, rows, slots)
        for i in range(c):
            row = upper_inverse[rows[i]]
            sii = row[rows[i]]
            for a in range(k):
                SV[i, a] = sii * V[i, a]
        for i in range(c):
            row = upper_inverse[rows[i]]
            for j in range(i + 1, c):
                sij = row[rows[j]]
                for a in range(k):
                    SV[i, a] += sij * V[j, a]
                    SV[j, a] += sij * V[i, a]
        for a in range(k):
            for b in range(a + 1):
                s = 0.0
                for d in range(a, k):   # (L⁻¹)'L⁻¹, L⁻¹ lower triangular
                    s += Linv[d, a] * Linv[d, b]
                for i in range(c):
                    s += V[i, a] * SV[i, b]
                out[lev, a, b] = s
                out[lev, b, a] = s
    return out


@numba.njit(**_NJIT)
def _lookup(rows, cols, first, k, diag, cross, b_ptr, b_rows, s_inverse):
    out = np.empty(len(rows))
    for t in range(len(rows)):
        r, c = rows[t], cols[t]
        if r < c:
            r, c = c, r
        if c < first and r < first:
            lev = c // k
            if r // k != lev:
                raise ValueError("schur lookup: entry not in the pattern")
            out[t] = diag[lev, r % k, c % k]
        elif c >= first:
            out[t] = s_inverse[r - first, c - first]
        else:
            lev, a = c // k, c % k
            pos = _find_row(b_rows, b_ptr[lev], b_ptr[lev + 1], r - first)
            if pos < 0:
                raise ValueError("schur lookup: entry not in the pattern")
            out[t] = cross[pos, a]
    return out


class SchurSelectedInverse:
    """``C⁻¹`` (or ``C_zz⁻¹``) on the pattern of C, from the block elimination."""

    def __init__(self, first, k, diag, cross, b_ptr, b_rows, s_inverse):
        self.first, self.k = first, k
        self.diag, self.cross, self.s_inverse = diag, cross, s_inverse
        self.b_ptr, self.b_rows = b_ptr, b_rows

    def entries(self, rows, cols) -> np.ndarray:
        return _lookup(np.asarray(rows, dtype=np.int64).ravel(),
                       np.asarray(cols, dtype=np.int64).ravel(), self.first, self.k,
                       self.diag, self.cross, self.b_ptr, self.b_rows, self.s_inverse)


#: fixed effects up to this many dense columns are eliminated densely (the equations'
#: own limit, ``MixedModelEquations.DENSE_FIXED_LIMIT``)
DENSE_FIXED_LIMIT = 64


def schur_applies(design) -> bool:
    """Block elimination fits: dense small X, the first term with identity K, and a
    trailing block of at most ``SCHUR_LIMIT`` rows."""
    if sp.issparse(design.X) or design.n_fixed > DENSE_FIXED_LIMIT:
        return False
    first = design.terms[0]
    if first.level_precision is not None:
        return False
    return design.n_random - first.n_columns + design.n_fixed <= SCHUR_LIMIT


def _level_b_slots(indptr, indices, q1: int, k: int, n_levels: int, sorted_indices: bool):
    """Per level of the first term, its B rows (rows of C below the first q1, shared by
    the level's k columns, ascending) and their slots in C's data, ``b_take`` (rows x k).

    With sorted row indices a column's B rows are its tail, and a level's k columns
    are adjacent: the slots are ranges, no sort (a lexsort of every B entry took 0.1 s
    of the setup at 200k rows); otherwise the entries are sorted by (level, row, coef).
    """
    first_end = int(indptr[q1])
    in_b = indices[:first_end] >= q1
    per_column = np.add.reduceat(in_b, indptr[:q1], dtype=np.int64) if q1 else \
        np.zeros(0, dtype=np.int64)
    by_level = per_column.reshape(n_levels, k)
    if sorted_indices and np.all(by_level == by_level[:, :1]):
        counts = by_level[:, 0]
        b_ptr = np.concatenate([[0], np.cumsum(counts)])
        level = np.repeat(np.arange(n_levels), counts)
        position = np.arange(int(b_ptr[-1])) - b_ptr[:-1][level]
        starts = indptr[1:q1 + 1].astype(np.int64).reshape(n_levels, k) - counts[:, None]
        b_take = starts[level] + position[:, None]
        b_rows = indices[b_take[:, 0]].astype(np.int64) - q1
        return b_ptr, b_rows, b_take
    rows = indices[:first_end].astype(np.int64)
    cols = np.repeat(np.arange(q1, dtype=np.int64), np.diff(indptr[:q1 + 1]))
    b_slots = np.flatnonzero(in_b)
    b_rows_all = rows[in_b] - q1
    b_cols = cols[in_b]
    level, coef = b_cols // k, b_cols % k
    order = np.lexsort((coef, b_rows_all, level))
    level, coef = level[order], coef[order]
    b_rows_all, b_slots = b_rows_all[order], b_slots[order]
    keep = coef == 0
    b_rows = b_rows_all[keep]
    b_ptr = np.concatenate([[0], np.cumsum(np.bincount(level[keep], minlength=n_levels))])
    b_take = b_slots.reshape(-1, k) if k > 1 else b_slots[:, None]
    return b_ptr, b_rows, b_take


class BlockElimination:
    """The factorisation (``factor.py``'s protocol) that eliminates the first term's
    block-diagonal part and factors the small dense Schur complement; its equations
    are built with the natural ordering and the fixed effects last
    (``MixedModelEquations(design, strategy="schur")``).

    Examples
    --------
    >>> import henderson as hd
    >>> d = hd.build_design("diameter ~ 1 + (1|plate) + (1|sample)", hd.datasets.load("penicillin"))
    >>> a = hd.MixedModelEquations(d, strategy="schur")
    >>> b = hd.MixedModelEquations(d)
    >>> a.factorize([1.5, 3.5]); b.factorize([1.5, 3.5])
    >>> abs(a.logdet() - b.logdet()) < 1e-9, type(a.factorization).__name__
    (True, 'BlockElimination')
    """

    name = "schur"

    def __init__(self, equations):
        self.equations = equations
        design = equations.design
        self.n_fixed = equations.n_fixed
        first = design.terms[0]
        if first.level_precision is not None:
            raise ValueError("block elimination needs the first term's levels "
                             "independent (identity K)")
        self.first, self.k = first.n_columns, first.n_coefs
        q1, k, size = self.first, self.k, equations.size
        self.m = size - q1
        # C is stored by columns, lower triangle: the first q1 columns hold the level
        # blocks A and, below them, B; the rest is D. Slices by column, no per-entry
        # column array over all of C (peak memory at a million rows).
        indptr, indices = equations.indptr, equations.indices
        first_end = int(indptr[q1])
        self.b_ptr, self.b_rows, self.b_take = _level_b_slots(
            indptr, indices, q1, k, first.n_levels, equations.matrix.has_sorted_indices)
        if len(self.b_take) != len(self.b_rows):
            raise AssertionError("B blocks of a level must share their rows")
        self.a_take = np.where(equations.diag_positions[0] >= 0,
                               equations.diag_positions[0], 0)
        self.d_take = np.arange(first_end, len(indices), dtype=np.int64)
        self.d_rows = indices[first_end:].astype(np.int64) - q1
        self.d_cols = np.repeat(np.arange(size - q1, dtype=np.int64),
                                np.diff(indptr[q1:]))
        self.level_chol = np.zeros((first.n_levels, k, k))
        self.w = np.zeros((len(self.b_rows), k))
        self._schur_buffer = np.zeros((self.m, self.m))
        self._inverse_buffer = None
        # work of the passes over the levels (multiply-adds): by row of S for the
        # elimination, by level for the inverse's diagonal; two threads share a pass
        # that is large enough, split where the work halves, when the fit may use two
        # threads (henderson.threads)
        sizes = np.diff(self.b_ptr)
        position = np.arange(len(self.b_rows)) - np.repeat(self.b_ptr[:-1], sizes)
        after = np.repeat(sizes, sizes) - position  # updates of each B entry's row
        by_row = np.bincount(self.b_rows, weights=after * k * k, minlength=self.m)
        self._row_split = None
        self._level_split = None
        if by_row.sum() >= THREADED_WORK:
            self._row_split = max(1, min(self.m - 1, _split_by_work(by_row)))
            self._level_split = max(1, min(first.n_levels - 1,
                                           _split_by_work(sizes.astype(float) ** 2)))

    def private_copy(self, equations):
        """The same plan with its own workspace: level factors, W, S."""
        clone = copy.copy(self)
        clone.equations = equations
        clone.level_chol = self.level_chol.copy()
        clone.w = self.w.copy()
        clone._schur_buffer = np.zeros_like(self._schur_buffer)
        clone._inverse_buffer = None
        return clone

    def factorize(self) -> None:
        S = self._schur_buffer
        data = self.equations.matrix.data
        self.logdet_levels = _factor_levels(data, self.a_take, self.b_ptr, self.b_take,
                                            self.k, self.level_chol, self.w)
        if not np.isfinite(self.logdet_levels):
            raise NotPositiveDefiniteError("a level block of C is not positive definite")
        _start_schur(data, self.d_take, self.d_rows, self.d_cols, S)
        args = (self.b_ptr, self.b_rows, self.w, self.k, S)
        if self._row_split is None or active_threads() < 2:
            _update_schur(*args, 0, self.m)
        else:
            _in_two_threads(lambda: _update_schur(*args, 0, self._row_split),
                            lambda: _update_schur(*args, self._row_split, self.m))
        # U = S' row-major is S column-major: LAPACK factors it in place, no copy
        with self._schur_blas():
            factor, info = scipy.linalg.lapack.dpotrf(S.T, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            raise NotPositiveDefiniteError("the Schur complement is not positive definite")
        self.schur_factor = factor

    def _schur_blas(self):
        """The BLAS threads of S's Cholesky and inverse: one below order
        :data:`SCHUR_SHARED_BLAS_FROM` when the level kernels run in two threads.
        OpenBLAS's workers spin for a while after a call, on the cores where the next
        two-thread level kernel runs, and at InstEval's order (1,156) a second thread
        saves less than that costs: first fits in new processes, median of 10, REML
        0.275 s on two BLAS threads against 0.245 s on one, factorisations 89 against
        70 ms. Larger S gains more from the second thread than it loses: 150,000 rows of
        ``y ~ x + (1|g1) + (1|g2)``, 6,000 × n₂ levels, 4 fits each way, one against two
        BLAS threads: n₂ = 1,200 0.237 against 0.243 s, 2,000 0.70 against 0.61 s,
        2,900 1.76 against 1.50 s."""
        if self.m < SCHUR_SHARED_BLAS_FROM and self._row_split is not None \
                and active_threads() >= 2:
            return blas_threads(1)
        return dense_blas_threads(self.m)

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        rhs = np.asarray(rhs, dtype=np.float64)
        q1, k = self.first, self.k
        if rhs.ndim == 1:
            # one right-hand side (every evaluation of the objective): LAPACK potrs on
            # S's factor directly, no copies of the halves (the kernels do not write
            # their inputs); cho_solve's checks and wrapping were a tenth of a small
            # model's evaluation
            y1, r2 = _forward(self.level_chol, self.w, self.b_ptr, self.b_rows,
                              np.ascontiguousarray(rhs[:q1]).reshape(-1, k),
                              np.ascontiguousarray(rhs[q1:]))
            if self.m == 0:      # one term and no fixed effects: nothing left in S
                x2 = r2
            else:
                x2, info = _POTRS(self.schur_factor, r2, lower=1)
                if info != 0:
                    raise ValueError(f"LAPACK potrs failed (info {info})")
            x1 = _backward(self.level_chol, self.w, self.b_ptr, self.b_rows, y1, x2)
            return np.concatenate([x1.ravel(), x2])
        columns = rhs if rhs.ndim == 2 else rhs[:, None]
        forward = [_forward(self.level_chol, self.w, self.b_ptr, self.b_rows,
                            columns[:q1, j].reshape(-1, k).copy(), columns[q1:, j].copy())
                   for j in range(columns.shape[1])]
        # one dense solve for all right-hand sides: it reads S's factor once
        x2 = scipy.linalg.cho_solve((self.schur_factor, True),
                                    np.column_stack([r2 for _, r2 in forward]),
                                    check_finite=False)
        solution = np.empty_like(columns)
        for j, (y1, _) in enumerate(forward):
            x1 = _backward(self.level_chol, self.w, self.b_ptr, self.b_rows, y1, x2[:, j])
            solution[:q1, j] = x1.ravel()
            solution[q1:, j] = x2[:, j]
        return solution if rhs.ndim == 2 else solution[:, 0]

    def _logdiag(self, stop=None) -> float:
        return 2.0 * float(np.sum(np.log(np.diag(self.schur_factor)[:stop])))

    def logdet(self) -> float:
        return self.logdet_levels + self._logdiag()

    def logdet_random(self) -> float:
        return self.logdet_levels + self._logdiag(self.m - self.n_fixed)

    def fixed_block_inverse(self) -> np.ndarray:
        p = self.n_fixed
        if p == 0:
            return np.zeros((0, 0))
        unit = np.zeros((self.m, p))
        unit[self.m - p + np.arange(p), np.arange(p)] = 1.0
        return scipy.linalg.cho_solve((self.schur_factor, True), unit)[self.m - p:, :]

    def _schur_inverse_upper(self, limit: int, scratch: bool = False) -> np.ndarray:
        """S⁻¹ (of its leading ``limit`` rows: C_zz⁻¹) as a row-major array whose upper
        triangle is filled: LAPACK's potri on the column-major factor, half the flops
        of solving against the identity. ``scratch=True`` writes it into a buffer that
        the next call overwrites (for a caller that is done with it at once): a fresh
        10 MB array per AI state cost its page faults every time in a new process."""
        if limit == 0:
            return np.zeros((0, 0))
        if scratch:
            if self._inverse_buffer is None or self._inverse_buffer.shape[0] < limit:
                self._inverse_buffer = np.empty((self.m, self.m), order="F")
            factor = self._inverse_buffer[:limit, :limit]
            np.copyto(factor, self.schur_factor[:limit, :limit])
        else:
            factor = np.array(self.schur_factor[:limit, :limit], order="F")
        with self._schur_blas():
            inverse, info = scipy.linalg.lapack.dpotri(factor, lower=1, overwrite_c=1)
        if info != 0:
            raise NotPositiveDefiniteError("the Schur complement could not be inverted")
        return inverse.T  # row-major; its upper triangle is the lower one of S⁻¹

    def _per_level(self, kernel, upper: np.ndarray, limit: int) -> np.ndarray:
        """``kernel`` (a per-level selected-inverse kernel) over the first term's levels,
        in two threads of two halves of the levels when the fit has two."""
        if self._level_split is None or active_threads() < 2:
            return kernel(self.level_chol, self.w, self.b_ptr, self.b_rows, upper, limit)
        half = self._level_split
        return np.concatenate(_in_two_threads(
            lambda: kernel(self.level_chol[:half], self.w, self.b_ptr[:half + 1],
                           self.b_rows, upper, limit),
            lambda: kernel(self.level_chol[half:], self.w, self.b_ptr[half:],
                           self.b_rows, upper, limit)))

    def inverse_diagonal(self, random_block_only: bool = False) -> np.ndarray:
        limit = self.m - self.n_fixed if random_block_only else self.m
        upper = self._schur_inverse_upper(limit, scratch=True)
        levels = self._per_level(_level_inverse_diagonals, upper, limit)
        rest = np.diag(upper)[:self.m - self.n_fixed]
        return np.concatenate([levels.ravel(), rest])

    def inverse_level_blocks(self, random_block_only: bool = False) -> list[np.ndarray]:
        """Per random term, the k x k diagonal blocks of ``C⁻¹`` (or ``C_zz⁻¹``), one per
        level, shape (n_levels, k, k): the first term's from the level kernel, the
        others' from S⁻¹ (no entries off the diagonal blocks are formed)."""
        limit = self.m - self.n_fixed if random_block_only else self.m
        upper = self._schur_inverse_upper(limit, scratch=True)
        blocks = [self._per_level(_level_inverse_blocks, upper, limit)]
        design = self.equations.design
        offsets = design.column_offsets() - self.first
        for t, term in enumerate(design.terms[1:], start=1):
            k = term.n_coefs
            index = offsets[t] + np.arange(term.n_columns).reshape(term.n_levels, k)
            entries = upper[index[:, :, None], index[:, None, :]]
            # only the upper triangle of S⁻¹ is filled (a <= b reads it)
            below = np.tril(np.ones((k, k), dtype=bool), -1)
            blocks.append(np.where(below, entries.swapaxes(1, 2), entries))
        return blocks

    def selected_inverse(self, random_block_only: bool = False) -> SchurSelectedInverse:
        limit = self.m - self.n_fixed if random_block_only else self.m
        s_inverse = self._schur_inverse_upper(limit)
        _symmetrize_upper(s_inverse)
        diag, cross = _level_inverses(self.level_chol, self.w, self.b_ptr, self.b_rows,
                                      s_inverse, limit)
        return SchurSelectedInverse(self.first, self.k, diag, cross, self.b_ptr,
                                    self.b_rows, s_inverse)

    def lower_factor(self, random_block_only: bool = False):
        raise NotImplementedError("the block-elimination path has no sparse factor L")
