"""Stage 3 of the pipeline: Henderson's mixed-model equations in relative form.

Owns the cross-products of the data (accumulated once, in one pass over the rows),
the fixed sparsity pattern of

    C(θ) = [ Λ'Z'WZΛ + P   Λ'Z'WX ]
           [ X'WZΛ          X'WX  ]

(lower triangle, CSC, rows and columns already in the fill-reducing order, fixed
effects last), the map from every cross-product entry to its slot in ``C.data``, and
the CHOLMOD factor: ``analyze`` once, ``cholesky_inplace`` for every θ (through
``linalg.py``, the one caller of scikit-sparse).
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from . import kernels
from .design import Design
from .errors import DataError
from .factor import DenseFixedBlock, SparseCholesky
from .schur import DENSE_FIXED_LIMIT, BlockElimination
from .linalg import (NotPositiveDefiniteError, cholmod_analyze, cholmod_lower_factor,
                     cholmod_permutation, cholmod_refactor, independent_columns)


_ONE = np.ones((1, 1))


# ---------------------------------------------------------------- cross-products
@dataclass
class CrossProducts:
    """``Z'WZ`` by blocks, ``Z'WX``, ``X'WX``, ``Z'Wy``, ``X'Wy``, ``y'Wy``.

    ``diagonal[t]`` is (n_levels, k, k); ``crossed[(t, s)]`` holds for t < s the level
    pairs that occur together (``pair_levels``, shape (n_pairs, 2)) and their
    (n_pairs, k_t, k_s) blocks; ``zx[t]`` likewise holds (level, fixed column) pairs and
    (n_pairs, k, 1) blocks (every pair when X is dense, the nonzero ones when X is
    sparse); ``zy[t]`` is (n_levels, k); ``xx`` is X'WX (dense or sparse);
    ``x_nonzeros`` counts the rows where each column of X is nonzero (its density,
    which places it in or after the fill-reducing ordering).

    Every product with y is of the shifted response ``y − X β₀`` (``fixed_shift`` =
    β₀, a least-squares fit of the fixed effects): the model is the same with β
    shifted by β₀, and the penalised residual sum of squares, ``y'Wy − sol'·rhs``, no
    longer cancels catastrophically when y has a large mean (y + 1e8 gave an
    objective of −inf). Fixed effects are ``β̂ + β₀``.
    """

    diagonal: list[np.ndarray]
    crossed: dict
    zx: list[tuple[np.ndarray, np.ndarray]]
    zy: list[np.ndarray]
    xx: np.ndarray | sp.spmatrix
    xy: np.ndarray
    yy: float
    n_obs: int
    sum_log_weights: float
    x_nonzeros: np.ndarray
    fixed_shift: np.ndarray | None = None
    #: max |y|·√w of the (unshifted) response: the scale an exact fit is judged on
    response_scale: float = np.nan
    #: the smallest and largest response (a constant one has them equal)
    response_range: tuple = (np.nan, np.nan)

    @classmethod
    def from_design(cls, design: Design, fixed_shift: np.ndarray | None = None
                    ) -> "CrossProducts":
        """The cross-products of a design's rows.

        ``fixed_shift`` (β₀) is computed from the rows by :func:`response_shift` unless
        given: the chunks of one fit must share it.
        """
        w = _frozen(design.weights)
        sparse_x = sp.issparse(design.X)
        X = design.X.tocsc() if sparse_x else np.asarray(design.X, dtype=np.float64)
        p = X.shape[1]
        if sparse_x:
            wX = sp.diags(w) @ X
            xx = (X.T @ wX).tocsc()
        else:
            unit = bool(np.all(w == 1.0))  # no weighted copy of X when there are none
            wX = X if unit else X * w[:, None]
            xx = X.T @ wX
        if fixed_shift is None:
            fixed_shift = response_shift(X, design.y, w, design.fixed_names, gram=xx)
        fixed_shift = np.asarray(fixed_shift, dtype=np.float64)
        y = np.asarray(design.y, dtype=np.float64)
        # the weighted scale: uniform weights of 1e-100 only rescale σ
        response_scale = float(np.sqrt(np.max(w * y * y))) if len(y) else 0.0
        response_range = (float(y.min()), float(y.max())) if len(y) else (np.nan, np.nan)
        if p and np.any(fixed_shift != 0):
            y = y - np.asarray(X @ fixed_shift).ravel()
        y = np.ascontiguousarray(y)
        # X is read by columns (formulaic's X is column-major): no row-major copy of it
        x_columns = None if sparse_x else _frozen(X.T)
        y_column = _frozen(y[:, None])
        diagonal, zx, zy = [], [], []
        for term in design.terms:
            z = _frozen(term.z)
            codes = term.level_codes
            nl, k = term.n_levels, term.n_coefs
            diagonal.append(kernels.grouped_crossprod(codes, z, z, w, nl))
            zy.append(np.ascontiguousarray(
                kernels.grouped_crossprod(codes, z, y_column, w, nl)[:, :, 0]))
            if not sparse_x:
                zx_blocks = kernels.grouped_crossprod_columns(codes, z, x_columns, w, nl)
                pairs = np.column_stack([np.repeat(np.arange(nl), p), np.tile(np.arange(p), nl)])
                blocks = np.ascontiguousarray(zx_blocks.transpose(0, 2, 1)).reshape(nl * p, k, 1)
            else:
                pairs, blocks = _sparse_level_crossprod(codes, z, w, X, nl)
            zx.append((pairs, blocks))
        crossed = {}
        for t, term_t in enumerate(design.terms):
            for s in range(t + 1, len(design.terms)):
                term_s = design.terms[s]
                key = term_t.level_codes * term_s.n_levels + term_s.level_codes
                pair_keys, pair_codes = np.unique(key, return_inverse=True)
                blocks = kernels.grouped_crossprod(
                    pair_codes.astype(np.int64),
                    _frozen(term_t.z),
                    _frozen(term_s.z),
                    w,
                    len(pair_keys),
                )
                pairs = np.column_stack(
                    [pair_keys // term_s.n_levels, pair_keys % term_s.n_levels]
                )
                crossed[(t, s)] = (pairs, blocks)
        xy = np.asarray(wX.T @ y).ravel()
        return cls(
            diagonal=diagonal,
            crossed=crossed,
            zx=zx,
            zy=zy,
            xx=xx,
            xy=xy,
            yy=float(np.dot(w * y, y)),
            n_obs=len(y),
            sum_log_weights=float(np.sum(np.log(w))),
            x_nonzeros=(np.diff(X.indptr) if sparse_x
                        else np.count_nonzero(X, axis=0)).astype(np.int64),
            fixed_shift=fixed_shift,
            response_scale=response_scale,
            response_range=response_range,
        )


    def add(self, other: CrossProducts) -> CrossProducts:
        """Add the cross-products of other rows (same terms, levels and fixed columns),
        in place; returns ``self``. Cross-products add over rows, which is what chunked
        and Dask fits rest on."""
        if len(other.diagonal) != len(self.diagonal) or other.xy.shape != self.xy.shape:
            raise ValueError("cross-products of different designs cannot be added")
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cross-products of differently shifted responses cannot be added")
        n_fixed = self.xy.shape[0]
        for t in range(len(self.diagonal)):
            self.diagonal[t] += other.diagonal[t]
            self.zy[t] += other.zy[t]
            self.zx[t] = _add_pair_blocks(self.zx[t], other.zx[t], n_fixed)
        for key, value in other.crossed.items():
            n_cols = self.diagonal[key[1]].shape[0]
            self.crossed[key] = _add_pair_blocks(self.crossed[key], value, n_cols)
        self.xx = self.xx + other.xx
        self.xy = self.xy + other.xy
        self.yy += other.yy
        self.n_obs += other.n_obs
        self.response_scale = float(np.nanmax([self.response_scale, other.response_scale]))
        self.response_range = (float(np.nanmin([self.response_range[0], other.response_range[0]])),
                               float(np.nanmax([self.response_range[1], other.response_range[1]])))
        self.sum_log_weights += other.sum_log_weights
        self.x_nonzeros = self.x_nonzeros + other.x_nonzeros
        return self

    @property
    def shift(self) -> np.ndarray:
        """β₀ of the shifted response (zeros when none)."""
        if self.fixed_shift is None:
            return np.zeros(self.xy.shape[0])
        return self.fixed_shift

    def drop_fixed(self, keep: np.ndarray) -> CrossProducts:
        """The cross-products with only the fixed-effect columns ``keep``.

        A dropped column is (to the aliasing tolerance) a combination of kept ones, so
        its part of the shift ``X β₀`` moves onto them: ``x_j = X_k a_j`` with
        ``a_j`` from X'WX."""
        keep = np.asarray(keep, dtype=np.int64)
        shift = self.shift.copy()
        dropped = np.setdiff1d(np.arange(len(shift)), keep)
        if len(dropped) and np.any(shift[dropped] != 0):
            xx = np.asarray(self.xx.toarray() if sp.issparse(self.xx) else self.xx)
            combination = np.linalg.lstsq(xx[np.ix_(keep, keep)], xx[np.ix_(keep, dropped)],
                                          rcond=None)[0]
            shift[keep] += combination @ shift[dropped]
        new_index = np.full(self.xy.shape[0], -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        zx = []
        for pairs, blocks in self.zx:
            kept = new_index[pairs[:, 1]] >= 0
            zx.append((np.column_stack([pairs[kept, 0], new_index[pairs[kept, 1]]]),
                       blocks[kept]))
        xx = self.xx[keep][:, keep]
        return dataclasses.replace(self, zx=zx, xx=xx, xy=self.xy[keep],
                                   x_nonzeros=self.x_nonzeros[keep], fixed_shift=shift[keep])


class DispersionCrossProducts:
    """Cross-products as functions of a residual model's γ (``W = w exp(−Dγ)``): rows
    with the same dispersion pattern share their weight's factor, so the cross-products
    of each group are computed once and combined per γ; without groups (a continuous
    dispersion covariate) they are recomputed from the rows. The shift β₀ of the
    response is that of the prior weights' fit, the same for every γ."""

    def __init__(self, design: Design, residual, base: CrossProducts):
        self.design, self.residual, self.base = design, residual, base
        self.prior = np.asarray(design.weights, dtype=np.float64)
        self.groups = None
        if residual.patterns is not None:
            self.groups = []
            for g in range(len(residual.patterns)):
                rows = np.flatnonzero(residual.group_codes == g)
                part = CrossProducts.from_design(_rows_of(design, rows), base.fixed_shift)
                self.groups.append(_aligned(part, base))
        self.gamma = None

    def at(self, gamma: np.ndarray) -> CrossProducts:
        gamma = np.asarray(gamma, dtype=np.float64)
        if self.groups is None:
            weights = self.residual.weights(self.prior, gamma)
            return CrossProducts.from_design(dataclasses.replace(self.design, weights=weights),
                                             self.base.fixed_shift)
        factors = np.exp(-self.residual.patterns @ gamma)
        parts = self.groups
        total = copy.deepcopy(parts[0])
        _scale_into(total, parts[0], factors[0], first=True)
        for part, factor in zip(parts[1:], factors[1:]):
            _scale_into(total, part, factor)
        total.sum_log_weights = float(sum(p.sum_log_weights + p.n_obs * np.log(f)
                                          for p, f in zip(parts, factors)))
        total.n_obs = self.base.n_obs
        total.response_scale = self.base.response_scale
        total.response_range = self.base.response_range
        return total


def _rows_of(design: Design, rows: np.ndarray) -> Design:
    """The design restricted to some rows (every level kept)."""
    terms = [dataclasses.replace(t, level_codes=t.level_codes[rows], z=t.z[rows])
             for t in design.terms]
    X = design.X[rows] if not sp.issparse(design.X) else design.X.tocsr()[rows].tocsc()
    return dataclasses.replace(design, y=design.y[rows], X=X, weights=design.weights[rows],
                               terms=terms, row_index=None)


def _aligned(part: CrossProducts, total: CrossProducts) -> CrossProducts:
    """A part's cross-products on the total's (level, level) and (level, column) pairs
    (zeros where the part has none), so that parts combine by adding arrays."""
    def align(pairs_blocks, total_pairs_blocks, n_cols):
        pairs, blocks = pairs_blocks
        total_pairs, total_blocks = total_pairs_blocks
        out = np.zeros_like(total_blocks)
        keys = total_pairs[:, 0].astype(np.int64) * n_cols + total_pairs[:, 1]
        position = np.searchsorted(keys, pairs[:, 0].astype(np.int64) * n_cols + pairs[:, 1])
        out[position] = blocks
        return total_pairs, out

    n_fixed = total.xy.shape[0]
    zx = [align(p, t, n_fixed) for p, t in zip(part.zx, total.zx)]
    crossed = {key: align(part.crossed[key], value, total.diagonal[key[1]].shape[0])
               for key, value in total.crossed.items()}
    return dataclasses.replace(part, zx=zx, crossed=crossed)


def _scale_into(total: CrossProducts, part: CrossProducts, factor: float,
                first: bool = False) -> None:
    """total (+)= factor · part, array by array (pairs already aligned)."""
    def update(target, source):
        if first:
            target[...] = factor * source
        else:
            target += factor * source

    for t in range(len(total.diagonal)):
        update(total.diagonal[t], part.diagonal[t])
        update(total.zy[t], part.zy[t])
        update(total.zx[t][1], part.zx[t][1])
    for key in total.crossed:
        update(total.crossed[key][1], part.crossed[key][1])
    if sp.issparse(total.xx):
        total.xx = factor * part.xx if first else total.xx + factor * part.xx
    else:
        update(total.xx, part.xx)
    update(total.xy, part.xy)
    total.yy = factor * part.yy if first else total.yy + factor * part.yy


def _frozen(values) -> np.ndarray:
    """``values`` as a C-contiguous float64 array, read-only: the cross-product kernels
    then see one type whatever the caller's array (Numba compiles, and in a new process
    loads, one machine code per read-only flag: InstEval's writable ``z`` loaded two
    more than the warm-up fit had, 7 ms)."""
    array = np.ascontiguousarray(values, dtype=np.float64).view()
    array.flags.writeable = False
    return array


def check_residual_variation(xp: CrossProducts, fixed_names) -> float:
    """A :class:`~henderson.errors.DataError` when the fixed effects fit the response
    exactly (a constant response, or y a combination of the covariates): no variance
    is left to estimate, and the objective would run to −inf. Returns the residual SD
    of the least-squares fit of the fixed effects (NaN for a sparse X)."""
    if sp.issparse(xp.xx) or not np.isfinite(xp.response_scale):
        return np.nan
    xx = np.asarray(xp.xx)
    beta = np.linalg.lstsq(xx, xp.xy, rcond=None)[0] if len(xx) else np.zeros(0)
    rss = float(xp.yy - beta @ xp.xy)
    floor = xp.n_obs * (1e-12 * xp.response_scale) ** 2
    if rss <= floor:
        names = list(fixed_names)
        low, high = xp.response_range
        what = "is constant" if low == high else \
            f"is fitted exactly by the fixed effects ({', '.join(names)})"
        raise DataError(f"the response {what}: there is no variation left for the "
                        "random effects and the residual")
    return float(np.sqrt(rss / max(xp.n_obs, 1)))


def response_shift(X, y: np.ndarray, weights: np.ndarray, fixed_names=(),
                   gram: np.ndarray | None = None) -> np.ndarray:
    """β₀ such that ``y − X β₀`` is small: the weighted least-squares fit of the fixed
    effects, refined once, on the columns that are not aliased among these rows (the
    others get 0, so that a column a chunked fit drops later carries no shift).

    Any β₀ gives the same model (β shifts by β₀); the closer to the fit, the smaller
    the shifted response and the less ``y'Wy − sol'·rhs`` cancels. A sparse X (fixed
    factors with thousands of levels) is shifted by the weighted mean of y on its
    intercept column, when it has one. ``gram`` is X'WX when the caller has it.
    """
    y = np.asarray(y, dtype=np.float64)
    p = X.shape[1]
    shift = np.zeros(p)
    if p == 0 or len(y) == 0:
        return shift
    if sp.issparse(X):
        if "(Intercept)" in fixed_names:
            shift[list(fixed_names).index("(Intercept)")] = float(
                np.sum(weights * y) / np.sum(weights))
        return shift
    X = np.asarray(X, dtype=np.float64)
    unit = bool(np.all(weights == 1.0))
    wX = X if unit else X * weights[:, None]
    if gram is None:  # X'WX, when the caller has not formed it already
        gram = X.T @ wX
    keep = np.array(independent_columns(gram), dtype=np.int64)
    if not len(keep):
        return shift
    try:
        factor = np.linalg.cholesky(gram[np.ix_(keep, keep)])
    except np.linalg.LinAlgError:
        return shift
    import scipy.linalg

    residual = y
    for _ in range(2):  # one refinement: the normal equations lose digits to κ(X'WX)
        # X'Wr of every column, then the kept ones: wX[:, keep] copied all of X
        step = scipy.linalg.cho_solve((factor, True), (wX.T @ residual)[keep])
        if not np.all(np.isfinite(step)):
            return shift
        shift[keep] += step
        residual = y - X @ shift
    return shift


def _add_pair_blocks(into, other, n_cols: int):
    """Sum two (pairs, blocks) lists whose pairs are sorted and unique: blocks of common
    pairs add, pairs only in ``other`` are inserted in order."""
    pairs, blocks = into
    other_pairs, other_blocks = other
    if pairs.shape == other_pairs.shape and np.array_equal(pairs, other_pairs):
        blocks += other_blocks
        return pairs, blocks
    keys = pairs[:, 0].astype(np.int64) * n_cols + pairs[:, 1]
    other_keys = other_pairs[:, 0].astype(np.int64) * n_cols + other_pairs[:, 1]
    position = np.searchsorted(keys, other_keys)
    found = position < len(keys)
    found[found] = keys[position[found]] == other_keys[found]
    blocks[position[found]] += other_blocks[found]
    new = ~found
    if new.any():
        pairs = np.insert(pairs, position[new], other_pairs[new], axis=0)
        blocks = np.insert(blocks, position[new], other_blocks[new], axis=0)
    return pairs, blocks


def _sparse_level_crossprod(codes, z, w, X, n_levels):
    """Nonzero (level, column) blocks of ``Z_t'WX`` for a sparse X."""
    n, k = z.shape
    indicator = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_levels, n))
    products = [(indicator @ sp.diags(w * z[:, a]) @ X).tocoo() for a in range(k)]
    p = X.shape[1]
    keys = np.concatenate([m.row.astype(np.int64) * p + m.col for m in products])
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    blocks = np.zeros((len(unique_keys), k, 1))
    start = 0
    for a, m in enumerate(products):
        np.add.at(blocks[:, a, 0], inverse[start:start + m.nnz], m.data)
        start += m.nnz
    pairs = np.column_stack([unique_keys // p, unique_keys % p])
    return pairs, blocks


# ---------------------------------------------------------------- pattern of C
@dataclass
class _Coordinates:
    """(row, col) in C, original order, of every cross-product entry that ``fill``
    writes: the level blocks of Z'WZ (``diagonal[t]``, (n_levels, k, k)), Z'WX
    (``zx[t]``) and crossed terms (``crossed[(t, s)]``), shaped as their blocks; and
    the lower triangle of X'WX (``xx``: rows, cols, values)."""

    diagonal: list
    zx: list
    crossed: dict
    xx: tuple

    @classmethod
    def of(cls, design: Design, xp: CrossProducts) -> "_Coordinates":
        q, p = design.n_random, design.n_fixed
        offsets = design.column_offsets()
        diagonal, zx = [], []
        for t, term in enumerate(design.terms):
            k = term.n_coefs
            diagonal.append(term.level_block_indices(offsets[t]))
            pairs, _ = xp.zx[t]
            level_cols = offsets[t] + pairs[:, 0][:, None, None] * k + np.arange(k)[None, :, None]
            zx.append((q + pairs[:, 1][:, None, None] + 0 * level_cols, level_cols))
        crossed = {}
        for (t, s), (pairs, blocks) in xp.crossed.items():
            kt, ks = design.terms[t].n_coefs, design.terms[s].n_coefs
            cols = offsets[t] + pairs[:, 0][:, None, None] * kt + np.arange(kt)[None, :, None]
            rows = offsets[s] + pairs[:, 1][:, None, None] * ks + np.arange(ks)[None, None, :]
            crossed[(t, s)] = (np.broadcast_to(rows, blocks.shape),
                               np.broadcast_to(cols, blocks.shape))
        if sp.issparse(xp.xx):
            xx_lower = sp.tril(xp.xx).tocoo()
            xx = (q + xx_lower.row, q + xx_lower.col, xx_lower.data)
        else:
            xr, xc = np.tril_indices(p)
            xx = (q + xr, q + xc, np.asarray(xp.xx)[xr, xc])
        return cls(diagonal, zx, crossed, xx)

    def pairs(self):
        """Every (rows, cols) pair of arrays."""
        yield from self.diagonal
        yield from self.zx
        yield from self.crossed.values()
        yield self.xx[:2]


def _ones_pattern(rows: np.ndarray, cols: np.ndarray, size: int) -> sp.csc_matrix:
    """The lower-triangle pattern (boolean CSC, duplicates merged) of some entries."""
    rows, cols = np.ravel(rows), np.ravel(cols)
    lower_rows, lower_cols = np.maximum(rows, cols), np.minimum(rows, cols)
    return sp.csc_matrix((np.ones(len(rows), dtype=bool), (lower_rows, lower_cols)),
                         shape=(size, size))


def _precision_lower(term) -> sp.csc_matrix:
    """The lower triangle of ``K_t⁻¹ ⊗ I_k`` (the levels' precision for each of the
    term's coefficients), CSC with sorted rows, without triplets of its entries."""
    precision = sp.csc_matrix(term.level_precision)
    if not precision.has_canonical_format:
        precision = precision.copy()
        precision.sum_duplicates()
    indptr, indices, data = kernels.lower_triangle(precision.indptr, precision.indices,
                                                   np.asarray(precision.data, dtype=np.float64))
    n = precision.shape[0]
    if len(indices) < np.iinfo(np.int32).max:
        indptr = indptr.astype(indices.dtype, copy=False)
    lower = sp.csc_matrix((data, indices, indptr), shape=(n, n), copy=False)
    lower.has_sorted_indices = True
    if term.n_coefs > 1:
        lower = sp.kron(lower, sp.identity(term.n_coefs, format="csc"), format="csc")
        lower.sort_indices()
    return lower


def _embedded_ones(piece: sp.csc_matrix, offset: int, size: int) -> sp.csc_matrix:
    """A square piece's pattern (boolean) placed at rows and columns offset.. of a
    size x size matrix; shares the piece's indices when the offset is 0."""
    m = piece.shape[0]
    indptr = np.concatenate([np.zeros(offset, dtype=piece.indptr.dtype), piece.indptr,
                             np.full(size - offset - m, piece.indptr[-1],
                                     dtype=piece.indptr.dtype)])
    indices = piece.indices + piece.indices.dtype.type(offset) if offset else piece.indices
    out = sp.csc_matrix((np.ones(piece.nnz, dtype=bool), indices, indptr),
                        shape=(size, size), copy=False)
    out.has_sorted_indices = piece.has_sorted_indices
    return out


def _lower_pattern(design: Design, coordinates: _Coordinates, size: int):
    """The pattern of C's lower triangle in the original order (boolean CSC, rows
    sorted) and, on it, the values of the level precisions ``P_t`` (the identity for a
    term without a known covariance; zeros elsewhere).

    The pieces (level blocks, Z'WX, crossed blocks, X'WX, each ``K_t⁻¹``) are added as
    sparse matrices of ones with int32 indices where they fit: a dense 20,000² block
    of H⁻¹ costs 5 bytes per entry here, where int64 keys sorted by ``np.unique``
    took ~75.
    """
    offsets = design.column_offsets()
    pattern = None
    precisions = []
    for rows, cols in coordinates.pairs():
        piece = _ones_pattern(rows, cols, size)
        pattern = piece if pattern is None else pattern + piece
    for t, term in enumerate(design.terms):
        if term.level_precision is None:  # the identity: on the level blocks' diagonal
            lower = sp.identity(term.n_columns, format="csc")
        else:
            lower = _precision_lower(term)
            pattern = pattern + _embedded_ones(lower, int(offsets[t]), size)
        precisions.append((int(offsets[t]), lower))
        del lower
    pattern.sum_duplicates()  # sorted rows (sums of canonical matrices already are)
    values = np.zeros(pattern.nnz)
    while precisions:
        offset, lower = precisions.pop()
        kernels.add_into_pattern(pattern.indptr, pattern.indices, offset, lower.indptr,
                                 lower.indices, lower.data, values)
        del lower
    return pattern, values


def _permuted_lower(lower: sp.csc_matrix, data: np.ndarray, new_position: np.ndarray):
    """The lower triangle of ``P A P'`` (CSC, rows sorted) from A's lower triangle,
    with ``data`` moved along; entry (i, j) of A goes to (new_position[i],
    new_position[j])."""
    indptr, indices, values = kernels.permute_lower(lower.indptr, lower.indices, data,
                                                    np.asarray(new_position, dtype=np.int64))
    if len(indices) < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
        indices = indices.astype(np.int32, copy=False)
    else:
        indices = indices.astype(np.int64, copy=False)
    out = sp.csc_matrix((values, indices, indptr), shape=lower.shape, copy=False)
    out.has_sorted_indices = True
    return out


#: a fixed-effect column with nonzeros in more than this fraction of rows is dense
DENSE_COLUMN_FRACTION = 0.1


#: above this many random effects, orderings are not timed: the natural ordering is
#: taken when its dense Schur complement is small (crossed designs), AMD otherwise.
#: METIS is never taken unmeasured: on a 300k-animal pedigree with herds it gave
#: 416 GFlop factorisations against AMD's 2.9.
MEASURE_ORDERINGS_LIMIT = 200_000
#: nor when the random-effect block of C has more than this many entries in its lower
#: triangle: a trial factorisation then costs seconds to minutes, and each candidate
#: took two (10M movie ratings, 70,000 x 10,000 levels: ~8M entries, the timing of
#: natural, AMD and METIS ran for more than 10 minutes and chose natural)
MEASURE_ORDERINGS_ENTRIES = 2_000_000
#: the natural ordering is a candidate only when the dense Schur complement it implies
#: (all terms but the first) stays below this many bytes
NATURAL_SCHUR_BYTES = 1 << 30


def _ordering_candidates(design: Design, xp: CrossProducts, ordering: str,
                         include_fixed: bool = False, lower: sp.csc_matrix | None = None):
    """Fill-reducing orderings to choose from: of the random-effect block, or of all
    of C when the fixed effects are sparse and belong in the ordering (a fixed factor
    with thousands of levels placed last would make a dense trailing block).

    ``lower`` is the pattern of C's lower triangle in the original order
    (:func:`_lower_pattern`); the pattern ordered is its block on the random effects
    and the fixed effects in the ordering, not built a second time."""
    q = design.n_random
    # dense fixed columns (intercept, sex, ...) touch most rows: they go last, outside
    # the ordering (they only slow AMD/METIS down: 44 s vs 3 s at 1M animals)
    ordered_fixed = np.zeros(0, dtype=np.int64)
    if include_fixed:
        density = xp.x_nonzeros / max(xp.n_obs, 1)
        ordered_fixed = np.flatnonzero(density <= DENSE_COLUMN_FRACTION)
    trailing_fixed = np.setdiff1d(np.arange(design.n_fixed), ordered_fixed) if include_fixed \
        else np.zeros(0, dtype=np.int64)
    size = q + len(ordered_fixed)
    natural = np.arange(size, dtype=np.int64)

    def to_original(perm):
        original = np.concatenate([np.arange(q), q + ordered_fixed])[perm]
        return np.concatenate([original, q + trailing_fixed]).astype(np.int64)

    has_precision = any(t.level_precision is not None for t in design.terms)
    if ordering == "natural" or (ordering == "auto" and len(design.terms) == 1
                                 and not has_precision):
        return {"natural": to_original(natural)}
    trailing = size - design.terms[0].n_columns
    natural_ok = not has_precision and 4.0 * trailing ** 2 < NATURAL_SCHUR_BYTES
    entries = int(lower.indptr[q]) if lower is not None else 0
    too_large = size > MEASURE_ORDERINGS_LIMIT or entries > MEASURE_ORDERINGS_ENTRIES
    if ordering == "auto" and too_large and natural_ok:
        return {"natural": to_original(natural)}
    # a diagonally dominant matrix with the pattern of C_zz (and of the fixed effects
    # in the ordering), to let CHOLMOD order it
    if len(ordered_fixed):
        keep = np.concatenate([np.arange(q), q + ordered_fixed])
        block = lower[keep][:, keep] + sp.identity(size, dtype=bool, format="csc")
    else:
        block = lower[:q, :q]
    block.sum_duplicates()
    indptr, indices = block.indptr, block.indices
    del block
    values = -np.ones(len(indices))
    degree = np.bincount(indices, minlength=size) + np.diff(indptr)
    diag_pos = indptr[:-1]  # the diagonal is the first entry of each column
    values[diag_pos] = degree + 1.0
    del degree
    pattern = sp.csc_matrix((values, indices, indptr), shape=(size, size), copy=False)
    del values, indices, indptr
    if ordering == "auto" and too_large:
        methods = ["amd"]
    else:
        methods = ["amd", "metis"] if ordering == "auto" else [ordering]
    candidates = {"natural": natural} if ordering == "auto" and natural_ok else {}
    for method in methods:
        try:
            factor = cholmod_analyze(pattern, ordering=method)
        except Exception:  # METIS may be missing from the SuiteSparse build
            continue
        candidates[method] = cholmod_permutation(factor)
    if len(candidates) == 1:
        return {name: to_original(perm) for name, perm in candidates.items()}
    candidates["_pattern"] = (pattern, to_original)
    return candidates


def _factor_cost(pattern: sp.csc_matrix, perm: np.ndarray) -> tuple[float, int]:
    """Measured seconds of a numeric factorisation of the permuted pattern (best of
    two) and nnz(L): orderings are chosen by what they cost, not by fill alone
    (on InstEval METIS gives the fewest nonzeros but AMD the fastest factor)."""
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    permuted = _permuted_lower(pattern, pattern.data, inverse)
    factor = cholmod_analyze(permuted, ordering="natural")
    seconds = np.inf
    for _ in range(2):
        start = time.perf_counter()
        cholmod_refactor(factor, permuted)
        seconds = min(seconds, time.perf_counter() - start)
    return seconds, cholmod_lower_factor(factor).nnz


# ---------------------------------------------------------------- the equations
class MixedModelEquations:
    """The pattern of C, its symbolic CHOLMOD factor and the θ → C(θ) update.

    Parameters
    ----------
    design : Design
    ordering : {"auto", "natural", "amd", "metis"}
        Fill-reducing ordering of the random-effect block. ``"auto"`` factors the
        pattern under each candidate once and keeps the one with the fewest nonzeros
        in L. Fixed effects always come last.
    crossproducts : CrossProducts, optional
        Cross-products accumulated elsewhere (chunked and Dask fits, whose design
        has no rows); by default computed from the design's rows.

    Examples
    --------
    >>> import henderson as hd
    >>> from henderson.design import build_design
    >>> d = build_design("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    >>> mme = MixedModelEquations(d)
    >>> mme.factorize(d.theta_start())
    >>> round(mme.logdet(), 4) > 0
    True
    """

    #: fixed effects up to this many dense columns are eliminated densely (lme4's
    #: R_ZX / R_X); beyond, they stay inside the sparse factor.
    DENSE_FIXED_LIMIT = DENSE_FIXED_LIMIT

    def __init__(self, design: Design, ordering: str = "auto", mode: str = "auto",
                 strategy: str = "cholmod", dense_fixed: bool | None = None,
                 crossproducts: CrossProducts | None = None):
        start = time.perf_counter()
        self.design = design
        if crossproducts is None:
            design.require_rows("building the cross-products")
            crossproducts = CrossProducts.from_design(design)
        self.xp = crossproducts
        self.timings = {"crossproducts": time.perf_counter() - start}
        start = time.perf_counter()
        q, p = design.n_random, design.n_fixed
        self.n_random, self.n_fixed, self.size = q, p, q + p
        if strategy not in ("cholmod", "schur"):
            raise ValueError(f"strategy must be 'cholmod' or 'schur', got {strategy!r}")
        if strategy == "schur":  # the first term's levels first, as they are eliminated
            ordering, dense_fixed = "natural", True
        # CHOLMOD spends far more on a few dense rows at the end of C than their flops
        # (InstEval: 120 ms vs 43 ms + 11 ms for the dense route), so small dense X is
        # eliminated densely, as lme4 does, and only C_zz goes to CHOLMOD. A large or
        # sparse X stays in the sparse factor and in the fill-reducing ordering.
        if dense_fixed is None:
            dense_fixed = p <= self.DENSE_FIXED_LIMIT and not sp.issparse(design.X)
        self.dense_fixed = dense_fixed
        coordinates = _Coordinates.of(design, self.xp)
        lower, precision_values = _lower_pattern(design, coordinates, self.size)
        candidates = _ordering_candidates(design, self.xp, ordering,
                                          include_fixed=not dense_fixed, lower=lower)
        pattern_and_map = candidates.pop("_pattern", None)
        self.ordering_costs: dict[str, tuple[float, int]] = {}
        if pattern_and_map is not None:
            pattern, to_original = pattern_and_map
            for name, perm in candidates.items():
                self.ordering_costs[name] = _factor_cost(pattern, perm)
            self.ordering = min(self.ordering_costs, key=lambda k: self.ordering_costs[k][0])
            self.perm = to_original(candidates[self.ordering])
            del pattern, pattern_and_map
        else:
            self.ordering = next(iter(candidates))
            self.perm = candidates[self.ordering]
        del candidates
        if dense_fixed:
            self.perm = np.concatenate([self.perm, q + np.arange(p, dtype=np.int64)])
        self.inverse_perm = np.empty_like(self.perm)
        self.inverse_perm[self.perm] = np.arange(self.size)
        # C's lower triangle in the fill-reducing order, the precisions' values on it;
        # the original-order pattern goes before the numeric arrays are made
        self.matrix = _permuted_lower(lower, precision_values, self.inverse_perm)
        del lower, precision_values
        self._build_pattern(coordinates)
        self.timings["pattern"] = time.perf_counter() - start
        start = time.perf_counter()
        self.timings["numeric"] = 0.0
        self.n_factorizations = 0
        self.theta = None
        self._factors_cache = None
        if strategy == "schur":
            self.factorization = BlockElimination(self)
            self.ordering = "schur"
        elif dense_fixed:
            self.factorization = DenseFixedBlock(self, mode)
        else:
            self.factorization = SparseCholesky(self, mode)
        self.timings["symbolic"] = time.perf_counter() - start

    # -- pattern
    @property
    def indptr(self) -> np.ndarray:
        """Column pointers of C's lower triangle (permuted order)."""
        return self.matrix.indptr

    @property
    def indices(self) -> np.ndarray:
        """Row indices of C's lower triangle (permuted order, sorted in each column)."""
        return self.matrix.indices

    def _build_pattern(self, coordinates: _Coordinates) -> None:
        """Where each cross-product entry goes in ``C.data``, and the values that do
        not depend on θ (the precisions, already in ``matrix.data``, and X'WX)."""
        design, xp = self.design, self.xp
        matrix = self.matrix
        self.constant_data = matrix.data
        matrix.data = np.zeros(matrix.nnz)

        def slots(rows, cols):
            rows = self.inverse_perm[np.ravel(rows)]
            cols = self.inverse_perm[np.ravel(cols)]
            return kernels.pattern_positions(matrix.indptr, matrix.indices,
                                             np.maximum(rows, cols), np.minimum(rows, cols))

        xr, xc, xx_values = coordinates.xx
        self._xx_slots, self._xx_index = slots(xr, xc), (xr - self.n_random, xc - self.n_random)
        np.add.at(self.constant_data, self._xx_slots, xx_values)
        self.diag_positions = []
        for t, term in enumerate(design.terms):
            k = term.n_coefs
            pos = slots(*coordinates.diagonal[t]).reshape(term.n_levels, k, k)
            pos[:, np.triu_indices(k, 1)[0], np.triu_indices(k, 1)[1]] = -1
            self.diag_positions.append(pos)
        self.zx_positions = [slots(*coordinates.zx[t]).reshape(xp.zx[t][1].shape)
                             for t in range(len(design.terms))]
        self.cross_positions = {key: slots(*coordinates.crossed[key]).reshape(
            xp.crossed[key][1].shape) for key in xp.crossed}

    def split_pattern(self) -> None:
        """Index maps from C's entries to C_zz (CSC), C_xz (dense) and C_xx (dense),
        made once (the factorisations that need them call this).

        Works in the permuted coordinates; random and fixed positions may interleave
        (sparse X ordered with the rest), the order among random positions is kept.
        """
        if hasattr(self, "random_matrix"):
            return
        q = self.n_random
        cols = np.repeat(np.arange(self.size), np.diff(self.indptr))
        rows = self.indices
        is_random = self.perm < q                       # by permuted position
        rank = np.cumsum(is_random) - 1                 # position within C_zz
        original = self.perm                            # permuted position -> original
        zz = is_random[cols] & is_random[rows]
        self.zz_take = np.flatnonzero(zz)
        zz_cols = rank[cols[zz]]
        zz_indptr = np.concatenate([[0], np.cumsum(np.bincount(zz_cols, minlength=q))])
        self.random_matrix = sp.csc_matrix(
            (np.zeros(len(self.zz_take)), rank[rows[zz]].astype(self.matrix.indices.dtype),
             zz_indptr.astype(self.matrix.indptr.dtype)), shape=(q, q))
        # C_xz entries (either triangle) with the random index in C_zz's order
        xz = is_random[cols] != is_random[rows]
        random_side = np.where(is_random[cols[xz]], cols[xz], rows[xz])
        fixed_side = np.where(is_random[cols[xz]], rows[xz], cols[xz])
        self.xz_take = np.flatnonzero(xz)
        self.xz_cols = rank[random_side]
        self.xz_rows = original[fixed_side] - q
        xx = ~is_random[cols] & ~is_random[rows]
        self.xx_take = np.flatnonzero(xx)
        a, b = original[rows[xx]] - q, original[cols[xx]] - q
        self.xx_rows, self.xx_cols = np.maximum(a, b), np.minimum(a, b)
        # C_zz's own order maps to original random indices
        self.random_perm = original[is_random]

    def with_private_workspace(self) -> MixedModelEquations:
        """A shallow copy that shares the pattern and the symbolic analysis but owns
        its numeric workspace (C's values and the numeric factor), so that copies can
        be refactored at other θ, in threads, without touching this one."""
        clone = copy.copy(self)
        clone.matrix = self.matrix.copy()
        clone.timings = dict(self.timings)
        if hasattr(self, "random_matrix"):
            clone.random_matrix = self.random_matrix.copy()
        clone.factorization = self.factorization.private_copy(clone)
        return clone

    def set_crossproducts(self, crossproducts: CrossProducts) -> None:
        """Cross-products of the same rows and pattern with other weights (a residual
        model's W(γ)); the factor is refreshed at the next :meth:`factorize`."""
        self.xp = crossproducts
        rows, cols = self._xx_index
        xx = crossproducts.xx
        values = np.asarray(xx.tocsr()[rows, cols]).ravel() if sp.issparse(xx) else xx[rows, cols]
        # X'WX's slots hold nothing else (the precisions are in the random block)
        self.constant_data[self._xx_slots] = 0.0
        np.add.at(self.constant_data, self._xx_slots, values)
        self.theta = None

    # -- values
    def relative_factors(self, theta: np.ndarray) -> list[np.ndarray]:
        """Each term's Λ_t at θ (new arrays, the caller's to keep)."""
        return [term.relative_factor(theta[sl])
                for term, sl in zip(self.design.terms, self.design.theta_slices())]

    def _factors_at(self, theta: np.ndarray) -> list[np.ndarray]:
        """Λ_t at θ, built once per θ and shared by :meth:`fill` and :meth:`rhs` (read,
        never written): building them twice per evaluation was a fifth of an
        evaluation of a small model's objective."""
        key = np.asarray(theta, dtype=np.float64).tobytes()
        if self._factors_cache is None or self._factors_cache[0] != key:
            self._factors_cache = (key, self.relative_factors(theta))
        return self._factors_cache[1]

    def fill(self, theta: np.ndarray) -> None:
        """Write the values of C(θ) into ``self.matrix.data``."""
        lams = self._factors_at(theta)
        data = self.matrix.data
        data[:] = self.constant_data
        xp = self.xp
        for t, lam in enumerate(lams):
            kernels.scatter_blocks(lam, xp.diagonal[t], lam, self.diag_positions[t], data)
            if self.n_fixed:
                kernels.scatter_blocks(lam, xp.zx[t][1], _ONE, self.zx_positions[t], data)
        for (t, s), (_, blocks) in xp.crossed.items():
            kernels.scatter_blocks(lams[t], blocks, lams[s], self.cross_positions[(t, s)], data)

    def multiply(self, vector: np.ndarray) -> np.ndarray:
        """``C(θ) v`` (original order) at the θ of the last :meth:`fill`, from the lower
        triangle held in ``matrix``."""
        lower = self.matrix
        permuted = np.asarray(vector, dtype=np.float64)[self.perm]
        product = lower @ permuted + lower.T @ permuted - lower.diagonal() * permuted
        out = np.empty_like(product)
        out[self.perm] = product
        return out

    def rhs(self, theta: np.ndarray) -> np.ndarray:
        """``[Λ'Z'Wy; X'Wy]`` in the original (unpermuted) order."""
        parts = []
        for lam, zy in zip(self._factors_at(theta), self.xp.zy):
            parts.append((zy @ lam).ravel())  # row l: (Λ' zy_l)' = zy_l' Λ
        parts.append(self.xp.xy)
        return np.concatenate(parts)

    def factorize(self, theta: np.ndarray) -> None:
        """Refresh the numeric factor for a new θ (symbolic analysis is reused).

        A call with the θ the factor already holds does nothing: C depends on θ only,
        and callers (AI-REML after its line search, the results after the optimiser)
        often ask again for the point they just evaluated."""
        theta = np.asarray(theta, dtype=np.float64)
        if self.theta is not None and np.array_equal(theta, self.theta):
            return
        self.theta = None  # until this factorisation succeeds
        if not np.all(np.isfinite(theta)):
            # CHOLMOD factors a NaN matrix without complaint and every result is NaN
            raise NotPositiveDefiniteError(f"C(θ) is not defined at θ={theta}")
        start = time.perf_counter()
        self.fill(theta)
        try:
            self.factorization.factorize()
        except Exception as exc:
            raise NotPositiveDefiniteError(
                f"C(θ) is not positive definite at θ={theta}: {exc}") from exc
        self.theta = theta.copy()
        self.n_factorizations += 1
        self.timings["numeric"] += time.perf_counter() - start

    # -- the factor's uses: every one is the factorisation's (factor.py)
    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Solve ``C x = rhs`` (rhs in original order; vector or matrix)."""
        return self.factorization.solve(np.asarray(rhs, dtype=np.float64))

    def logdet(self) -> float:
        """``log|C(θ)|``."""
        return self.factorization.logdet()

    def logdet_random(self) -> float:
        """``log|C_zz(θ)|`` (ML needs it)."""
        return self.factorization.logdet_random()

    def fixed_block_inverse(self) -> np.ndarray:
        """``(C⁻¹)_ββ``."""
        return self.factorization.fixed_block_inverse()

    def lower_factor(self, random_block_only: bool = False) -> sp.csc_matrix:
        """The Cholesky factor L of the permuted C (or of C_zz), where there is one."""
        return self.factorization.lower_factor(random_block_only)

    def selected_inverse(self, random_block_only: bool = False):
        """``C⁻¹`` (or ``C_zz⁻¹``) where the gradient and PEVs need it."""
        return self.factorization.selected_inverse(random_block_only)

    def inverse_diagonal(self, random_block_only: bool = False) -> np.ndarray:
        """The diagonal of ``C⁻¹`` (or ``C_zz⁻¹``) on the random effects, original order."""
        return self.factorization.inverse_diagonal(random_block_only)

    def inverse_level_blocks(self, random_block_only: bool = False) -> list[np.ndarray]:
        """Per random term, the k x k diagonal blocks of ``C⁻¹`` (or ``C_zz⁻¹``), one per
        level: shape (n_levels, k, k), original order. The block elimination forms
        only these; otherwise they are read off the selected inverse."""
        own = getattr(self.factorization, "inverse_level_blocks", None)
        if own is not None:
            return own(random_block_only)
        selected = self.selected_inverse(random_block_only)
        offsets = self.design.column_offsets()
        blocks = []
        for t, term in enumerate(self.design.terms):
            rows, cols = term.level_block_indices(offsets[t])
            blocks.append(selected.entries(rows.ravel(), cols.ravel()).reshape(rows.shape))
        return blocks

    def inverse_entries(self, selected, rows, cols) -> np.ndarray:
        """Entries of a selected inverse at original (unpermuted) coordinates."""
        return selected.entries(rows, cols)
