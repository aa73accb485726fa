"""Genome-wide association scans on one null mixed model.

``y = Xβ + g + e`` with ``g ~ N(0, σ² h² K)`` and ``e ~ N(0, σ² (1 − h²) I)``: the
null model (the formula's covariates, a random effect of every genotyped person with
the GRM ``K``) is fitted once, then every variant is tested as an extra fixed effect
with the variance ratio held at the null estimate (``wald``, ``score``) or re-fitted
(``lrt``). This module owns that stage: matching rows to genotypes, the null fit, the
whitening of genotype blocks (an eigendecomposition of a dense K, a sparse Cholesky of
``h² K + (1 − h²) I`` for a sparse one) and the per-variant statistics.

Every per-variant quantity is a dot product of whitened vectors: with ``W = H⁻¹``
and ``H = h² K + (1 − h²) I``, ``g'Pg = g'Wg − g'WX (X'WX)⁻¹ X'Wg`` and likewise
``g'Py``; ``beta = g'Py / g'Pg``.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from .errors import DataError, FormulaError
from .linalg import tridiagonal_reduction
from .plink import bed_count
from .threads import (active_threads, available_memory, blas_threads, check_threads,
                      dense_blas_threads, fit_threads)

TESTS = ("wald", "score", "lrt")
#: the largest h² searched: beyond it H is within 1e-6 of a singular K (GEMMA's bound
#: on λ = σ_g²/σ_e² is 1e5, the same place)
MAX_H2 = 1.0 - 1e-6
#: the null h² is converged to this (the REML curve is flat: Δh² 1e-3 moves betas
#: by ~1e-3 standard errors, so a loose h² is a visible error in p-values)
H2_TOLERANCE = 1e-9
#: progress lines on stderr once a scan has run this long, then at this interval
PROGRESS_SECONDS = 10.0


# ----------------------------------------------------------------------- the inputs
@dataclass
class Phenotype:
    """One response with its covariates, on the rows that have both and genotypes."""
    name: str
    y: np.ndarray                # (n,)
    X: np.ndarray                # (n, p)
    sample_rows: np.ndarray      # positions in genotypes.samples
    has_intercept: bool


def _covariates(rhs: str, frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    from .design import _drop_aliased, _model_matrix

    X, names, _ = _model_matrix(rhs, frame)
    X, names, dropped = _drop_aliased(X, names)
    if dropped:
        warnings.warn(f"covariates aliased with earlier ones are left out: {', '.join(dropped)}",
                      UserWarning, stacklevel=4)
    return X, names


def phenotypes(formula: str, data: pd.DataFrame, genotypes, id: str) -> list[Phenotype]:
    """The responses of ``formula`` (``cbind(y1, y2) ~ ...`` for several), each on the
    rows of ``data`` with a response, the covariates and a genotyped ``id``."""
    from .design import spec_variables
    from .multivariate import split_responses

    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    names, rhs = split_responses(formula)
    if "|" in rhs:
        raise FormulaError(f"formula {formula!r}: a scan's formula has covariates only; the "
                           "random effect of the id with the GRM is added by gwas()")
    if id not in data.columns:
        raise DataError(f"id column {id!r} is not in the data (columns: "
                        f"{', '.join(map(str, data.columns[:10]))})")
    covariates = spec_variables(rhs, data.columns)
    absent = [c for c in names + covariates if c not in data.columns]
    if absent:
        raise DataError(f"column(s) {', '.join(map(repr, absent))} not in the data")
    ids = data[id].astype(str)
    if ids.duplicated().any():
        raise DataError(f"id {id!r} repeats {ids[ids.duplicated()].iloc[0]!r}: a scan takes one "
                        "row per genotyped person")
    sample_of = pd.Index(genotypes.samples["iid"].astype(str))
    position = sample_of.get_indexer(ids)
    ungenotyped = int((position < 0).sum())
    if ungenotyped == len(data):
        raise DataError(f"none of the {len(data)} ids in {id!r} is among the genotyped samples "
                        f"(e.g. {ids.iloc[0]!r} vs {sample_of[0]!r})")
    if ungenotyped:
        warnings.warn(f"{ungenotyped} row(s) whose {id!r} has no genotypes are left out "
                      f"(first: {ids[position < 0].iloc[0]!r})", UserWarning, stacklevel=3)
    result = []
    for name in names:
        column = data[name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"response {name!r} must be numeric")
        usable = (position >= 0) & column.notna().to_numpy() & np.isfinite(
            column.to_numpy(dtype=float, na_value=np.nan))
        if covariates:
            usable &= data[covariates].notna().all(axis=1).to_numpy()
        if usable.sum() < 3:
            raise DataError(f"response {name!r} has {int(usable.sum())} usable row(s)")
        frame = data.loc[usable]
        X, columns = _covariates(rhs, frame)
        y = frame[name].to_numpy(dtype=np.float64)
        if X.shape[1] >= len(y) - 1:
            raise DataError(f"response {name!r}: {len(y)} rows for {X.shape[1]} covariates "
                            "and a variant")
        result.append(Phenotype(name, y, X, position[usable], "(Intercept)" in columns))
    return result


# ----------------------------------------------------------------------- null models
def _profile(h2: float, s: np.ndarray, yr: np.ndarray, Xr: np.ndarray, reml: bool):
    """−2 log-likelihood (ML or REML) profiled over β and σ², at variance ratio h², from
    the rotated response ``yr = U'y``, covariates ``Xr = U'X`` and eigenvalues ``s``."""
    n, p = Xr.shape
    diagonal = h2 * s + (1.0 - h2)
    if not np.all(diagonal > 0):
        return np.inf
    w = 1.0 / diagonal
    XtWX = (Xr * w[:, None]).T @ Xr
    XtWy = (Xr * w[:, None]).T @ yr
    try:
        factor = scipy.linalg.cho_factor(XtWX, lower=True)
    except np.linalg.LinAlgError:
        return np.inf
    beta = scipy.linalg.cho_solve(factor, XtWy)
    rss = float(yr @ (w * yr) - XtWy @ beta)
    if not rss > 0:
        return np.inf
    logdet = float(np.sum(np.log(diagonal)))
    dof = n - p if reml else n
    value = dof * (math.log(2 * math.pi * rss / dof) + 1.0) + logdet
    if reml:
        value += 2.0 * float(np.sum(np.log(np.diag(factor[0]))))
    return value


def fit_variance_ratio(criterion, upper: float = MAX_H2) -> tuple[float, float]:
    """The h² in [0, upper] minimising ``criterion`` (−2 log-likelihood): a grid of 61
    points (dense near 1), then bounded Brent between the best point's neighbours to
    :data:`H2_TOLERANCE`. Returns ``(h2, value)``."""
    import scipy.optimize

    grid = np.concatenate([[0.0], 1.0 - np.geomspace(1.0, 1.0 - upper, 40)[1:], [upper]])
    grid = np.unique(np.clip(np.concatenate([grid, np.linspace(0, upper, 21)]), 0, upper))
    values = np.array([criterion(h) for h in grid])
    if not np.isfinite(values).any():
        raise DataError("the null model's likelihood is not finite at any variance ratio "
                        "(are the covariates collinear with the GRM's null space?)")
    best = int(np.nanargmin(values))
    lower_h, upper_h = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    result = scipy.optimize.minimize_scalar(criterion, bounds=(lower_h, upper_h),
                                            method="bounded",
                                            options={"xatol": H2_TOLERANCE, "maxiter": 500})
    if result.fun <= values[best]:
        return float(result.x), float(result.fun)
    return float(grid[best]), float(values[best])


@dataclass
class NullFit:
    """A phenotype's null model: the variance ratio and what the tests reuse."""
    phenotype: Phenotype
    h2: float
    objective: float               # −2 log-likelihood (REML or ML) at h2
    reml: bool
    weights: np.ndarray | None     # 1 / (h² s + 1 − h²) (eigen route)
    yw: np.ndarray                 # whitened y
    Xw: np.ndarray                 # whitened X
    chromosome: str = "all"
    sigma2: float = field(init=False)
    XtX_factor: tuple = field(init=False, repr=False)
    Xty: np.ndarray = field(init=False, repr=False)
    yPy: float = field(init=False)

    def __post_init__(self):
        XtX = self.Xw.T @ self.Xw
        self.XtX_factor = scipy.linalg.cho_factor(XtX, lower=True)
        self.Xty = self.Xw.T @ self.yw
        beta = scipy.linalg.cho_solve(self.XtX_factor, self.Xty)
        self.yPy = float(self.yw @ self.yw - self.Xty @ beta)
        n, p = self.Xw.shape
        self.sigma2 = self.yPy / ((n - p) if self.reml else n)

    def summary_row(self) -> dict:
        n, p = self.Xw.shape
        return {"phenotype": self.phenotype.name, "chrom": self.chromosome, "n": n,
                "covariates": p, "h2": self.h2,
                "genetic_variance": self.sigma2 * self.h2,
                "residual_variance": self.sigma2 * (1.0 - self.h2),
                "criterion": "REML" if self.reml else "ML", "objective": self.objective}


class EigenSpace:
    """A dense K over a set of samples, eigendecomposed once: ``K = U diag(s) U'``.
    Every phenotype on these samples is rotated by the same ``U``."""

    def __init__(self, K: np.ndarray, rotate_dtype=np.float64):
        # not clipped: a thresholded (sparse) GRM may be indefinite, and then only the
        # h² where h² s + 1 − h² > 0 for every eigenvalue are admissible (as in the
        # sparse route, whose Cholesky fails beyond them)
        with blas_threads(1):  # its tridiagonal reduction is memory-bound
            self.s, self.U = scipy.linalg.eigh(K, driver="evd", overwrite_a=False)
        self._U_rotate = self.U.astype(rotate_dtype, copy=False)

    def rotate(self, block: np.ndarray) -> np.ndarray:
        """``U' block`` in float64 (the product in the space's rotation precision)."""
        out = self._U_rotate.T @ block.astype(self._U_rotate.dtype, copy=False)
        return out.astype(np.float64, copy=False)

    def fit(self, phenotype: Phenotype, reml: bool, chromosome: str = "all") -> NullFit:
        yr, Xr = self.U.T @ phenotype.y, self.U.T @ phenotype.X
        h2, value = fit_variance_ratio(lambda h: _profile(h, self.s, yr, Xr, reml))
        _warn_ml_bound(phenotype, h2, reml)
        w = 1.0 / (h2 * self.s + (1.0 - h2))
        root = np.sqrt(w)
        return NullFit(phenotype, h2, value, reml, w, root * yr, Xr * root[:, None],
                       chromosome=chromosome)


@numba.njit(cache=True)
def _apply_reflectors(reflectors, tau, R):
    """``Q' R`` for the Q of LAPACK's ``?sytrd`` (lower): Q = H(1) ... H(n−1) with
    H(i) = I − tau_i v v', v = (0, ..., 0, 1, reflectors[i+2:, i])."""
    n, q = R.shape
    out = R.copy()
    for i in range(n - 1):
        t = tau[i]
        if t == 0.0:
            continue
        for c in range(q):
            dot = out[i + 1, c]
            for r in range(i + 2, n):
                dot += reflectors[r, i] * out[r, c]
            dot *= t
            out[i + 1, c] -= dot
            for r in range(i + 2, n):
                out[r, c] -= dot * reflectors[r, i]
    return out


@numba.njit(cache=True)
def _tridiagonal_forms(h2, diagonal, offdiagonal, R):
    """``log|M|`` and ``R' M⁻¹ R`` for the tridiagonal ``M = h² T + (1 − h²) I``
    (``T`` = tridiag(offdiagonal, diagonal, offdiagonal)) by its LDL' factors; the log
    determinant is +inf when M is not positive definite."""
    n, q = R.shape
    pivots = np.empty(n)
    multipliers = np.empty(n)
    logdet = 0.0
    for i in range(n):
        a = h2 * diagonal[i] + (1.0 - h2)
        if i > 0:
            b = h2 * offdiagonal[i - 1]
            multipliers[i] = b / pivots[i - 1]
            a -= multipliers[i] * b
        if not a > 0.0:
            return np.inf, np.zeros((q, q))
        pivots[i] = a
        logdet += math.log(a)
    # forward solve L z = R, then R' M⁻¹ R = z' D⁻¹ z
    z = R.copy()
    for i in range(1, n):
        for c in range(q):
            z[i, c] -= multipliers[i] * z[i - 1, c]
    forms = np.zeros((q, q))
    for i in range(n):
        for a_ in range(q):
            scaled = z[i, a_] / pivots[i]
            for b_ in range(a_ + 1):
                forms[a_, b_] += scaled * z[i, b_]
    for a_ in range(q):
        for b_ in range(a_):
            forms[b_, a_] = forms[a_, b_]
    return logdet, forms


@numba.njit(cache=True)
def _profile_from_forms(logdet, forms, n, reml):
    """−2 log-likelihood from ``log|H|`` and the forms ``[y X]' H⁻¹ [y X]`` (a p x p
    Cholesky in Numba: LAPACK's call overhead on a 4 x 4 matrix is most of a null
    fit's time on a busy machine)."""
    if not np.isfinite(logdet):
        return np.inf
    p = forms.shape[0] - 1
    L = np.zeros((p, p))
    log_det_xx = 0.0
    for j in range(p):
        total = forms[1 + j, 1 + j]
        for k in range(j):
            total -= L[j, k] * L[j, k]
        if not total > 1e-300:
            return np.inf
        L[j, j] = math.sqrt(total)
        log_det_xx += 2.0 * math.log(L[j, j])
        for i in range(j + 1, p):
            total = forms[1 + i, 1 + j]
            for k in range(j):
                total -= L[i, k] * L[j, k]
            L[i, j] = total / L[j, j]
    rss = forms[0, 0]
    z = np.zeros(p)
    for i in range(p):
        total = forms[1 + i, 0]
        for k in range(i):
            total -= L[i, k] * z[k]
        z[i] = total / L[i, i]
        rss -= z[i] * z[i]
    if not rss > 0.0:
        return np.inf
    dof = n - p if reml else n
    value = dof * (math.log(2.0 * math.pi * rss / dof) + 1.0) + logdet
    if reml:
        value += log_det_xx
    return value


class DenseSpace:
    """A dense K for one phenotype at a time: the null fit on a tridiagonal reduction
    ``K = Q T Q'`` (LAPACK ``?sytrd``, a third of an eigendecomposition's work; every
    likelihood evaluation is then O(n)), the variants whitened by the Cholesky factor
    of ``H = h² K + (1 − h²) I`` at the fitted h² (a triangular solve: half the work
    of a rotation by eigenvectors)."""

    def __init__(self, K: np.ndarray, rotate_dtype=np.float64, reduction=None):
        self.K = np.asarray(K, dtype=np.float64)
        self.n = len(self.K)
        self.rotate_dtype = rotate_dtype
        if reduction is None:  # else given by reduce_side_by_side
            with blas_threads(1):  # memory-bound: see henderson.threads
                reduction = tridiagonal_reduction(self.K)
        self._reflectors, self._diagonal, self._offdiagonal, self._tau = reduction

    def fit(self, phenotype: Phenotype, reml: bool, chromosome: str = "all") -> NullFit:
        R = _apply_reflectors(self._reflectors, self._tau,
                              np.column_stack([phenotype.y, phenotype.X]))
        n = self.n

        def criterion(h2):
            logdet, forms = _tridiagonal_forms(h2, self._diagonal, self._offdiagonal, R)
            return _profile_from_forms(logdet, forms, n, reml)

        h2, value = fit_variance_ratio(criterion)
        _warn_ml_bound(phenotype, h2, reml)
        H = h2 * self.K
        H[np.diag_indices_from(H)] += 1.0 - h2
        with dense_blas_threads(len(H)):
            self.cholesky = scipy.linalg.cholesky(H, lower=True, overwrite_a=True,
                                                  check_finite=False)
        self._cholesky_rotate = self.cholesky.astype(self.rotate_dtype, copy=False)
        both = scipy.linalg.solve_triangular(self.cholesky,
                                             np.column_stack([phenotype.y, phenotype.X]),
                                             lower=True, check_finite=False)
        return NullFit(phenotype, h2, value, reml, None, both[:, 0], both[:, 1:],
                       chromosome=chromosome)

    def whiten(self, block: np.ndarray) -> np.ndarray:
        """``L⁻¹ block`` for the last phenotype fitted."""
        return scipy.linalg.solve_triangular(
            self._cholesky_rotate, block.astype(self.rotate_dtype, copy=False), lower=True,
            overwrite_b=True, check_finite=False)


def side_by_side_reductions(order: int, count: int) -> int:
    """How many tridiagonal reductions of order-``order`` matrices to run at once:
    one per thread of the fit (:func:`~henderson.threads.active_threads`), as many as
    there are (``count``), and as many as half the free memory holds (each holds K,
    its reduction and, once fitted, a Cholesky factor of H: three n² doubles)."""
    per_reduction = 3 * 8 * float(order) ** 2
    fits_in_memory = int(0.5 * available_memory() // per_reduction)
    return max(1, min(active_threads(), count, fits_in_memory))


def reduce_side_by_side(matrices: list[np.ndarray]) -> list[tuple]:
    """The tridiagonal reductions of ``matrices``, run side by side on one Python
    thread each (:func:`~henderson.linalg.tridiagonal_reduction` releases the GIL)
    and one BLAS thread each: a reduction is half matrix-vector products, which a
    second BLAS thread speeds up little and which stall on a busy machine, while two
    reductions on two cores take the time of one (LOCO's 22 reductions of K₋c)."""
    with blas_threads(1):
        if len(matrices) == 1:
            return [tridiagonal_reduction(matrices[0])]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(matrices)) as pool:
            return list(pool.map(tridiagonal_reduction, matrices))


def _warn_ml_bound(phenotype: Phenotype, h2: float, reml: bool) -> None:
    if not reml and h2 >= MAX_H2 * (1 - 1e-9):
        warnings.warn(
            f"{phenotype.name!r}: the ML variance ratio runs to its bound (h² = {MAX_H2}): "
            "with a GRM singular along the covariates (a centred GRM without blend) the "
            "likelihood grows without limit as h² → 1; blend the GRM "
            "(hd.grm(..., blend=0.01)) or use reml=True", UserWarning, stacklevel=5)


class SparseSpace:
    """A sparse K: ``H = h² K + (1 − h²) I`` is factorised by CHOLMOD (the symbolic
    analysis once); whitening is ``L⁻¹ P``."""

    def __init__(self, K: sp.spmatrix):
        from .linalg import cholmod_analyze

        self.K = sp.csc_matrix(K)
        self.n = self.K.shape[0]
        self.identity = sp.identity(self.n, format="csc")
        self._factor = cholmod_analyze(self._H(0.5), ordering="amd", mode="supernodal")
        self._h2 = None
        self._lowers = {}

    def _H(self, h2: float) -> sp.csc_matrix:
        return (h2 * self.K + (1.0 - h2) * self.identity).tocsc()

    def _refactor(self, h2: float):
        from .linalg import cholmod_refactor

        if self._h2 != h2:
            cholmod_refactor(self._factor, self._H(h2))
            self._h2 = h2
        return self._factor

    def whiten_at(self, h2: float, block: np.ndarray) -> np.ndarray:
        factor = self._refactor(h2)
        return factor.solve_L(factor.apply_P(np.asarray(block, dtype=np.float64)),
                              use_LDLt_decomposition=False)

    def _criterion(self, h2: float, phenotype: Phenotype, reml: bool) -> float:
        from sksparse.cholmod import CholmodNotPositiveDefiniteError

        try:
            factor = self._refactor(h2)
        except CholmodNotPositiveDefiniteError:
            return np.inf
        both = self.whiten_at(h2, np.column_stack([phenotype.y, phenotype.X]))
        yw, Xw = both[:, 0], both[:, 1:]
        n, p = Xw.shape
        try:
            f = scipy.linalg.cho_factor(Xw.T @ Xw, lower=True)
        except np.linalg.LinAlgError:
            return np.inf
        rss = float(yw @ yw - (Xw.T @ yw) @ scipy.linalg.cho_solve(f, Xw.T @ yw))
        dof = n - p if reml else n
        value = dof * (math.log(2 * math.pi * rss / dof) + 1.0) + factor.logdet()
        if reml:
            value += 2.0 * float(np.sum(np.log(np.diag(f[0]))))
        return value

    def fit(self, phenotype: Phenotype, reml: bool, chromosome: str = "all") -> NullFit:
        h2, value = fit_variance_ratio(lambda h: self._criterion(h, phenotype, reml))
        both = self.whiten_at(h2, np.column_stack([phenotype.y, phenotype.X]))
        return NullFit(phenotype, h2, value, reml, None, both[:, 0], both[:, 1:],
                       chromosome=chromosome)

    def lower_factor(self, h2: float) -> tuple[sp.csc_matrix, np.ndarray]:
        """``(L, P)`` with ``L L' = P H P'`` at ``h2`` (L as sorted CSC, P as
        positions: ``(P b)[i] = b[P[i]]``), kept per h² for the scan kernel."""
        from .linalg import cholmod_lower_factor, cholmod_permutation

        if h2 not in self._lowers:
            factor = self._refactor(h2)
            self._lowers[h2] = (cholmod_lower_factor(factor), cholmod_permutation(factor))
        return self._lowers[h2]

    def scan_products(self, null: NullFit, packed: np.ndarray, sample_rows: np.ndarray,
                      centre: bool):
        """``g'g``, ``X'g``, ``y'g`` of the whitened variants ``g = L⁻¹ P x`` and the a1
        frequencies, straight from packed .bed rows (variants x bytes; see
        :func:`_sparse_whitened_products`); ``sample_rows`` are the genotype sample
        positions of the null model's rows."""
        from .threads import active_threads

        lower, permutation = self.lower_factor(null.h2)
        # the kernel's prange runs on the scan's threads (henderson.threads)
        previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(active_threads(), numba.config.NUMBA_NUM_THREADS)))
        try:
            return _sparse_whitened_products(
                packed, np.ascontiguousarray(sample_rows[permutation], dtype=np.int64),
                centre, lower.indptr.astype(np.int64), lower.indices.astype(np.int64),
                lower.data, np.ascontiguousarray(null.Xw), np.ascontiguousarray(null.yw))
        finally:
            numba.set_num_threads(previous)


@numba.njit(cache=True, parallel=True)
def _sparse_whitened_products(packed, samples, centre, indptr, indices, values, Xw, yw):
    """The score scan's kernel for a sparse K, one variant per iteration (in
    parallel): decode the variant's .bed bytes for ``samples`` (the null model's rows
    in the factor's order, so that the decoded vector is already ``P x``), impute a
    missing count by the mean (centred to 0 with an intercept), solve ``L g = P x``
    column by column (L lower, CSC, diagonal first) and accumulate ``g'g``, ``X'g``
    and ``y'g`` as each ``g_i`` is final. Only one float64 vector of n per thread is
    ever held: no dense block of genotypes. Returns ``(gg, Xg, yg, freq)``."""
    k = packed.shape[0]
    n = len(samples)
    p = Xw.shape[1]
    gg = np.zeros(k)
    Xg = np.zeros((p, k))
    yg = np.zeros(k)
    freq = np.zeros(k)
    for j in numba.prange(k):
        x = np.empty(n)
        total = 0.0
        count = 0
        for i in range(n):
            c = bed_count(packed, j, samples[i])
            x[i] = c
            if c >= 0:
                total += c
                count += 1
        mean = total / count if count > 0 else 0.0
        freq[j] = mean / 2.0
        for i in range(n):
            if x[i] < 0.0:
                x[i] = 0.0 if centre else mean
            elif centre:
                x[i] -= mean
        sum_gg = 0.0
        sum_yg = 0.0
        sums_xg = np.zeros(p)
        for col in range(n):
            first = indptr[col]
            value = x[col] / values[first]
            for q in range(first + 1, indptr[col + 1]):
                x[indices[q]] -= values[q] * value
            sum_gg += value * value
            sum_yg += yw[col] * value
            for a in range(p):
                sums_xg[a] += Xw[col, a] * value
        gg[j] = sum_gg
        yg[j] = sum_yg
        for a in range(p):
            Xg[a, j] = sums_xg[a]
    return gg, Xg, yg, freq


# ----------------------------------------------------------------------- the tests
@numba.njit(cache=True)
def _whitened_products(Xw, yw, G):
    """``g'g``, ``X'g`` and ``y'g`` of every column g of G (float32 or float64),
    accumulated in float64 in one pass over G."""
    n, p = Xw.shape
    k = G.shape[1]
    gg = np.zeros(k)
    Xg = np.zeros((p, k))
    yg = np.zeros(k)
    for j in range(k):
        sum_gg = 0.0
        sum_yg = 0.0
        for i in range(n):
            value = float(G[i, j])
            sum_gg += value * value
            sum_yg += yw[i] * value
            for a in range(p):
                Xg[a, j] += Xw[i, a] * value
        gg[j] = sum_gg
        yg[j] = sum_yg
    return gg, Xg, yg


def _statistics(null: NullFit, whitened: np.ndarray, test: str) -> dict[str, np.ndarray]:
    """beta, se, stat, pvalue of whitened variants (n x k) under a null fit."""
    gg, XtG, yg = _whitened_products(np.ascontiguousarray(null.Xw), null.yw,
                                     np.asfortranarray(whitened))
    return _statistics_from_products(null, gg, XtG, yg, test)


def _statistics_from_products(null: NullFit, gg: np.ndarray, XtG: np.ndarray,
                              yg: np.ndarray, test: str) -> dict[str, np.ndarray]:
    """beta, se, stat, pvalue from the whitened products ``g'g``, ``X'g``, ``y'g``."""
    import scipy.stats

    n, p = null.Xw.shape
    solved = scipy.linalg.cho_solve(null.XtX_factor, XtG)
    gPg = gg - np.einsum("ij,ij->j", XtG, solved)
    beta_x = scipy.linalg.cho_solve(null.XtX_factor, null.Xty)
    gPy = yg - XtG.T @ beta_x
    scale = np.maximum(gg, 1e-300)
    informative = gPg > 1e-10 * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.where(informative, gPy / gPg, np.nan)
        if test == "score":
            se = np.sqrt(null.sigma2 / gPg)
            stat = gPy ** 2 / (null.sigma2 * gPg)
            logp = scipy.stats.chi2.logsf(stat, 1)
        else:  # wald: σ² re-estimated with the variant in, F(1, n − p − 1)
            dof = n - p - 1
            rss = np.maximum(null.yPy - gPy ** 2 / gPg, 0.0)
            se = np.sqrt(rss / dof / gPg)
            stat = beta ** 2 / se ** 2
            logp = scipy.stats.f.logsf(stat, 1, dof)
    se, stat = np.where(informative, se, np.nan), np.where(informative, stat, np.nan)
    return {"beta": beta, "se": se, "stat": stat, "pvalue": np.exp(logp)}


@numba.njit(cache=True)
def _ml_at(h2, s, yr, Xr, g):
    """−2 ML log-likelihood of y ~ [X, g] at h², and (beta_g, RSS) of the fit."""
    n, p = Xr.shape
    q = p + 1
    A = np.zeros((q, q))
    b = np.zeros(q)
    yy = 0.0
    logdet = 0.0
    for i in range(n):
        d = h2 * s[i] + (1.0 - h2)
        if d <= 0.0:
            return np.inf, np.nan, np.nan, np.nan
        w = 1.0 / d
        logdet += math.log(d)
        yy += w * yr[i] * yr[i]
        for a in range(q):
            va = Xr[i, a] if a < p else g[i]
            b[a] += w * va * yr[i]
            for c in range(a + 1):
                vc = Xr[i, c] if c < p else g[i]
                A[a, c] += w * va * vc
    # Cholesky of A in place (lower)
    for j in range(q):
        total = A[j, j]
        for k in range(j):
            total -= A[j, k] * A[j, k]
        if total <= 1e-12 * (abs(A[j, j]) + 1e-300):
            return np.inf, np.nan, np.nan, np.nan
        A[j, j] = math.sqrt(total)
        for i in range(j + 1, q):
            total = A[i, j]
            for k in range(j):
                total -= A[i, k] * A[j, k]
            A[i, j] = total / A[j, j]
    z = np.zeros(q)
    for i in range(q):
        total = b[i]
        for k in range(i):
            total -= A[i, k] * z[k]
        z[i] = total / A[i, i]
    rss = yy
    for i in range(q):
        rss -= z[i] * z[i]
    if rss <= 0.0:
        return np.inf, np.nan, np.nan, np.nan
    # beta_g = z[p] / L[p, p]; its (unscaled) variance 1 / L[p, p]^2
    beta = z[p] / A[p, p]
    value = n * (math.log(2.0 * math.pi * rss / n) + 1.0) + logdet
    return value, beta, rss, 1.0 / (A[p, p] * A[p, p])


@numba.njit(cache=True)
def _brent_ml(s, yr, Xr, g, lower, upper, tol):
    """Brent's minimisation of −2 ML over h² in [lower, upper] (Numerical Recipes'
    ``brent`` with golden sections and parabolic steps)."""
    golden = 0.3819660112501051
    a, b = lower, upper
    x = w = v = a + golden * (b - a)
    fx = fw = fv = _ml_at(x, s, yr, Xr, g)[0]
    d = e = 0.0
    for _ in range(200):
        middle = 0.5 * (a + b)
        tol1 = tol * abs(x) + 1e-12
        tol2 = 2.0 * tol1
        if abs(x - middle) <= tol2 - 0.5 * (b - a):
            break
        parabolic = False
        if abs(e) > tol1:
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            pp = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                pp = -pp
            q = abs(q)
            if abs(pp) < abs(0.5 * q * e) and pp > q * (a - x) and pp < q * (b - x):
                e, d = d, pp / q
                u = x + d
                if u - a < tol2 or b - u < tol2:
                    d = tol1 if middle >= x else -tol1
                parabolic = True
        if not parabolic:
            e = (a - x) if x >= middle else (b - x)
            d = golden * e
        u = x + d if abs(d) >= tol1 else x + (tol1 if d > 0 else -tol1)
        fu = _ml_at(u, s, yr, Xr, g)[0]
        if fu <= fx:
            if u >= x:
                a = x
            else:
                b = x
            v, w, x = w, x, u
            fv, fw, fx = fw, fx, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, w = w, u
                fv, fw = fw, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu
    # the ends, where Brent's interior search cannot land
    for end in (lower, upper):
        fe = _ml_at(end, s, yr, Xr, g)[0]
        if fe < fx:
            x, fx = end, fe
    return x, fx


@numba.njit(cache=True, parallel=False)
def _lrt_block(s, yr, Xr, G, upper, tol):
    k = G.shape[1]
    out = np.empty((k, 4))
    for j in range(k):
        g = np.ascontiguousarray(G[:, j])
        h2, value = _brent_ml(s, yr, Xr, g, 0.0, upper, tol)
        _, beta, rss, unscaled = _ml_at(h2, s, yr, Xr, g)
        out[j, 0], out[j, 1], out[j, 2], out[j, 3] = h2, value, beta, rss * unscaled
    return out


def _lrt_statistics(space: EigenSpace, null: NullFit, rotated: np.ndarray) -> dict:
    import scipy.stats

    n, p = null.Xw.shape
    yr = space.U.T @ null.phenotype.y
    Xr = np.ascontiguousarray(space.U.T @ null.phenotype.X)
    fits = _lrt_block(space.s, yr, Xr, np.asfortranarray(rotated), MAX_H2, 1e-7)
    stat = np.maximum(null.objective - fits[:, 1], 0.0)
    informative = np.isfinite(fits[:, 1])
    beta = np.where(informative, fits[:, 2], np.nan)
    se = np.where(informative, np.sqrt(fits[:, 3] / (n - p - 1)), np.nan)
    stat = np.where(informative, stat, np.nan)
    return {"beta": beta, "se": se, "stat": stat,
            "pvalue": np.exp(scipy.stats.chi2.logsf(stat, 1)), "h2": fits[:, 0]}


# ----------------------------------------------------------------------- the scan
class _Writer:
    """Rows appended to a CSV, TSV or Parquet file as blocks are scanned."""

    def __init__(self, path):
        self.path = Path(path)
        self.kind = "parquet" if self.path.suffix in (".parquet", ".pq") else "text"
        self.sep = "\t" if self.path.suffix in (".tsv", ".txt") else ","
        self._parquet = None
        self._started = False

    def write(self, frame: pd.DataFrame) -> None:
        if self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, table.schema)
            self._parquet.write_table(table)
        else:
            frame.to_csv(self.path, sep=self.sep, index=False, header=not self._started,
                         mode="a" if self._started else "w", float_format="%.10g")
        self._started = True

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()


class _Progress:
    def __init__(self, total: int, enabled):
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, k: int, note: str = "") -> None:
        self.done += k
        now = time.perf_counter()
        due = (self.enabled is True or (self.enabled == "auto" and now - self.start
                                        > PROGRESS_SECONDS)) and now - self.last > (
            PROGRESS_SECONDS if self.enabled == "auto" else 2.0)
        if due or (self.enabled is True and self.done == self.total):
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            print(f"gwas: {self.done:,}/{self.total:,} variants ({100 * self.done / self.total:.0f}%)"
                  f"{note}, {now - self.start:.0f} s, ~{left:.0f} s left", file=sys.stderr)
            self.last = now


def _standardized_block(counts: np.ndarray, centre: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean-imputed (and, with an intercept, centred) variants and a1 frequencies."""
    from .kernels import centred_genotypes, genotype_moments

    counts = np.asfortranarray(counts, dtype=np.float32)
    _, mean, _ = genotype_moments(counts)
    block = centred_genotypes(counts, mean, np.ones_like(mean), centre)
    return block, mean / 2.0


def _relationship_for(grm, genotypes, rows: np.ndarray, variants, blend: float):
    """K over the samples at ``rows`` (positions in genotypes.samples): the GRM of
    ``variants`` (``"auto"``/``"vanraden"``/``"standardized"``), or a given matrix
    taken in their order."""
    from .genomic import RelationshipMatrix, genotype_crossproduct

    if isinstance(grm, str):
        method = "vanraden" if grm == "auto" else grm
        S, denominator, used, _ = genotype_crossproduct(genotypes, samples=rows,
                                                        variants=variants, method=method)
        if used == 0:
            raise DataError("no variant varies among the analysed samples: no GRM")
        return (1.0 - blend) * S / denominator + blend * np.eye(len(rows)), S, denominator
    if not isinstance(grm, RelationshipMatrix):
        raise TypeError("grm must be 'auto', 'vanraden', 'standardized' or a "
                        f"RelationshipMatrix, not {type(grm).__name__}")
    if grm.kind != "covariance":
        raise DataError("grm must be a covariance (e.g. hd.grm(g)), not a precision")
    ids = genotypes.samples["iid"].astype(str).to_numpy()[rows]
    position = grm.labels.get_indexer(ids)
    if (position < 0).any():
        absent = ids[position < 0]
        raise DataError(f"the GRM lacks {len(absent)} analysed sample(s): "
                        + ", ".join(map(repr, absent[:10])))
    matrix = grm.matrix
    if sp.issparse(matrix):
        return sp.csc_matrix(matrix)[position][:, position], None, None
    return np.asarray(matrix)[np.ix_(position, position)], None, None


#: a sparse-GRM scan reads blocks of packed .bed rows of about this many bytes
SPARSE_SCAN_BYTES = 64 * 2**20


def _scan_blocks(genotypes, space, block, positions, rows):
    """``(positions, data)`` per block of tested variants: float32 counts of the
    samples at ``rows`` (NaN missing), or for a sparse K the packed .bed rows of all
    samples (variants x bytes), which the fused kernel decodes itself."""
    if not isinstance(space, SparseSpace):
        yield from genotypes.blocks(size=block, variants=positions, samples=rows,
                                    dtype=np.float32)
        return
    size = block or int(max(64, SPARSE_SCAN_BYTES // max(genotypes.bed_width(), 1)))
    for start in range(0, len(positions), size):
        chunk = positions[start:start + size]
        yield chunk, genotypes.bed_bytes(chunk)


def gwas(formula: str, data: pd.DataFrame, genotypes, id: str = "iid", grm="auto",
         loco: bool = False, test: str = "wald", reml: bool = True, blend: float = 0.01,
         variants=None, out=None, progress="auto", precision: str = "double",
         block: int | None = None, threads: int | None = None) -> pd.DataFrame:
    """Test every variant against one null linear mixed model.

    The null model is ``formula`` (covariates only) plus a random effect of ``id`` with
    covariance ``σ² h² K``, fitted once by REML (``reml=True``) or ML. Then each
    variant, coded as copies of its a1 allele and imputed by its mean where missing,
    is tested as one more covariate:

    * ``test="wald"`` (FaST-LMM's ``single_snp``): h² held at the null estimate, σ²
      re-estimated as RSS/(n − p − 1) with the variant in, p-value from F(1, n − p − 1);
    * ``test="score"``: h² and σ² of the null fit, p-value from χ²(1) (``beta`` and
      ``se`` are the one-step estimates ``g'Py / g'Pg`` and ``sqrt(σ² / g'Pg)``);
    * ``test="lrt"`` (needs ``reml=False``; GEMMA's and FaST-LMM C++'s default): the ML
      variance ratio re-fitted for every variant, p-value from χ²(1) of the likelihood
      ratio.

    Parameters
    ----------
    formula : str
        ``"y ~ age + sex"``; ``"cbind(y1, y2) ~ age"`` scans several phenotypes in one
        pass (each on the rows where it is observed).
    data : DataFrame
        One row per person, with the ``id`` column.
    genotypes : Genotypes or DataFrame
        From :func:`read_plink`, or a table of people (index = ids) by variants.
        Rows of ``data`` are matched to genotypes by ``id``, in any order.
    id : str
        The column of ``data`` holding the genotype sample ids (PLINK's IID).
    grm : "auto", "vanraden", "standardized" or RelationshipMatrix
        ``"auto"`` is :func:`grm` of all the variants (VanRaden 1, blended by
        ``blend``); ``"standardized"`` is FaST-LMM's and GCTA's kernel; or a K given
        (dense, or sparse from ``hd.grm(g, cutoff=0.05)``: the null model is then a
        sparse Cholesky; ``wald`` and ``score`` only).
    loco : bool
        Leave one chromosome out: each chromosome's variants are tested with a GRM of
        the other chromosomes and their own null fit (needs ``grm`` built here).
    test : {"wald", "score", "lrt"}
    reml : bool
    blend : float
        The weight of the identity in a GRM built here.
    variants : slice, positions or boolean mask, optional
        The variants to test (all by default); the GRM always uses all of them.
    out : str or Path, optional
        Also stream the rows to this file as they are computed (``.parquet``, ``.csv``,
        ``.tsv``).
    progress : "auto", bool
        Progress lines on stderr (``"auto"``: only once a scan runs longer than 10 s).
    precision : {"double", "single"}
        The precision of the genotype rotation, the scan's largest cost; ``"single"``
        is twice as fast and changes log10 p-values by ~1e-6.
    threads : int, optional
        Threads of the scan (BLAS and PLINK decoding), as :func:`henderson.lmm`'s
        ``threads``; the eigen- and tridiagonal decompositions of K run on one BLAS
        thread whatever it is (they are memory-bound).

    Returns
    -------
    DataFrame
        One row per variant (per phenotype, for several) in .bim order: ``phenotype``
        (several only), ``chrom``, ``snp``, ``pos``, ``a1``, ``a2``, ``af`` (frequency of
        a1), ``beta`` and ``se`` (per copy of a1), ``stat`` (F, χ² or LR), ``pvalue``
        (and ``h2`` for ``lrt``). ``pd.DataFrame(result.attrs["null"])`` is the table of
        null fits (h², variances, −2 log-likelihood; one per chromosome with ``loco``).

    Examples
    --------
    >>> import henderson as hd, pandas as pd
    >>> from henderson.simulate import gwas_panel
    >>> g, pheno = gwas_panel(n_samples=300, n_variants=400, seed=2)
    >>> res = hd.gwas("y ~ age + sex", pheno, genotypes=g, id="iid", progress=False)
    >>> list(res.columns)
    ['chrom', 'snp', 'pos', 'a1', 'a2', 'af', 'beta', 'se', 'stat', 'pvalue']
    >>> pd.DataFrame(res.attrs["null"])[["phenotype", "n", "criterion"]]
      phenotype    n criterion
    0         y  300      REML
    """
    from .genomic import RelationshipMatrix
    from .plink import Genotypes

    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, not {test!r}")
    if test == "lrt" and reml:
        raise ValueError("test='lrt' compares ML fits (REML likelihoods of models with "
                         "different fixed effects are not comparable): use reml=False")
    if isinstance(grm, str) and grm not in ("auto", "vanraden", "standardized"):
        raise ValueError("grm must be 'auto', 'vanraden', 'standardized' or a "
                         f"RelationshipMatrix, not {grm!r}")
    if precision not in ("double", "single"):
        raise ValueError(f"precision must be 'double' or 'single', not {precision!r}")
    if not isinstance(genotypes, Genotypes):
        from .genomic import _as_genotypes
        genotypes = _as_genotypes(genotypes)
    given_grm = isinstance(grm, RelationshipMatrix)
    if loco and given_grm:
        raise ValueError("loco=True builds each chromosome's GRM from the genotypes; give "
                         "grm='auto', 'vanraden' or 'standardized'")
    if given_grm and sp.issparse(grm.matrix) and test == "lrt":
        raise ValueError("test='lrt' needs a dense GRM (an eigendecomposition); use 'wald' "
                         "or 'score' with a sparse GRM")
    check_threads(threads)
    with fit_threads(threads):
        all_phenotypes = phenotypes(formula, data, genotypes, id)
        tested = np.arange(genotypes.n_variants)
        tested = tested if variants is None else tested[variants]
        several = len(all_phenotypes) > 1
        rotate_dtype = np.float32 if precision == "single" else np.float64
        writer = _Writer(out) if out is not None else None
        progress_state = _Progress(len(tested) * len(all_phenotypes), progress)
        frames, nulls = [], []
        try:
            # phenotypes observed on the same samples share K, its factorisation and rotations
            by_samples: dict[bytes, list[Phenotype]] = {}
            for phenotype in all_phenotypes:
                by_samples.setdefault(phenotype.sample_rows.tobytes(), []).append(phenotype)
            for group in by_samples.values():
                rows = group[0].sample_rows
                K, S_all, denominator_all = _relationship_for(grm, genotypes, rows, None, blend)
                chromosomes = genotypes.variants["chrom"].astype(str).to_numpy()
                if loco:
                    parts = [(c, tested[chromosomes[tested] == c])
                             for c in pd.unique(chromosomes[tested])]
                else:
                    parts = [("all", tested)]
                # one phenotype: tridiagonal null fit + triangular solves; several (or
                # lrt, which re-fits h² per variant): one eigendecomposition shared
                tridiagonal = test != "lrt" and len(group) == 1

                def space_of(K, reduction=None):
                    if sp.issparse(K):
                        return SparseSpace(K)
                    if not tridiagonal:
                        return EigenSpace(K, rotate_dtype)
                    return DenseSpace(K, rotate_dtype, reduction)

                def without(chromosome):
                    """K of the variants off ``chromosome`` (LOCO)."""
                    from .genomic import genotype_crossproduct

                    method = "vanraden" if grm == "auto" else grm
                    S_c, d_c, _, _ = genotype_crossproduct(
                        genotypes, samples=rows, variants=chromosomes == chromosome,
                        method=method)
                    if denominator_all - d_c <= 0:
                        raise DataError(f"loco: no varying variant outside chromosome "
                                        f"{chromosome!r} for its GRM")
                    return ((1.0 - blend) * (S_all - S_c) / (denominator_all - d_c)
                            + blend * np.eye(len(rows)))

                def chromosome_spaces():
                    if not loco:
                        yield "all", tested, space_of(K)
                        return
                    # LOCO: the K₋c of a few chromosomes at once, their tridiagonal
                    # reductions side by side (the scan's largest cost at n = 5,000)
                    batch = (side_by_side_reductions(len(rows), len(parts))
                             if tridiagonal else 1)
                    for start in range(0, len(parts), batch):
                        chunk = parts[start:start + batch]
                        matrices = [without(c) for c, _ in chunk]
                        reductions = (reduce_side_by_side(matrices) if tridiagonal
                                      else [None] * len(chunk))
                        for (c, positions), K_c, reduction in zip(chunk, matrices,
                                                                   reductions):
                            yield c, positions, space_of(K_c, reduction)
                        matrices = reductions = None

                if loco:
                    K = None  # each chromosome has its own
                for chromosome, positions, space in chromosome_spaces():
                    fits = [space.fit(ph, reml, chromosome) for ph in group]
                    nulls.extend(fits)
                    for chunk, counts in _scan_blocks(genotypes, space, block, positions,
                                                      rows):
                        if isinstance(space, SparseSpace):
                            centred = rotated = None
                        else:
                            centred, freq = _standardized_block(counts,
                                                                group[0].has_intercept)
                        rotated = (space.rotate(centred) if isinstance(space, EigenSpace)
                                   else None)
                        for null in fits:
                            if isinstance(space, SparseSpace):
                                gg, XtG, yg, freq = space.scan_products(
                                    null, counts, rows, group[0].has_intercept)
                                whitened = None
                            elif isinstance(space, EigenSpace):
                                whitened = rotated * np.sqrt(null.weights)[:, None]
                            elif isinstance(space, DenseSpace):
                                whitened = space.whiten(centred)
                            else:
                                whitened = space.whiten_at(null.h2, centred)
                            if test == "lrt":
                                stats = _lrt_statistics(space, null, rotated)
                            elif whitened is None:
                                stats = _statistics_from_products(null, gg, XtG, yg, test)
                            else:
                                stats = _statistics(null, whitened, test)
                            frame = genotypes.variants.iloc[chunk][
                                ["chrom", "snp", "pos", "a1", "a2"]].reset_index(drop=True)
                            frame.insert(5, "af", freq)
                            for key, value in stats.items():
                                frame[key] = value
                            if several:
                                frame.insert(0, "phenotype", null.phenotype.name)
                            if writer is not None:
                                writer.write(frame)
                            frames.append((null.phenotype.name, chunk[0], frame))
                            progress_state.update(len(chunk), f" [{null.phenotype.name}"
                                                  + (f", chr {chromosome}]" if loco else "]"))
                    space = None  # its n² arrays go before the next batch's are made
        finally:
            if writer is not None:
                writer.close()
        order = {p.name: i for i, p in enumerate(all_phenotypes)}
        frames.sort(key=lambda item: (order[item[0]], item[1]))
        result = pd.concat([f for _, _, f in frames], ignore_index=True)
        # a dict of lists, not a DataFrame: pandas compares attrs when it concatenates
        result.attrs["null"] = pd.DataFrame([n.summary_row() for n in nulls]).to_dict("list")
        return result
