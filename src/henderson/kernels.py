"""Numba kernels: plain arrays in, plain arrays out.

* cross-products of the random-effect columns by level (block diagonal) and by pairs
  of levels (crossed terms), and of levels with dense columns (``Z'WX``, ``Z'Wy``);
* writing ``Λ_a' B Λ_b`` blocks into the fixed pattern of ``C``;
* the Takahashi selected inverse of a sparse Cholesky factor, as a simplicial L (CSC)
  or in CHOLMOD's supernodal storage.

Each kernel has a dense NumPy twin in ``tests/test_kernels.py``.
"""
from __future__ import annotations

import numba
import numpy as np

_NJIT = dict(nogil=True, cache=True)


@numba.njit(**_NJIT)
def grouped_crossprod(group_codes, left, right, weights, n_groups):
    """``out[g] = Σ_{i: code_i = g} w_i left_i right_i'``, shape (n_groups, k_l, k_r).

    With the level codes of one term and ``left = right = z`` this is the block
    diagonal of ``Z_t'WZ_t``; with pair codes of two terms the blocks of ``Z_t'WZ_s``;
    with dense columns on the right, ``Z_t'W[X y]``.
    """
    n, kl = left.shape
    kr = right.shape[1]
    out = np.zeros((n_groups, kl, kr))
    for i in range(n):
        g = group_codes[i]
        w = weights[i]
        for a in range(kl):
            wa = w * left[i, a]
            for b in range(kr):
                out[g, a, b] += wa * right[i, b]
    return out


@numba.njit(**_NJIT)
def grouped_crossprod_columns(group_codes, left, right_columns, weights, n_groups):
    """:func:`grouped_crossprod` with the right factor given by columns (``right_columns``
    is ``right.T``, row-major): a column-major X is read as it lies, one column per pass,
    instead of being copied to row-major first (16 MB for InstEval's X). Zeros of X
    are skipped (adding 0·z changes no sum of finite values): dummy columns are mostly
    zeros (InstEval's X: 90%; 6 -> 3 ms a term)."""
    n, kl = left.shape
    kr = right_columns.shape[0]
    out = np.zeros((n_groups, kl, kr))
    for b in range(kr):
        column = right_columns[b]
        for i in range(n):
            value = column[i]
            if value == 0.0:
                continue
            g = group_codes[i]
            wc = weights[i] * value
            for a in range(kl):
                out[g, a, b] += wc * left[i, a]
    return out


# serial on purpose: microseconds of work, and OpenMP threads left spinning after a
# parallel region slow the CHOLMOD/OpenBLAS factorisation that follows (measured 2x)
@numba.njit(**_NJIT)
def scatter_blocks(lam_a, blocks, lam_b, positions, data):
    """``data[positions[p, a, b]] += (Λ_a' B_p Λ_b)[a, b]`` for every block p.

    ``positions`` is -1 where an entry is not stored (upper triangle).
    """
    n_blocks, ka, kb = blocks.shape
    tmp = np.empty((ka, kb))  # once: an allocation per block cost half of the fill
    for p in range(n_blocks):
        for a in range(ka):
            for b in range(kb):
                acc = 0.0
                for c in range(a, ka):  # Λ_a is lower triangular
                    acc += lam_a[c, a] * blocks[p, c, b]
                tmp[a, b] = acc
        for a in range(ka):
            for b in range(kb):
                pos = positions[p, a, b]
                if pos >= 0:
                    acc = 0.0
                    for c in range(b, kb):
                        acc += tmp[a, c] * lam_b[c, b]
                    data[pos] += acc


@numba.njit(**_NJIT)
def add_rows(out, index, values):
    """``out[index[p]] += values[p]`` (rows; repeated indices add), as ``np.add.at``
    but ~20x faster."""
    for p in range(len(index)):
        r = index[p]
        for a in range(values.shape[1]):
            out[r, a] += values[p, a]


@numba.njit(**_NJIT)
def _find_row(indices, start, stop, row):
    lo, hi = start, stop
    while lo < hi:
        mid = (lo + hi) // 2
        if indices[mid] < row:
            lo = mid + 1
        else:
            hi = mid
    if lo < stop and indices[lo] == row:
        return lo
    return -1


@numba.njit(**_NJIT)
def selected_inverse(indptr, indices, values):
    """Takahashi recurrences: ``C⁻¹`` on the pattern of its Cholesky factor ``L``.

    Parameters
    ----------
    indptr, indices, values : arrays
        ``L`` (lower triangular, ``C = L L'``) in CSC with sorted row indices and the
        diagonal first in each column.

    Returns
    -------
    ndarray
        Values of ``C⁻¹`` at the positions of ``L``'s entries (lower triangle).
    """
    n = len(indptr) - 1
    inv = np.zeros(len(values))
    acc = np.zeros(n)
    for j in range(n - 1, -1, -1):
        start, stop = indptr[j], indptr[j + 1]
        ljj = values[start]
        # acc[i] = Σ_k Z[i, k] L[k, j] over rows i, k > j in column j
        for pk in range(start + 1, stop):
            k = indices[pk]
            lkj = values[pk]
            kstart, kstop = indptr[k], indptr[k + 1]
            # Z[k, k] L[k, j]
            acc[k] += inv[kstart] * lkj
            # rows i > k of column j: Z[i, k] is in column k of Z
            q = kstart + 1
            for pi in range(pk + 1, stop):
                i = indices[pi]
                while q < kstop and indices[q] < i:
                    q += 1
                if q == kstop or indices[q] != i:
                    raise ValueError("selected_inverse: L's pattern is not closed under fill")
                zik = inv[q]
                acc[i] += zik * lkj
                acc[k] += zik * values[pi]
        diag = 1.0 / (ljj * ljj)
        for pi in range(start + 1, stop):
            i = indices[pi]
            zij = -acc[i] / ljj
            inv[pi] = zij
            diag -= zij * values[pi] / ljj
            acc[i] = 0.0
        inv[start] = diag
    return inv


@numba.njit(**_NJIT)
def lower_triangle(indptr, indices, data):
    """The entries with row >= column of a CSC matrix (``scipy.sparse.tril`` without
    its COO triplets: a dense 20,000² block of H⁻¹ is 2·10⁸ of them). Rows keep their
    order within each column; indices keep their dtype."""
    n = len(indptr) - 1
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    for j in range(n):
        count = 0
        for p in range(indptr[j], indptr[j + 1]):
            if indices[p] >= j:
                count += 1
        out_indptr[j + 1] = out_indptr[j] + count
    out_indices = np.empty(out_indptr[n], dtype=indices.dtype)
    out_data = np.empty(out_indptr[n], dtype=data.dtype)
    q = 0
    for j in range(n):
        for p in range(indptr[j], indptr[j + 1]):
            if indices[p] >= j:
                out_indices[q] = indices[p]
                out_data[q] = data[p]
                q += 1
    return out_indptr, out_indices, out_data


@numba.njit(**_NJIT)
def permute_lower(indptr, indices, data, new_position):
    """The lower triangle of ``P A P'`` from that of a symmetric A (CSC, no duplicate
    entries): entry (i, j) goes to (max, min) of (new_position[i], new_position[j]),
    rows sorted within each column. ``data`` travels with its entries."""
    n = len(indptr) - 1
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    for j in range(n):
        b = new_position[j]
        for p in range(indptr[j], indptr[j + 1]):
            out_indptr[min(new_position[indices[p]], b) + 1] += 1
    for j in range(n):
        out_indptr[j + 1] += out_indptr[j]
    fill = out_indptr[:n].copy()
    out_indices = np.empty(out_indptr[n], dtype=indices.dtype)
    out_data = np.empty(out_indptr[n], dtype=data.dtype)
    for j in range(n):
        b = new_position[j]
        for p in range(indptr[j], indptr[j + 1]):
            a = new_position[indices[p]]
            col, row = (a, b) if a < b else (b, a)
            q = fill[col]
            out_indices[q] = row
            out_data[q] = data[p]
            fill[col] = q + 1
    for j in range(n):
        start, stop = out_indptr[j], out_indptr[j + 1]
        ordered = True
        for p in range(start + 1, stop):
            if out_indices[p] < out_indices[p - 1]:
                ordered = False
                break
        if not ordered:
            order = np.argsort(out_indices[start:stop])
            out_indices[start:stop] = out_indices[start:stop][order]
            out_data[start:stop] = out_data[start:stop][order]
    return out_indptr, out_indices, out_data


@numba.njit(**_NJIT)
def add_into_pattern(indptr, indices, offset, piece_indptr, piece_indices, piece_data, out):
    """``out[slot] += value`` for every entry of a piece whose pattern lies inside a
    larger one (both CSC, rows sorted): piece entry (i, j) is pattern entry
    (offset + i, offset + j). One merge per column, no search."""
    for j in range(len(piece_indptr) - 1):
        q, stop = indptr[offset + j], indptr[offset + j + 1]
        for p in range(piece_indptr[j], piece_indptr[j + 1]):
            row = offset + piece_indices[p]
            while q < stop and indices[q] < row:
                q += 1
            if q == stop or indices[q] != row:
                raise ValueError("add_into_pattern: an entry of the piece is not in the pattern")
            out[q] += piece_data[p]


@numba.njit(**_NJIT)
def pattern_positions(indptr, indices, rows, cols):
    """Positions in a CSC pattern (rows sorted) of the entries (rows[t], cols[t])."""
    out = np.empty(len(rows), dtype=np.int64)
    for t in range(len(rows)):
        c = cols[t]
        pos = _find_row(indices, indptr[c], indptr[c + 1], rows[t])
        if pos < 0:
            raise ValueError("pattern_positions: entry not in the pattern")
        out[t] = pos
    return out


@numba.njit(**_NJIT)
def lookup_symmetric(indptr, indices, values, rows, cols):
    """Values of a symmetric matrix stored as its lower triangle at (rows, cols)."""
    out = np.empty(len(rows))
    for t in range(len(rows)):
        r, c = rows[t], cols[t]
        if r < c:
            r, c = c, r
        pos = _find_row(indices, indptr[c], indptr[c + 1], r)
        if pos < 0:
            raise ValueError("lookup_symmetric: entry not in pattern")
        out[t] = values[pos]
    return out


@numba.njit(parallel=True, **_NJIT)
def block_diagonal_sums(group_ptr, row_order, local_cols, col_base, group_size,
                        z_all, z_offsets, lam_all, term_k, X, y, weights):
    """Per-group Woodbury pieces of a block-diagonal Σ (DESIGN.md section 5).

    For each group g with rows R_g and relative random-effect design ``A_g = Z_g Λ_g``
    (n_g x q_g), ``M_g = I + A_g' W_g A_g`` and ``V_g⁻¹ = W_g − W_g A_g M_g⁻¹ A_g' W_g``.
    Returns per-group ``log|M_g|`` and the sums ``X'V⁻¹X``, ``X'V⁻¹y``, ``y'V⁻¹y``.
    """
    n_groups = len(group_ptr) - 1
    n_terms = len(term_k)
    p = X.shape[1]
    logdets = np.zeros(n_groups)
    xvx = np.zeros((n_groups, p, p))
    xvy = np.zeros((n_groups, p))
    yvy = np.zeros(n_groups)
    for g in numba.prange(n_groups):
        start, stop = group_ptr[g], group_ptr[g + 1]
        ng = stop - start
        qg = group_size[g]
        A = np.zeros((ng, qg))
        for r in range(ng):
            i = row_order[start + r]
            for t in range(n_terms):
                k = term_k[t]
                base = col_base[g, t] + local_cols[i, t] * k
                for a in range(k):
                    acc = 0.0
                    for c in range(a, k):
                        acc += z_all[i, z_offsets[t] + c] * lam_all[t, c, a]
                    A[r, base + a] = acc
        M = np.eye(qg)
        WA = np.empty((ng, qg))
        Xg = np.empty((ng, p + 1))
        for r in range(ng):
            i = row_order[start + r]
            w = weights[i]
            for a in range(qg):
                WA[r, a] = w * A[r, a]
            for c in range(p):
                Xg[r, c] = X[i, c]
            Xg[r, p] = y[i]
        M += A.T @ WA
        Lm = np.linalg.cholesky(M)
        ld = 0.0
        for a in range(qg):
            ld += 2.0 * np.log(Lm[a, a])
        logdets[g] = ld
        # V⁻¹ [X y] pieces: [X y]'W[X y] - ([X y]'WA) M⁻¹ (A'W[X y])
        AWX = WA.T @ Xg                      # qg x (p+1)
        T = np.linalg.solve(Lm, AWX)         # L⁻¹ A'W[X y]
        WXg = np.empty((ng, p + 1))
        for r in range(ng):
            w = weights[row_order[start + r]]
            for c in range(p + 1):
                WXg[r, c] = w * Xg[r, c]
        full = Xg.T @ WXg - T.T @ T
        for a in range(p):
            for b in range(p):
                xvx[g, a, b] = full[a, b]
            xvy[g, a] = full[a, p]
        yvy[g] = full[p, p]
    return logdets, xvx.sum(axis=0), xvy.sum(axis=0), yvy.sum()


@numba.njit(**_NJIT)
def fundamental_supernodes(indptr, indices, max_width=256):
    """Start column of each supernode of L: runs of columns j, j+1, ... where column
    j+1's pattern is column j's without its diagonal (CHOLMOD's relaxed supernodes
    keep explicit zeros, so they come back whole)."""
    n = len(indptr) - 1
    starts = np.empty(n + 1, dtype=np.int64)
    count = 0
    j = 0
    while j < n:
        starts[count] = j
        count += 1
        width = 1
        while j + width < n and width < max_width:
            a0, a1 = indptr[j + width - 1] + 1, indptr[j + width]
            b0, b1 = indptr[j + width], indptr[j + width + 1]
            if a1 - a0 != b1 - b0:
                break
            same = True
            for t in range(a1 - a0):
                if indices[a0 + t] != indices[b0 + t]:
                    same = False
                    break
            if not same:
                break
            width += 1
        j += width
    starts[count] = n
    return starts[:count + 1]


@numba.njit(**_NJIT)
def selected_inverse_supernodal(indptr, indices, values):
    """Takahashi recurrences by supernodes with dense blocks (BLAS):
    ``Z_RJ = −Z_RR Y``, ``Z_JJ = L_JJ⁻ᵀ L_JJ⁻¹ − Yᵀ Z_RJ`` with ``Y = L_RJ L_JJ⁻¹``.

    Same input and output as :func:`selected_inverse`, at the cost of the
    factorisation instead of a column-by-column sweep.
    """
    inv = np.zeros(len(values))
    selected_inverse_supernodal_into(indptr, indices, values, inv, len(indptr) - 1)
    return inv


@numba.njit(**_NJIT)
def _supernode_diagonal_inverse(L_JJ):
    """``L_JJ⁻¹`` of a supernode's lower-triangular diagonal block (its upper triangle
    set to exact zeros: the inverse is lower triangular, the rounding is cleaned) and
    ``Z_JJ = L_JJ⁻ᵀ L_JJ⁻¹``, the start of its block of the inverse."""
    inv_JJ = np.linalg.inv(L_JJ)
    s = L_JJ.shape[0]
    for a in range(s):
        for c in range(a + 1, s):
            inv_JJ[a, c] = 0.0
    return inv_JJ, inv_JJ.T @ inv_JJ


@numba.njit(**_NJIT)
def selected_inverse_supernodal_into(indptr, indices, values, inv, stop_column):
    """:func:`selected_inverse_supernodal` written into ``inv`` for the supernodes
    before ``stop_column``; from it on, ``inv`` must already hold ``C⁻¹``. ``inv``
    may be ``values`` itself (each supernode reads its own L before writing its Z, and
    later supernodes' Z only), which saves a copy of L the size of the factor.
    Indices may be int32 (no int64 copy of L's pattern)."""
    starts = fundamental_supernodes(indptr, indices)
    n_super = len(starts) - 1
    # one workspace for Z_RR, the largest it gets (up to the dense trailing block's
    # size squared): a fresh r x r array per supernode was allocated and paged in anew
    largest = 0
    for sn in range(n_super):
        first = starts[sn]
        if first >= stop_column:
            break
        r = indptr[first + 1] - indptr[first] - (starts[sn + 1] - first)
        largest = max(largest, r)
    workspace = np.empty(largest * largest)
    for sn in range(n_super - 1, -1, -1):
        first, stop = starts[sn], starts[sn + 1]
        if first >= stop_column:
            continue
        s = stop - first
        col0 = indptr[first]
        total = indptr[first + 1] - col0  # rows of the first column: s + r
        r = total - s
        rows = indices[col0:col0 + total]
        L_JJ = np.zeros((s, s))
        L_RJ = np.empty((r, s))
        for c in range(s):
            base = indptr[first + c]
            for a in range(c, s):
                L_JJ[a, c] = values[base + a - c]
            for a in range(r):
                L_RJ[a, c] = values[base + s - c + a]
        inv_JJ, Z_JJ = _supernode_diagonal_inverse(L_JJ)
        if r > 0:
            Y = L_RJ @ inv_JJ
            Z_RR = workspace[:r * r].reshape((r, r))
            R = rows[s:]
            for b in range(r):
                c = R[b]
                q = indptr[c]
                qstop = indptr[c + 1]
                contiguous = indices[qstop - 1] - indices[q] == qstop - 1 - q
                for a in range(b, r):
                    target = R[a]
                    # columns of dense trailing blocks are long: jump, don't walk
                    if contiguous:
                        pos = q + target - indices[q]
                    else:
                        pos = _find_row(indices, q, qstop, target)
                    if pos < 0 or pos >= qstop or indices[pos] != target:
                        raise ValueError("selected_inverse: L's pattern is not closed under fill")
                    Z_RR[a, b] = inv[pos]
                    Z_RR[b, a] = inv[pos]
                    if not contiguous:
                        q = pos + 1
            Z_RJ = -(Z_RR @ Y)
            Z_JJ -= Y.T @ Z_RJ
            for c in range(s):
                base = indptr[first + c]
                for a in range(r):
                    inv[base + s - c + a] = Z_RJ[a, c]
        for c in range(s):
            base = indptr[first + c]
            for a in range(c, s):
                inv[base + a - c] = Z_JJ[a, c]


@numba.njit(**_NJIT)
def dense_tail_start(indptr, indices, fraction=1.0):
    """The first column of L's trailing block taken as dense: supernodes are taken
    from the last one back while their first column holds at least ``fraction`` of
    the rows below it (1.0: every row; n when not even the last qualifies). The block
    starts at a supernode boundary."""
    starts = fundamental_supernodes(indptr, indices)
    n = len(indptr) - 1
    start = n
    for sn in range(len(starts) - 2, -1, -1):
        first = starts[sn]
        if indptr[first + 1] - indptr[first] < fraction * (n - first):
            break
        start = first
    return start


@numba.njit(**_NJIT)
def dense_tail_to_array(indptr, indices, values, start, out):
    """The entries of columns start.. of a CSC lower triangle into ``out`` (m x m,
    zeros elsewhere: a factor's trailing block with a few structural zeros is still
    the Cholesky factor of its Schur complement)."""
    n = len(indptr) - 1
    for c in range(start, n):
        for p in range(indptr[c], indptr[c + 1]):
            out[indices[p] - start, c - start] = values[p]


@numba.njit(**_NJIT)
def dense_tail_from_array(indptr, indices, array, start, values):
    """The inverse of :func:`dense_tail_to_array` on L's pattern."""
    n = len(indptr) - 1
    for c in range(start, n):
        for p in range(indptr[c], indptr[c + 1]):
            values[p] = array[indices[p] - start, c - start]


#: a dense trailing block of L at least this wide is inverted by LAPACK (dpotri)
DENSE_TAIL_MIN = 256
#: supernodes join the trailing block while their first column holds this fraction
#: of the rows below it: a supernode just before the genotyped block, with nearly all
#: of them among its rows, otherwise gathers their whole inverse as its Z_RR (the
#: 4.6 GB that set the peak at 1M animals)
DENSE_TAIL_FRACTION = 0.5


def selected_inverse_in_place(indptr, indices, values) -> np.ndarray:
    """``C⁻¹`` on the pattern of its Cholesky factor L, written over L's values.

    The dense trailing block of L (the genotyped animals of single-step: 20,000² /
    2 entries, and the supernodes before them that are mostly dense) is
    ``(L_DD L_DD')⁻¹``, which LAPACK's dpotri computes blocked and in place on one
    dense copy; the supernodes before it run the Takahashi recurrences
    (:func:`selected_inverse_supernodal_into`), reading the trailing block's inverse
    as they go.
    """
    from scipy.linalg import lapack

    n = len(indptr) - 1
    start = int(dense_tail_start(indptr, indices, DENSE_TAIL_FRACTION))
    if n - start >= DENSE_TAIL_MIN:
        tail = np.zeros((n - start, n - start), order="F")
        dense_tail_to_array(indptr, indices, values, start, tail)
        tail, info = lapack.dpotri(tail, lower=1, overwrite_c=1)
        if info:
            raise ValueError(f"selected_inverse: dpotri failed (info {info})")
        dense_tail_from_array(indptr, indices, tail, start, values)
        del tail
    else:
        start = n
    selected_inverse_supernodal_into(indptr, indices, values, values, start)
    return values


# ------------------------------------------------- the selected inverse on supernodes
# L as CHOLMOD stores a supernodal factor (linalg.Supernodes): supernode k holds columns
# first_column[k] .. first_column[k + 1], rows rows[row_pointer[k]:row_pointer[k + 1]]
# (sorted, its own columns first), values column-major from value_pointer[k] with as
# many rows. The inverse is written over L in that storage: no simplicial copy of L.

@numba.njit(**_NJIT)
def _supernodal_position(first_column, row_pointer, value_pointer, rows, column_node,
                         row, col):
    """Where entry (row, col), row >= col, of L's pattern sits in the values; -1 if
    it is not in the pattern."""
    node = column_node[col]
    start, stop = row_pointer[node], row_pointer[node + 1]
    height = stop - start
    offset = col - first_column[node]
    if rows[stop - 1] - rows[start] == height - 1:  # contiguous rows: jump
        pos = row - rows[start]
        if pos < offset or pos >= height:
            return -1
    else:
        found = _find_row(rows, start + offset, stop, row)
        if found < 0:
            return -1
        pos = found - start
    return value_pointer[node] + offset * height + pos


@numba.njit(**_NJIT)
def supernodal_lookup_symmetric(first_column, row_pointer, value_pointer, rows,
                                column_node, values, query_rows, query_cols):
    """:func:`lookup_symmetric` on supernodal storage."""
    out = np.empty(len(query_rows))
    for t in range(len(query_rows)):
        r, c = query_rows[t], query_cols[t]
        if r < c:
            r, c = c, r
        pos = _supernodal_position(first_column, row_pointer, value_pointer, rows,
                                   column_node, r, c)
        if pos < 0:
            raise ValueError("lookup_symmetric: entry not in pattern")
        out[t] = values[pos]
    return out


@numba.njit(**_NJIT)
def _gather_column(first_column, row_pointer, value_pointer, rows, column_node, values,
                   col, targets, out, out_stride, out_offset):
    """``out[out_offset + i * out_stride] = Z[targets[i], col]`` for rows ``targets``
    (ascending, each >= col) of one column, walking down its rows."""
    node = column_node[col]
    start, stop = row_pointer[node], row_pointer[node + 1]
    height = stop - start
    offset = col - first_column[node]
    base = value_pointer[node] + offset * height
    contiguous = rows[stop - 1] - rows[start] == height - 1
    q = start + offset
    for i in range(len(targets)):
        target = targets[i]
        if contiguous:
            pos = target - rows[start]
            if pos < offset or pos >= height:
                raise ValueError("selected_inverse: L's pattern is not closed under fill")
        else:
            while q < stop and rows[q] < target:
                q += 1
            if q == stop or rows[q] != target:
                raise ValueError("selected_inverse: L's pattern is not closed under fill")
            pos = q - start
        out[out_offset + i * out_stride] = values[base + pos]


@numba.njit(**_NJIT)
def supernodal_gather(first_column, row_pointer, value_pointer, rows, column_node, values,
                      left, right):
    """``Z[left, right]`` (both ascending) of the symmetric matrix held on L's pattern."""
    m, r = len(left), len(right)
    out = np.empty((m, r))
    flat = out.reshape(m * r)
    for a in range(m):
        # right[b] >= left[a]: column left[a], rows right[b]
        first = np.searchsorted(right, left[a])
        _gather_column(first_column, row_pointer, value_pointer, rows, column_node, values,
                       left[a], right[first:], flat, 1, a * r + first)
    for b in range(r):
        # left[a] > right[b]: column right[b], rows left[a]
        first = np.searchsorted(left, right[b], side="right")
        if first < m:
            _gather_column(first_column, row_pointer, value_pointer, rows, column_node,
                           values, right[b], left[first:], flat, r, first * r + b)
    return out


@numba.njit(**_NJIT)
def supernodal_selected_inverse_range(first_column, row_pointer, value_pointer, rows,
                                      column_node, values, low, high, workspace_bytes):
    """The Takahashi recurrences of :func:`selected_inverse_supernodal_into` on
    supernodal storage, for supernodes ``high - 1`` down to ``low``: each reads its own
    L before writing its Z over it, and the Z of later supernodes only, which must be
    there already. ``Z_RR`` is gathered whole up to ``workspace_bytes``, in row panels
    beyond (a supernode just before a dense block can have its 20,000 rows)."""
    largest = 0
    for node in range(low, high):
        width = first_column[node + 1] - first_column[node]
        largest = max(largest, row_pointer[node + 1] - row_pointer[node] - width)
    whole_limit = max(1, int(np.sqrt(workspace_bytes / 8.0)))
    workspace = np.empty(min(largest, whole_limit) * largest)
    for node in range(high - 1, low - 1, -1):
        first = first_column[node]
        s = first_column[node + 1] - first
        start = row_pointer[node]
        height = row_pointer[node + 1] - start
        r = height - s
        base = value_pointer[node]
        L_JJ = np.zeros((s, s))
        L_RJ = np.empty((r, s))
        for c in range(s):
            for a in range(c, s):
                L_JJ[a, c] = values[base + c * height + a]
            for a in range(r):
                L_RJ[a, c] = values[base + c * height + s + a]
        inv_JJ, Z_JJ = _supernode_diagonal_inverse(L_JJ)
        if r > 0:
            Y = L_RJ @ inv_JJ
            R = rows[start + s:start + height]
            Z_RJ = np.empty((r, s))
            if r <= whole_limit:
                Z_RR = workspace[:r * r].reshape((r, r))
                flat = workspace[:r * r]
                for b in range(r):  # lower triangle by columns, mirrored
                    _gather_column(first_column, row_pointer, value_pointer, rows,
                                   column_node, values, R[b], R[b:], flat, r, b * r + b)
                    for a in range(b + 1, r):
                        Z_RR[b, a] = Z_RR[a, b]
                Z_RJ[:, :] = -(Z_RR @ Y)
            else:
                panel = max(1, (whole_limit * whole_limit) // r)
                for a0 in range(0, r, panel):
                    a1 = min(a0 + panel, r)
                    rows_here = a1 - a0
                    Z_panel = workspace[:rows_here * r].reshape((rows_here, r))
                    flat = workspace[:rows_here * r]
                    for a in range(a0, a1):  # Z[R[b], R[a]], b >= a: column R[a]
                        _gather_column(first_column, row_pointer, value_pointer, rows,
                                       column_node, values, R[a], R[a:], flat, 1,
                                       (a - a0) * r + a)
                    for b in range(0, a1):  # Z[R[a], R[b]], a > b: column R[b]
                        lo = max(a0, b + 1)
                        if lo < a1:
                            _gather_column(first_column, row_pointer, value_pointer, rows,
                                           column_node, values, R[b], R[lo:a1], flat, r,
                                           (lo - a0) * r + b)
                    Z_RJ[a0:a1, :] = -(Z_panel @ Y)
            Z_JJ -= Y.T @ Z_RJ
            for c in range(s):
                for a in range(r):
                    values[base + c * height + s + a] = Z_RJ[a, c]
        for c in range(s):
            for a in range(c, s):
                values[base + c * height + a] = Z_JJ[a, c]


#: bytes of Z_RR gathered at once for one supernode (row panels beyond)
SUPERNODE_WORKSPACE_BYTES = 1 << 28


def _dense_tail_step(nodes, column_node, tail, tail_first, node) -> None:
    """One supernode whose rows hold many of the dense trailing supernode's columns:
    ``Z_RR Y`` with that supernode's inverse (``tail``, lower triangle, in place) by
    one BLAS ``dsymm`` instead of gathering it."""
    from scipy.linalg import blas

    first_column, row_pointer, value_pointer, rows, values = (
        nodes.first_column, nodes.row_pointer, nodes.value_pointer, nodes.rows, nodes.values)
    first = first_column[node]
    s = first_column[node + 1] - first
    start = row_pointer[node]
    height = row_pointer[node + 1] - start
    r = height - s
    block = values[value_pointer[node]:value_pointer[node] + height * s].reshape(
        (height, s), order="F")
    inv_JJ = np.linalg.inv(np.tril(block[:s]))
    inv_JJ = np.tril(inv_JJ)
    Y = block[s:] @ inv_JJ
    R = rows[start + s:start + height].astype(np.int64)
    k = int(np.searchsorted(R, tail_first))  # R[:k] before the tail, R[k:] in it
    in_tail = R[k:] - tail_first
    padded = np.zeros((len(tail), s), order="F")
    padded[in_tail] = Y[k:]
    product = blas.dsymm(1.0, tail, padded, side=0, lower=1)
    Z_RJ = np.empty((r, s))
    Z_RJ[k:] = product[in_tail]
    del padded, product
    if k:
        cross = supernodal_gather(first_column, row_pointer, value_pointer, rows,
                                  column_node, values, R[:k], R)
        Z_RJ[:k] = cross @ Y
        Z_RJ[k:] += cross[:, k:].T @ Y[:k]
    Z_RJ = -Z_RJ
    Z_JJ = inv_JJ.T @ inv_JJ - Y.T @ Z_RJ
    block[s:] = Z_RJ
    lower = np.tril_indices(s)
    block[lower] = Z_JJ[lower]


def supernodal_selected_inverse_in_place(nodes) -> np.ndarray:
    """``C⁻¹`` on the pattern of its supernodal Cholesky factor, written over the
    factor's values (``nodes``: :class:`henderson.linalg.Supernodes`, or an object with
    the same arrays). Returns the map from a column to its supernode.

    A dense last supernode (the genotyped animals of single-step, stored as a full
    square) is inverted in place by LAPACK's dpotri; a supernode with at least
    :data:`DENSE_TAIL_FRACTION` of that square's columns among its rows multiplies by
    it with BLAS (``dsymm``) in place; the others run the Takahashi recurrences
    (:func:`supernodal_selected_inverse_range`). No copy of the square is made.
    """
    from scipy.linalg import lapack

    first_column, row_pointer, value_pointer, rows, values = (
        nodes.first_column, nodes.row_pointer, nodes.value_pointer, nodes.rows, nodes.values)
    n_nodes = len(first_column) - 1
    widths = np.diff(first_column)
    column_node = np.repeat(np.arange(n_nodes, dtype=np.int64), widths)
    last = n_nodes - 1
    t = int(widths[last])
    stop = n_nodes
    tail = None
    if t >= DENSE_TAIL_MIN and row_pointer[last + 1] - row_pointer[last] == t:
        tail = values[value_pointer[last]:value_pointer[last] + t * t].reshape(
            (t, t), order="F")
        tail_out, info = lapack.dpotri(tail, lower=1, overwrite_c=1)
        if info:
            raise ValueError(f"selected_inverse: dpotri failed (info {info})")
        if not np.shares_memory(tail_out, tail):  # pragma: no cover - a copy was made
            tail[...] = tail_out
        del tail_out
        stop = last
    dense = np.zeros(stop, dtype=bool)
    if tail is not None and stop:
        tail_first = first_column[last]
        in_tail = np.add.reduceat((rows[:row_pointer[stop]] >= tail_first).astype(np.int64),
                                  row_pointer[:stop])
        dense = in_tail >= DENSE_TAIL_FRACTION * t
    high = stop
    for node in np.flatnonzero(dense)[::-1]:
        supernodal_selected_inverse_range(first_column, row_pointer, value_pointer, rows,
                                          column_node, values, node + 1, high,
                                          SUPERNODE_WORKSPACE_BYTES)
        _dense_tail_step(nodes, column_node, tail, first_column[last], node)
        high = node
    supernodal_selected_inverse_range(first_column, row_pointer, value_pointer, rows,
                                      column_node, values, 0, high,
                                      SUPERNODE_WORKSPACE_BYTES)
    return column_node


@numba.njit(**_NJIT)
def genotype_moments(counts):
    """Per column of a (samples x variants) block of allele counts, missing as NaN
    (float32) or -1 (int8 codes): the number observed, the mean and the (population)
    variance of the observed values, accumulated in float64 (exact for integer sums)."""
    n, k = counts.shape
    observed = np.zeros(k, dtype=np.int64)
    mean = np.zeros(k)
    variance = np.zeros(k)
    for j in range(k):
        total = 0.0
        squares = 0.0
        count = 0
        for i in range(n):
            value = counts[i, j]
            if value >= 0:  # neither NaN nor the code -1
                total += value
                squares += value * value
                count += 1
        observed[j] = count
        if count > 0:
            mean[j] = total / count
            variance[j] = max(squares / count - mean[j] * mean[j], 0.0)
    return observed, mean, variance


@numba.njit(**_NJIT)
def centred_genotypes(counts, mean, scale, centre):
    """``(x − mean) · scale`` (``centre``) or ``x`` (not centred) per column, with a
    missing value set to the column's mean (0 once centred); float32, Fortran order."""
    n, k = counts.shape
    out = np.empty((k, n), dtype=np.float32)  # transposed: column j of out.T is contiguous
    for j in range(k):
        m = mean[j]
        s = scale[j]
        for i in range(n):
            value = counts[i, j]
            if value == value:
                out[j, i] = (value - m) * s if centre else value
            else:
                out[j, i] = 0.0 if centre else m
    return out.T


@numba.njit(**_NJIT)
def weighted_row_sums(counts, weights):
    """``counts @ weights`` in float64 without a float64 copy of the block."""
    n, k = counts.shape
    out = np.zeros(n)
    for j in range(k):
        w = weights[j]
        for i in range(n):
            out[i] += counts[i, j] * w
    return out
