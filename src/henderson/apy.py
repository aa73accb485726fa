"""Single-step ``H⁻¹`` with APY for many genotyped animals, held as an operator.

With tens of thousands of genotyped animals the genotyped block of ``H⁻¹``,
``τ G_APY⁻¹ − ω A22⁻¹``, is dense (``A22⁻¹`` is): 60,000 genotyped animals make it
28.8 GB. This module never forms it. It keeps what a product ``H⁻¹ x`` needs:

* ``A⁻¹`` of the whole pedigree (sparse);
* APY (Misztal 2016) from the genotypes, ``G`` never formed whole: the Cholesky factor
  of ``G_cc`` (core x core), ``P = G_cc⁻¹ G_cn`` (core x non-core) and ``m``, the
  conditional variances of the non-core animals given the core, so that
  ``G_APY⁻¹ x = [G_cc⁻¹ x_c − P t; t]`` with ``t = (x_n − P' x_c) / m``;
* ``A22⁻¹`` by its sparse route, ``A22⁻¹ x = A^22 x − A^21 (A^11)⁻¹ A^12 x``, from
  the blocks of ``A⁻¹`` of the genotyped animals and their ancestors (ancestors
  ``1``, genotyped ``2``) and one sparse Cholesky factor of ``A^11``.

G is VanRaden's, blended with ``A22`` and tuned to it as :func:`henderson.single_step`
does (BLUPF90's defaults): only ``A22``'s core columns are computed (Colleau's
method), and the means the tuning needs come from ``Σ A22 = 1' A22 1`` (one more
pass down the pedigree) and from ``1' G 1 = ||Σ_i z_i||² / s``.

The cost is that of crossing the core with every genotyped animal,
``2 c n m`` floating-point operations for ``c`` core animals, ``n`` genotyped and
``m`` markers (float32 on the raw counts when no count is missing: exact), and
``c n`` doubles for ``P``. :func:`henderson.solve_blup` solves the mixed-model
equations with it by preconditioned conjugate gradients.
"""
from __future__ import annotations

import sys
import time

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.linalg import blas, lapack

from .errors import DataError
from .linalg import cholmod_analyze, cholmod_refactor
from .pedigree import Pedigree
from .single_step import (
    A22_COLUMN_BLOCK, FLOAT32_EXACT_MARKERS, MARKER_BLOCK, _apy_core, _cholesky_in_place,
    _Clock, ainverse_of, centre_count_products, check_conditional_variances,
    checked_options, genotyped_in_pedigree_order, marker_summary, prune_to_ancestors,
    relationship_columns, tuning_to_a22)
from .threads import dense_blas_threads

#: progress lines on stderr once a build has run this long
PROGRESS_SECONDS = 10.0


class ImplicitSingleStep:
    """``H⁻¹ = A⁻¹ + [[0, 0], [0, τ G_APY⁻¹ − ω A22⁻¹]]`` as an operator
    (:func:`implicit_single_step`).

    Attributes
    ----------
    labels : pandas.Index
        The animals (``pedigree.ids``), the order of :meth:`matvec`'s vectors.
    genotyped : pandas.Index
        The genotyped animals, in pedigree order.
    core : pandas.Index
        The APY core animals.
    pedigree : Pedigree
    tuning : tuple of float
        ``(a, b)`` of ``G* = a + b G_b``.
    tau, omega : float
    genomic_diagonal : numpy.ndarray
        The diagonal of ``G*`` (and of ``G_APY``), order of ``genotyped``.
    conditional_variances : numpy.ndarray
        ``m``, one per non-core genotyped animal (in the order of ``genotyped``
        without the core).
    timings : dict
        Seconds spent in each stage.
    """

    kind = "implicit precision"

    def __init__(self, pedigree, genotyped_positions, core_slots, core_factor,
                 projection, conditional_variances, genomic_diagonal, a22_blocks, pruned,
                 tuning, tau, omega, timings):
        self.pedigree = pedigree
        self.labels = pedigree.ids
        self.genotyped_positions = genotyped_positions
        self.genotyped = pedigree.ids[genotyped_positions]
        n_genotyped = len(genotyped_positions)
        is_core = np.zeros(n_genotyped, dtype=bool)
        is_core[core_slots] = True
        self.core_slots = np.asarray(core_slots, dtype=np.int64)
        self.noncore_slots = np.flatnonzero(~is_core)
        self.core = self.genotyped[self.core_slots]
        self._core_factor = core_factor           # lower Cholesky factor of G*_cc
        self._projection = projection             # P = G_cc⁻¹ G_cn, Fortran order
        self.conditional_variances = conditional_variances
        self.genomic_diagonal = genomic_diagonal
        self._ainverse11_factor, self._ainverse12, self._ainverse22 = a22_blocks
        self._ainverse = pedigree.inverse()
        #: ``((sire, dam, d), genotyped positions)`` of the pruned pedigree (the
        #: genotyped animals and their ancestors; :func:`prune_to_ancestors`)
        self.pruned = pruned
        self.tuning = tuning
        self.tau = tau
        self.omega = omega
        self.timings = timings
        self._core_inverse = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ImplicitSingleStep({len(self.labels)} animals, {len(self.genotyped)} "
                f"genotyped, APY core {len(self.core)})")

    # ------------------------------------------------------------------ products
    def apy_inverse_matvec(self, x: np.ndarray) -> np.ndarray:
        """``G_APY⁻¹ x`` over the genotyped animals (``x`` in the order of
        ``genotyped``, one column or several)."""
        x = np.asarray(x, dtype=np.float64)
        out = np.empty_like(x)
        x_core, x_other = x[self.core_slots], x[self.noncore_slots]
        P, m = self._projection, self.conditional_variances
        t = x_other - P.T @ x_core
        t /= m if t.ndim == 1 else m[:, None]
        solved, info = lapack.dpotrs(self._core_factor, x_core, lower=1)
        if info:
            raise ValueError(f"dpotrs: illegal argument {-info}")
        out[self.core_slots] = solved - P @ t
        out[self.noncore_slots] = t
        return out

    def a22_inverse_matvec(self, x: np.ndarray) -> np.ndarray:
        """``A22⁻¹ x`` by the sparse route, ``A^22 x − A^21 (A^11)⁻¹ A^12 x``."""
        x = np.asarray(x, dtype=np.float64)
        out = self._ainverse22 @ x
        if self._ainverse11_factor is not None:
            out -= self._ainverse12.T @ self._ainverse11_factor(self._ainverse12 @ x)
        return out

    def genotyped_block_matvec(self, x: np.ndarray) -> np.ndarray:
        """``(τ G_APY⁻¹ − ω A22⁻¹) x`` over the genotyped animals."""
        out = self.apy_inverse_matvec(x)
        if self.tau != 1.0:
            out *= self.tau
        if self.omega:
            out -= self.omega * self.a22_inverse_matvec(x)
        return out

    def matvec(self, x) -> np.ndarray:
        """``H⁻¹ x`` for ``x`` over every animal: an array in the order of ``labels``
        (one column or several), or a Series / DataFrame indexed by animal (aligned on
        ``labels``)."""
        if isinstance(x, (pd.Series, pd.DataFrame)):
            index = pd.Index(x.index.astype(str))
            if index.has_duplicates or len(index) != len(self.labels) \
                    or not index.isin(self.labels).all():
                raise DataError(f"matvec: x must be indexed by the {len(self.labels)} "
                                "animals of the pedigree, each once")
            x = x.set_axis(index, axis=0).reindex(self.labels).to_numpy(dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim not in (1, 2) or x.shape[0] != len(self.labels):
            raise DataError(f"matvec: x must have {len(self.labels)} rows (one per animal, "
                            f"in the order of labels), not shape {x.shape}")
        out = self._ainverse @ x
        g = self.genotyped_positions
        out[g] += self.genotyped_block_matvec(x[g])
        return out

    __matmul__ = matvec

    # ------------------------------------------------------------------ diagonals
    def core_inverse(self) -> np.ndarray:
        """``G_cc⁻¹`` (full, computed once)."""
        if self._core_inverse is None:
            inverse, info = lapack.dpotri(self._core_factor, lower=1)
            if info:
                raise DataError(f"G_cc cannot be inverted (dpotri info {info})")
            self._core_inverse = np.tril(inverse) + np.tril(inverse, -1).T
        return self._core_inverse

    def apy_inverse_diagonal(self) -> np.ndarray:
        """The diagonal of ``G_APY⁻¹`` (order of ``genotyped``)."""
        P, m = self._projection, self.conditional_variances
        out = np.empty(len(self.genotyped))
        out[self.core_slots] = np.diag(self.core_inverse()) + _weighted_row_squares(P, 1.0 / m)
        out[self.noncore_slots] = 1.0 / m
        return out

    def diagonal_bound(self) -> np.ndarray:
        """An upper bound of the diagonal of ``H⁻¹`` for preconditioning: ``diag(A⁻¹) +
        τ diag(G_APY⁻¹) − ω / A22_ii`` (``A22⁻¹_ii ≥ 1 / A22_ii``)."""
        out = self._ainverse.diagonal().astype(np.float64)
        g = self.genotyped_positions
        out[g] += self.tau * self.apy_inverse_diagonal()
        out[g] -= self.omega / (1.0 + self.pedigree.inbreeding[g])
        return out


@numba.njit(cache=True, nogil=True)
def _weighted_row_squares(P, weights):
    """``Σ_j P[i, j]² w_j`` for each row ``i`` (P in Fortran order: column by column)."""
    out = np.zeros(P.shape[0])
    for j in range(P.shape[1]):
        w = weights[j]
        for i in range(P.shape[0]):
            out[i] += P[i, j] * P[i, j] * w
    return out


def implicit_single_step(pedigree: Pedigree, genotypes, apy, blend: float = 0.05,
                         tune: str | None = "a22", tau: float = 1.0, omega: float = 1.0,
                         seed: int | None = None, progress="auto") -> ImplicitSingleStep:
    """``H⁻¹`` with APY as an operator, for more genotyped animals than a dense
    genotyped block allows (see the module's description).

    The same ``H⁻¹`` as ``hd.single_step(pedigree, genotypes, apy=apy, ...)`` (same
    blend, tuning, core), whose genotyped block is never formed.

    Parameters
    ----------
    pedigree : Pedigree
    genotypes : DataFrame or genotype reader
        As :func:`henderson.single_step`.
    apy : int or list of ids
        The number of core animals (drawn at random among the genotyped, ``seed``)
        or the core animals themselves.
    blend, tune, tau, omega, seed
        As :func:`henderson.single_step`.
    progress : "auto" or bool
        A line on stderr as each stage ends: "auto" once the build has run 10 s.

    Returns
    -------
    ImplicitSingleStep

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import henderson as hd
    >>> ped = hd.Pedigree(["s", "d", "c1", "c2", "c3", "g"], ["0", "0", "s", "s", "s", "c1"],
    ...                   ["0", "0", "d", "d", "0", "c3"])
    >>> genotypes = pd.DataFrame([[0, 1, 2, 1], [1, 1, 0, 2], [2, 0, 1, 1]],
    ...                          index=["c1", "c2", "g"])
    >>> H = hd.single_step(ped, genotypes, apy=["c1", "c2"])
    >>> op = hd.implicit_single_step(ped, genotypes, apy=["c1", "c2"])
    >>> x = np.arange(6.0)
    >>> bool(np.allclose(op.matvec(x), H.matrix @ x))
    True
    """
    if progress not in ("auto", True, False):
        raise DataError(f"progress must be 'auto', True or False, not {progress!r}")
    clock = _ProgressClock(progress)
    blend, tau, omega = checked_options(pedigree, blend, tune, tau, omega)
    if apy is None:
        raise DataError("implicit_single_step needs an APY core: apy=number of core "
                        "animals or their ids")
    ids, source, order, positions, genotyped = genotyped_in_pedigree_order(pedigree,
                                                                           genotypes)
    n = len(positions)
    core = _apy_core(apy, genotyped, seed)
    if tune is not None and n < 2:
        raise DataError("tuning G to A22 needs at least two genotyped animals "
                        "(tune=None for one)")
    summary = marker_summary(source, order, ids)
    clock.lap("checks")

    is_core = np.zeros(n, dtype=bool)
    is_core[core] = True
    other = np.flatnonzero(~is_core)
    crossed = _core_crossproducts(source, order, summary, core, other)
    G_cc, G_cn, diagonal_other, trace_G, total_G = crossed
    clock.lap("G_core_rows")

    pruned, genotyped_in_pruned = prune_to_ancestors(pedigree, positions)
    sire, dam, d = pruned
    a22_diagonal = 1.0 + pedigree.inbreeding[positions]
    if blend or tune is not None:
        # Σ A22 = 1' A22 1: one pass with the genotyped animals' column sum
        total_A = float(_relationship_sum(sire, dam, d, genotyped_in_pruned))
        trace_A = float(a22_diagonal.sum())
    if blend:
        G_cc *= 1.0 - blend
        G_cn *= 1.0 - blend
        diagonal_other *= 1.0 - blend
        diagonal_other += blend * a22_diagonal[other]
        core_rows = genotyped_in_pruned[core]
        for start in range(0, len(core), A22_COLUMN_BLOCK):
            stop = min(start + A22_COLUMN_BLOCK, len(core))
            columns = relationship_columns(sire, dam, d, core_rows[start:stop],
                                           genotyped_in_pruned)   # n x k: A22[:, core]
            G_cc[start:stop] += blend * columns[core].T
            G_cn[start:stop] += blend * columns[other].T
        trace_G = (1.0 - blend) * trace_G + blend * trace_A
        total_G = (1.0 - blend) * total_G + blend * total_A
    clock.lap("A22_blend")
    tuning = (0.0, 1.0)
    if tune is not None:
        tuning = tuning_to_a22(trace_A, total_A, trace_G, total_G, n)
        a, b = tuning
        for block in (G_cc, G_cn, diagonal_other):
            block *= b
            block += a

    genomic_diagonal = np.empty(n)
    genomic_diagonal[core] = np.diag(G_cc)
    genomic_diagonal[other] = diagonal_other
    factor = _cholesky_in_place(G_cc, "G_cc (G* among the APY core)", genotyped[core],
                                "use a larger blend or another core")
    # W = L⁻¹ G_cn, m = g_nn − ||W_n||², P = L'⁻¹ W = G_cc⁻¹ G_cn, in place
    with dense_blas_threads(len(core)):
        W = blas.dtrsm(1.0, factor, G_cn, lower=1, overwrite_b=1)
        m = diagonal_other - np.einsum("ij,ij->j", W, W)
        P = blas.dtrsm(1.0, factor, W, lower=1, trans_a=1, overwrite_b=1)
    check_conditional_variances(m, diagonal_other, genotyped[other])
    clock.lap("apy")
    blocks = _a22_inverse_blocks(sire, dam, d, genotyped_in_pruned)
    clock.lap("A22_inverse_route")
    return ImplicitSingleStep(pedigree, positions, core, factor, np.asfortranarray(P), m,
                              genomic_diagonal, blocks, (pruned, genotyped_in_pruned),
                              tuning, tau, omega, clock.laps)


class _ProgressClock(_Clock):
    """Stage timings, and a line on stderr as each stage ends (``progress``: True, or
    "auto" once PROGRESS_SECONDS have passed)."""

    def __init__(self, progress):
        super().__init__()
        self.start = time.perf_counter()
        self.progress = progress

    def lap(self, name: str) -> None:
        super().lap(name)
        elapsed = time.perf_counter() - self.start
        if self.progress is True or (self.progress == "auto" and elapsed > PROGRESS_SECONDS):
            print(f"implicit_single_step: {name} {self.laps[name]:.0f} s "
                  f"({elapsed:.0f} s in all)", file=sys.stderr, flush=True)


def _core_crossproducts(source, order, summary, core, other):
    """``G_cc`` (core x core), ``G_cn`` (core x non-core, Fortran), the diagonal of G
    over the non-core animals, ``trace(G)`` and ``1' G 1``, a block of markers at a
    time (VanRaden's method 1, as :func:`henderson.single_step.genomic_relationships`).
    """
    freq, varies, u = summary.frequency, summary.varies, summary.u
    p = freq[varies]
    scale = 2.0 * float(np.sum(p * (1.0 - p)))
    exact32 = not summary.has_missing and len(p) < FLOAT32_EXACT_MARKERS
    dtype = np.float32 if exact32 else np.float64
    rows_core, rows_other = order[core], order[other]
    c, k = len(core), len(other)
    G_cc = np.zeros((c, c), dtype=dtype, order="F")
    G_cn = np.zeros((c, k), dtype=dtype, order="F")
    squares = np.zeros(len(order))                 # Σ_j z_ij² (genotyped order)
    column_sums = []                                # Σ_i z_ij per marker
    gemm = blas.sgemm if exact32 else blas.dgemm
    syrk = blas.ssyrk if exact32 else blas.dsyrk
    n_markers = source.n_markers
    for start in range(0, n_markers, MARKER_BLOCK):
        stop = min(start + MARKER_BLOCK, n_markers)
        kept = np.flatnonzero(varies[start:stop])
        if not len(kept):
            continue
        block = np.asarray(source.read(start, stop))
        if len(kept) < stop - start:
            block = block[:, kept]
        two_p = 2.0 * freq[start:stop][kept]
        # rows in C order: BLAS reads them as the transpose (no transposing copy)
        core_block = np.asarray(block[rows_core], dtype=dtype)
        other_block = np.asarray(block[rows_other], dtype=dtype)
        del block
        if exact32:
            # raw counts: Σ_j z_ij² = Σ_j M_ij² − 2 u_i + 4 p'p (summed after the loop),
            # Σ_i z_ij = Σ_i M_ij − n 2p_j
            for rows, counts in ((core, core_block), (other, other_block)):
                squares[rows] += np.einsum("ij,ij->i", counts, counts, dtype=np.float64)
            column_sums.append(core_block.sum(axis=0, dtype=np.float64)
                               + other_block.sum(axis=0, dtype=np.float64)
                               - len(order) * two_p)
        else:
            for rows, counts in ((core, core_block), (other, other_block)):
                counts -= two_p
                counts[np.isnan(counts)] = 0.0
                squares[rows] += np.einsum("ij,ij->i", counts, counts)
            column_sums.append(core_block.sum(axis=0) + other_block.sum(axis=0))
        with dense_blas_threads(max(c, 1), itemsize=4 if exact32 else 8):
            G_cc = syrk(1.0, core_block.T, beta=1.0, c=G_cc, trans=1, lower=1,
                        overwrite_c=1)
            if k:
                G_cn = gemm(1.0, core_block.T, other_block.T, beta=1.0, c=G_cn, trans_a=1,
                            overwrite_c=1)
    if exact32:
        squares += 4.0 * float(p @ p) - 2.0 * u
    if exact32:
        G_cc = G_cc.astype(np.float64, order="F")
        G_cn = G_cn.astype(np.float64, order="F")
        centre_count_products(G_cc, u[core], u[core], p)
        centre_count_products(G_cn, u[core], u[other], p)
    G_cc = np.tril(G_cc) + np.tril(G_cc, -1).T
    G_cc /= scale
    G_cn /= scale
    sums = np.concatenate(column_sums) if column_sums else np.zeros(0)
    G_cc = np.asfortranarray(G_cc)
    return G_cc, G_cn, squares[other] / scale, float(squares.sum()) / scale, \
        float(sums @ sums) / scale


@numba.njit(cache=True, nogil=True)
def _relationship_sum(sire, dam, d, genotyped):
    """``1' A22 1``: ``A = T D T'`` applied to the indicator of the genotyped animals
    (one sweep up the pedigree and one down, as :func:`relationship_columns`)."""
    n = len(sire)
    x = np.zeros(n)
    for g in genotyped:
        x[g] = 1.0
    for i in range(n - 1, -1, -1):
        if sire[i] >= 0:
            x[sire[i]] += 0.5 * x[i]
        if dam[i] >= 0:
            x[dam[i]] += 0.5 * x[i]
    for i in range(n):
        value = d[i] * x[i]
        if sire[i] >= 0:
            value += 0.5 * x[sire[i]]
        if dam[i] >= 0:
            value += 0.5 * x[dam[i]]
        x[i] = value
    total = 0.0
    for g in genotyped:
        total += x[g]
    return total


def _a22_inverse_blocks(sire, dam, d, genotyped):
    """``(solve with A^11, A^12, A^22)`` from ``A⁻¹`` of the pruned pedigree (ancestors
    ``1``, genotyped ``2``), the solve a sparse Cholesky factor of ``A^11`` (None when
    no ancestor is ungenotyped)."""
    n = len(sire)
    full = ainverse_of(sire, dam, d)
    is_genotyped = np.zeros(n, dtype=bool)
    is_genotyped[genotyped] = True
    ancestors = np.flatnonzero(~is_genotyped)
    a22 = full[genotyped][:, genotyped].tocsc()
    if not len(ancestors):
        return None, sp.csc_matrix((0, len(genotyped))), a22
    a12 = full[ancestors][:, genotyped].tocsr()
    a11 = sp.tril(full[ancestors][:, ancestors]).tocsc()
    factor = cholmod_analyze(a11, ordering="amd")
    cholmod_refactor(factor, a11)
    return factor, a12, a22
