"""Single-step genomic evaluation: the inverse H⁻¹ of the combined pedigree and
genomic relationship matrix, as a known level covariance for ``(1 | animal)``.

Owns the stages from genotypes to ``H⁻¹``: VanRaden's G (:func:`marker_summary`,
:func:`genomic_relationships`), the pedigree relationships among the genotyped
animals ``A22`` (:func:`a22_columns`) and the factor of its inverse
(:func:`a22_inverse_factor`, a Schur complement of ``A⁻¹``), blending and tuning
(:func:`blend_and_tune`), APY (:func:`apy_inverse`) and the sparse assembly
(:func:`assemble_precision`). :func:`single_step` runs them in turn.
"""
from __future__ import annotations

import inspect
import numbers
import time
from typing import NamedTuple

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.linalg import blas, lapack

from .errors import DataError
from .genomic import RelationshipMatrix
from .linalg import cholmod_analyze, cholmod_permutation, cholmod_refactor
from .plink import non_numeric_counts
from .threads import dense_blas_threads
from .pedigree import MIN_MENDELIAN_VARIANCE, Pedigree, _ainverse_triplets

# markers per block of the genotype passes: 20,000 animals x 1,024 markers is 160 MB
# in float64, and large enough for syrk to run near its peak
MARKER_BLOCK = 1024
# columns of A22 per pass down the pedigree (Colleau's indirect method): 256 columns
# of the 100,000 animals of a pruned 1M-animal pedigree are 200 MB
A22_COLUMN_BLOCK = 256
# raw allele counts are crossed in float32 when every sum of products is an integer
# below 2^24 (4 per marker at most), hence exact
FLOAT32_EXACT_MARKERS = 2 ** 24 // 4
TUNE_OPTIONS = ("a22", None)
#: a non-core animal whose conditional variance given the APY core is below this
#: fraction of its g_ii (a twin of a core animal without a blend) is an error: 1/m
#: would be rounding
CONDITIONAL_VARIANCE_FLOOR = 1e-10


class SingleStepRelationship(RelationshipMatrix):
    """``H⁻¹`` over the animals of a pedigree, with what went into it.

    A :class:`~henderson.genomic.RelationshipMatrix` (``kind="precision"``) and:

    Attributes
    ----------
    genotyped : pandas.Index
        The genotyped animals, in the order of the pedigree.
    tuning : tuple of float
        ``(a, b)`` of ``G* = a + b G_b`` (``(0, 1)`` without tuning).
    logdets : dict
        ``log|A|``, ``log|A22|`` and ``log|G*|`` (of ``G_APY`` with APY).
    core : pandas.Index or None
        The APY core animals.
    timings : dict
        Seconds spent in each stage.
    """

    def __init__(self, matrix, labels, logdet_covariance, genotyped, tuning, logdets,
                 core, timings):
        super().__init__(matrix, labels, kind="precision",
                         logdet_covariance=logdet_covariance, check=False)
        self.genotyped = genotyped
        self.tuning = tuning
        self.logdets = logdets
        self.core = core
        self.timings = timings


def single_step(pedigree: Pedigree, genotypes, blend: float = 0.05, tune: str | None = "a22",
                tau: float = 1.0, omega: float = 1.0, apy=None,
                seed: int | None = None) -> SingleStepRelationship:
    """``H⁻¹`` for single-step GBLUP (ssGBLUP), with BLUPF90's defaults.

    ``H⁻¹ = A⁻¹ + [[0, 0], [0, τ G*⁻¹ − ω A22⁻¹]]`` (Aguilar et al. 2010,
    Christensen & Lund 2010), the second block over the genotyped animals, where

    * ``G = M M' / (2 Σ p_j (1 − p_j))`` is VanRaden's method 1 with ``M`` the
      allele counts centred by ``2p``, ``p`` the allele frequencies among the
      genotyped animals (markers that do not vary are dropped, a missing count is
      the marker's mean ``2p``);
    * ``G_b = (1 − blend) G + blend A22`` (BLUPF90's ``AlphaBeta 0.95 0.05``);
    * ``G* = a + b G_b`` with ``a``, ``b`` such that the means of the diagonal and of
      the off-diagonal of ``G*`` are those of ``A22`` (Chen et al. 2011, Vitezica
      et al. 2011; BLUPF90's ``TunedG 2``): ``b = (d_A − o_A) / (d_G − o_G)``,
      ``a = o_A − b o_G``;
    * ``A22⁻¹``, the inverse of the pedigree relationships among the genotyped
      animals, is the Schur complement of ``A⁻¹`` onto them, from one sparse
      Cholesky factor of ``A⁻¹`` over the genotyped animals and their ancestors,
      ordered with the genotyped last: no dense ``A22`` is inverted.

    With APY (Misztal 2016), ``G*⁻¹`` is replaced by
    ``[[G_cc⁻¹, 0], [0, 0]] + [−G_cc⁻¹ G_cn; I] M⁻¹ [−G_nc G_cc⁻¹, I]``,
    ``M = diag(g_ii − g_ic G_cc⁻¹ g_ci)`` over the non-core animals.

    The log-determinant is ``log|H| = log|A| − log|A22| + log|G*|`` (``|H| = |A| |G*|
    / |A22|``) when ``τ = ω = 1``; otherwise that of the inverse of ``H⁻¹``.

    Parameters
    ----------
    pedigree : Pedigree
    genotypes : DataFrame or genotype reader
        Allele counts 0, 1, 2 (NaN missing), one row per genotyped animal, indexed
        by the animals' ids; or an object with ``.samples`` (a DataFrame with an
        ``"iid"`` column) and ``.read()`` giving the (animals x markers) counts.
    blend : float in [0, 1)
        The weight of ``A22`` in ``G_b``.
    tune : {"a22", None}
        Tune ``G_b`` to ``A22`` as above, or not.
    tau, omega : float
        ``τ > 0`` scales ``G*⁻¹``, ``0 ≤ ω ≤ 1`` scales ``A22⁻¹``.
    apy : int or list of ids, optional
        The number of APY core animals (drawn at random among the genotyped) or the
        core animals themselves.
    seed : int, optional
        Seeds the draw of the APY core.

    Returns
    -------
    SingleStepRelationship
        A :class:`~henderson.genomic.RelationshipMatrix` holding ``H⁻¹`` (sparse, in
        the order of ``pedigree.ids``, the genotyped block dense) and ``log|H|``.

    Raises
    ------
    DataError
        Genotyped animals not in the pedigree or listed twice; counts other than 0,
        1, 2; no marker that varies; ``G*`` or ``G_cc`` not positive definite;
        ``blend``, ``tau``, ``omega``, ``tune`` or ``apy`` out of range.

    Examples
    --------
    >>> import pandas as pd
    >>> import henderson as hd
    >>> ped = hd.Pedigree(["s", "d", "c1", "c2", "c3", "g"], ["0", "0", "s", "s", "s", "c1"],
    ...                   ["0", "0", "d", "d", "0", "c3"])
    >>> genotypes = pd.DataFrame([[0, 1, 2, 1], [1, 1, 0, 2], [2, 0, 1, 1]],
    ...                          index=["c1", "c2", "g"])
    >>> H = hd.single_step(ped, genotypes)
    >>> H.matrix.shape, list(H.genotyped)
    ((6, 6), ['c1', 'c2', 'g'])
    >>> round(H.logdet(), 4)
    -2.3352
    """
    clock = _Clock()
    blend, tau, omega = checked_options(pedigree, blend, tune, tau, omega)
    ids, source, order, positions, genotyped = genotyped_in_pedigree_order(pedigree,
                                                                           genotypes)
    core = None if apy is None else _apy_core(apy, genotyped, seed)
    summary = marker_summary(source, order, ids)    # bad counts fail before the work
    clock.lap("checks")

    # A22⁻¹'s factor first: its sparse factorisation's transient copies are then not
    # on top of G's n x n arrays (at 20,000 genotyped each dense array is 3.2 GB)
    pruned, genotyped_in_pruned = prune_to_ancestors(pedigree, positions)
    L22 = a22_inverse_factor(*pruned, genotyped_in_pruned)
    logdet_A22 = -2.0 * float(np.sum(np.log(np.diag(L22))))
    clock.lap("A22_inverse_factor")
    G = genomic_relationships(source, row_order=order, summary=summary)
    clock.lap("G")
    G, tuning = blend_and_tune(G, a22_columns(*pruned, genotyped_in_pruned), blend, tune)
    clock.lap("A22_blend_and_tune")
    if core is None:
        block, logdet_G = _scaled_inverse(G, tau, genotyped)
    else:
        block, logdet_G = apy_inverse(G, core, genotyped)
        block *= tau
    del G
    clock.lap("G_inverse" if core is None else "apy_inverse")
    logdet_A = pedigree.logdet()
    logdet_H = logdet_A - logdet_A22 + logdet_G
    if tau != 1.0 or omega != 1.0:
        logdet_H = logdet_A - logdet_A22 - _logdet_genotyped_schur(block, L22, omega, genotyped)
    # block := τ G*⁻¹ − ω A22⁻¹ (lower triangle), A22⁻¹ = L22 L22'
    with dense_blas_threads(len(block)):
        block = blas.dsyrk(-omega, L22, beta=1.0, c=block, lower=1, overwrite_c=1)
    del L22
    clock.lap("block")
    Hinv = assemble_precision(pedigree.inverse(), positions, block)
    del block
    clock.lap("assembly")
    return SingleStepRelationship(
        Hinv, pedigree.ids, logdet_H, genotyped=genotyped, tuning=tuning,
        logdets={"A": logdet_A, "A22": logdet_A22, "G": logdet_G},
        core=None if core is None else genotyped[core], timings=clock.laps)


# ---------------------------------------------------------------- checks and input
def checked_options(pedigree, blend, tune, tau, omega) -> tuple[float, float, float]:
    """The checks of the single-step options; ``(blend, tau, omega)`` as floats."""
    if not isinstance(pedigree, Pedigree):
        raise TypeError(f"pedigree must be a henderson Pedigree, not {type(pedigree).__name__}")
    blend = _number_in("blend", blend, 0.0, 1.0, upper_open=True)
    tau = _number_in("tau", tau, 0.0, np.inf, lower_open=True)
    omega = _number_in("omega", omega, 0.0, 1.0)
    if tune not in TUNE_OPTIONS:
        raise DataError(f"tune must be 'a22' or None, not {tune!r}")
    return blend, tau, omega


def genotyped_in_pedigree_order(pedigree: Pedigree, genotypes):
    """``(ids, source, order, positions, genotyped)``: the genotypes' ids and their
    blocks of markers (:func:`_genotype_source`), the order of their rows that sorts
    them as the pedigree does, their sorted pedigree positions and ids."""
    ids, source = _genotype_source(genotypes)
    positions = _pedigree_positions(pedigree, ids)
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    return ids, source, order, positions, pedigree.ids[positions]


class _Clock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


def _number_in(name: str, value, low: float, high: float, lower_open: bool = False,
               upper_open: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and np.isfinite(value)
          and (value > low if lower_open else value >= low)
          and (value < high if upper_open else value <= high))
    if not ok:
        interval = (("(" if lower_open else "[") + f"{low:g}, {high:g}"
                    + (")" if upper_open or not np.isfinite(high) else "]"))
        raise DataError(f"{name} must be a number in {interval}, not {value!r}")
    return float(value)


class MarkerBlocks:
    """The genotypes of every genotyped animal, read a block of markers at a time.

    ``read(start, stop)`` gives the (animals x markers) counts of markers
    ``start:stop`` (NaN missing), rows in the order of the genotyped ids.
    """

    def __init__(self, read, n_animals: int, markers: pd.Index):
        self.read = read
        self.n_animals = n_animals
        self.markers = markers

    @classmethod
    def from_array(cls, counts: np.ndarray, markers: pd.Index | None = None) -> "MarkerBlocks":
        counts = np.asarray(counts)
        if counts.ndim != 2:
            raise DataError(f"genotypes must be a table of animals (rows) by markers "
                            f"(columns), not {counts.ndim}-dimensional")
        markers = pd.RangeIndex(counts.shape[1]) if markers is None else markers
        return cls(lambda start, stop: counts[:, start:stop], counts.shape[0], markers)

    @property
    def n_markers(self) -> int:
        return len(self.markers)


def _genotype_source(genotypes) -> tuple[pd.Index, MarkerBlocks]:
    """The genotyped ids (as text) and their counts by blocks of markers, not yet
    checked (numeric, any dtype: a DataFrame of text is refused here)."""
    if isinstance(genotypes, pd.DataFrame):
        ids = pd.Index(genotypes.index.astype(str))
        if _plain_numeric(genotypes):
            counts = genotypes.to_numpy()
        else:
            try:
                counts = genotypes.to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError):
                raise non_numeric_counts(genotypes, ids, "animal", "marker") from None
        source = MarkerBlocks.from_array(counts, genotypes.columns)
    elif hasattr(genotypes, "samples") and hasattr(genotypes, "read"):
        samples = genotypes.samples
        if "iid" not in getattr(samples, "columns", ()):
            raise DataError("a genotype reader's .samples must be a DataFrame with an "
                            "'iid' column (the animal ids)")
        ids = pd.Index(samples["iid"].astype(str))
        source = _reader_blocks(genotypes, len(ids))
    else:
        raise TypeError("genotypes must be a DataFrame (animals x markers, indexed by "
                        "animal id) or a reader with .samples and .read(), not "
                        f"{type(genotypes).__name__}")
    if source.n_animals != len(ids):
        raise DataError(f"genotypes have {source.n_animals} rows for {len(ids)} animal id(s)")
    if len(ids) == 0 or source.n_markers == 0:
        raise DataError(f"genotypes have {len(ids)} animal(s) and {source.n_markers} "
                        "marker(s)")
    if ids.has_duplicates:
        repeated = ids[ids.duplicated()].unique()
        raise DataError(f"{len(repeated)} genotyped animal(s) listed more than once: "
                        + ", ".join(map(repr, repeated[:10])))
    return ids, source


def _reader_blocks(reader, n_animals: int) -> MarkerBlocks:
    """Blocks from a reader: ``read(variants=slice)`` when it takes one (a PLINK file is
    then never held whole: 20,000 animals x 50,000 markers are 8 GB in float64),
    otherwise one ``read()``."""
    variants = getattr(reader, "variants", None)
    try:
        takes_variants = "variants" in inspect.signature(reader.read).parameters
    except (TypeError, ValueError):
        takes_variants = False
    if takes_variants and isinstance(variants, pd.DataFrame):
        names = (pd.Index(variants["snp"]) if "snp" in variants.columns
                 else pd.RangeIndex(len(variants)))
        return MarkerBlocks(lambda start, stop: reader.read(variants=slice(start, stop)),
                            n_animals, names)
    return MarkerBlocks.from_array(reader.read())


def _plain_numeric(frame: pd.DataFrame) -> bool:
    """NumPy integer or float columns only (no NA-holding extension types)."""
    return all(isinstance(t, np.dtype) and t.kind in "iuf" for t in frame.dtypes)


def _pedigree_positions(pedigree: Pedigree, ids: pd.Index) -> np.ndarray:
    positions = pedigree.ids.get_indexer(ids)
    if np.any(positions < 0):
        absent = ids[positions < 0]
        raise DataError(f"{len(absent)} genotyped animal(s) are not in the pedigree: "
                        + ", ".join(map(repr, absent[:10]))
                        + (" ..." if len(absent) > 10 else ""))
    return positions.astype(np.int64)


def _apy_core(apy, genotyped: pd.Index, seed) -> np.ndarray:
    """Sorted slots (in the pedigree order of the genotyped) of the APY core."""
    n = len(genotyped)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise DataError(f"seed must be an integer or None, not {seed!r}")
    if isinstance(apy, numbers.Integral) and not isinstance(apy, bool):
        if not 1 <= apy <= n:
            raise DataError(f"apy must be a number of core animals between 1 and the "
                            f"{n} genotyped, not {apy}")
        return np.sort(np.random.default_rng(seed).choice(n, size=int(apy), replace=False))
    if isinstance(apy, (str, bytes)) or not np.iterable(apy):
        raise DataError(f"apy must be a number of core animals or a list of their ids, "
                        f"not {apy!r}")
    core = pd.Index([str(a) for a in apy])
    if len(core) == 0:
        raise DataError("apy: the list of core animals is empty")
    if core.has_duplicates:
        raise DataError("apy core animal(s) listed more than once: "
                        + ", ".join(map(repr, core[core.duplicated()].unique()[:10])))
    slots = genotyped.get_indexer(core)
    if np.any(slots < 0):
        absent = core[slots < 0]
        raise DataError(f"{len(absent)} apy core animal(s) are not genotyped: "
                        + ", ".join(map(repr, absent[:10])))
    return np.sort(slots)


# ---------------------------------------------------------------- G
class MarkerSummary(NamedTuple):
    """What the first pass over the genotypes finds (see :func:`marker_summary`)."""

    frequency: np.ndarray      # allele frequency p of each marker (non-missing counts)
    varies: np.ndarray         # whether the marker has two genotypes or more
    u: np.ndarray              # M 2p over the markers that vary, one value per animal
    has_missing: bool


def marker_summary(counts, row_order: np.ndarray | None = None,
                   animals: pd.Index | None = None) -> MarkerSummary:
    """Check the counts (0, 1, 2 or NaN) and find the allele frequencies, the markers
    that vary and ``u = M 2p``, a block of markers at a time.

    Parameters
    ----------
    counts : array (animals x markers) or MarkerBlocks
    row_order : array of int, optional
        The order of the animals (rows of ``counts``) in G.
    animals : Index, optional
        The ids of the rows of ``counts``, to name an animal in an error.
    """
    source = counts if isinstance(counts, MarkerBlocks) else MarkerBlocks.from_array(counts)
    n, n_markers, markers = source.n_animals, source.n_markers, source.markers
    rows = np.arange(n) if row_order is None else np.asarray(row_order)
    animals = pd.RangeIndex(n) if animals is None else animals
    frequency = np.zeros(n_markers)
    varies = np.zeros(n_markers, dtype=bool)
    u = np.zeros(n)
    has_missing = False
    for start in range(0, n_markers, MARKER_BLOCK):
        stop = min(start + MARKER_BLOCK, n_markers)
        block = np.asarray(source.read(start, stop))[rows]
        if block.dtype.kind in "iu":
            # integer counts (int8 from a simulation or a PLINK reader): no float copy
            # of the block (60,000 animals x 1,024 markers are 490 MB in float64)
            wrong = (block < 0) | (block > 2)
            missing = None
        else:
            block = np.asarray(block, dtype=np.float64)
            missing = np.isnan(block)
            wrong = ~(missing | (block == 0.0) | (block == 1.0) | (block == 2.0))
        if wrong.any():
            i, j = np.argwhere(wrong)[0]
            raise DataError(f"genotypes must be allele counts 0, 1 or 2 (NaN missing), not "
                            f"{block[i, j]:g} (animal {animals[rows[i]]!r}, marker "
                            f"{markers[start + j]!r})")
        if missing is None:
            observed = np.full(block.shape[1], block.shape[0])
            low, high = block.min(axis=0), block.max(axis=0)
            totals = block.sum(axis=0, dtype=np.int64)
        else:
            observed = (~missing).sum(axis=0)
            has_missing |= bool(missing.any())
            low = np.where(missing, np.inf, block).min(axis=0)
            high = np.where(missing, -np.inf, block).max(axis=0)
            totals = np.nansum(block, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(observed > 0, totals / (2.0 * observed), 0.0)
        frequency[start:stop] = p
        varies[start:stop] = high > low
        weights = np.where(high > low, 2.0 * p, 0.0)
        if missing is None:
            _add_row_products(block, weights, u)
        else:
            block[missing] = 0.0
            u += block @ weights
    if not varies.any():
        raise DataError(f"none of the {n_markers} markers varies across the {n} genotyped "
                        "animals: G needs markers whose genotypes differ")
    return MarkerSummary(frequency, varies, u, has_missing)


@numba.njit(cache=True, nogil=True)
def _add_row_products(block, weights, out):
    """``out += block @ weights`` for an integer block, without a float copy of it."""
    for i in range(block.shape[0]):
        total = 0.0
        for j in range(block.shape[1]):
            total += block[i, j] * weights[j]
        out[i] += total


def genomic_relationships(counts, row_order: np.ndarray | None = None,
                          animals: pd.Index | None = None,
                          summary: MarkerSummary | None = None) -> np.ndarray:
    """VanRaden's G (method 1) as a dense Fortran-ordered array (full, symmetric).

    A first pass (:func:`marker_summary`, unless its ``summary`` is given) checks the
    counts and finds the allele frequencies ``p``, the markers that vary and
    ``u = M 2p``; the second accumulates ``M M'``. Without missing counts ``M M'`` is
    crossed in float32 on the raw counts (exact: integer sums below 2^24) and centred
    in float64, ``Z Z' = M M' − u 1' − 1 u' + 4 p'p``; with missing counts the
    centred counts (0 where missing) are crossed in float64.

    Parameters
    ----------
    counts : array (animals x markers) or MarkerBlocks
        Allele counts 0, 1, 2, NaN for missing.
    row_order : array of int, optional
        The order of the animals in G (rows of ``counts``).
    animals : Index, optional
        The ids of the rows of ``counts``, to name an animal in an error.
    summary : MarkerSummary, optional
        The first pass, when already made.
    """
    source = counts if isinstance(counts, MarkerBlocks) else MarkerBlocks.from_array(counts)
    n, n_markers = source.n_animals, source.n_markers
    rows = np.arange(n) if row_order is None else np.asarray(row_order)
    if summary is None:
        summary = marker_summary(source, rows, animals)
    freq, varies, u = summary.frequency, summary.varies, summary.u
    p = freq[varies]
    scale = 2.0 * float(np.sum(p * (1.0 - p)))
    exact32 = not summary.has_missing and len(p) < FLOAT32_EXACT_MARKERS
    G = np.zeros((n, n), dtype=np.float32 if exact32 else np.float64, order="F")
    for start in range(0, n_markers, MARKER_BLOCK):
        stop = min(start + MARKER_BLOCK, n_markers)
        kept = varies[start:stop]
        if not kept.any():
            continue
        block = np.asarray(source.read(start, stop))[np.ix_(rows, np.flatnonzero(kept))]
        if exact32:
            with dense_blas_threads(n, itemsize=4):
                G = blas.ssyrk(1.0, np.asfortranarray(block, dtype=np.float32), beta=1.0,
                               c=G, lower=1, overwrite_c=1)
        else:
            centred = np.asfortranarray(block, dtype=np.float64) - 2.0 * freq[start:stop][kept]
            centred[np.isnan(centred)] = 0.0
            with dense_blas_threads(n):
                G = blas.dsyrk(1.0, centred, beta=1.0, c=G, lower=1, overwrite_c=1)
    if exact32:
        G = G.astype(np.float64, order="F")
        centre_count_products(G, u, u, p)    # on the lower triangle that syrk wrote
    G /= scale
    _mirror_lower(G)
    return G


def centre_count_products(products: np.ndarray, u_rows: np.ndarray, u_columns: np.ndarray,
                          p: np.ndarray) -> None:
    """Raw count products ``M_r M_c'`` to centred ``Z_r Z_c'`` in place:
    ``Z_r Z_c' = M_r M_c' − u_r 1' − 1 u_c' + 4 p'p`` with ``u = M 2p`` (the markers
    that vary, ``p`` their frequencies)."""
    products -= u_rows[:, None]
    products -= u_columns[None, :]
    products += 4.0 * float(p @ p)


def _mirror_lower(matrix: np.ndarray, block: int = 2048) -> None:
    """Copy the lower triangle of a square array onto its upper, in place, a block of
    columns at a time (no second n x n array)."""
    n = len(matrix)
    for start in range(0, n, block):
        stop = min(start + block, n)
        matrix[:start, start:stop] = matrix[start:stop, :start].T
        diagonal = matrix[start:stop, start:stop]
        diagonal[:] = np.tril(diagonal) + np.tril(diagonal, -1).T


# ---------------------------------------------------------------- A22 and A22⁻¹
def prune_to_ancestors(pedigree: Pedigree, positions: np.ndarray):
    """The genotyped animals and their ancestors as a pedigree of their own
    (``sire``, ``dam``, Mendelian-sampling variances ``d``, parents first), and the
    positions in it of the genotyped animals (``positions`` sorted).

    Relationships among animals depend only on their ancestors, so ``A`` of the
    pruned pedigree is ``A`` of the full one restricted to these animals, and its
    inverse gives ``A22⁻¹`` exactly.
    """
    keep = np.zeros(len(pedigree), dtype=bool)
    keep[positions] = True
    frontier = positions
    while len(frontier):
        parents = np.concatenate([pedigree.sire[frontier], pedigree.dam[frontier]])
        parents = np.unique(parents[parents >= 0])
        frontier = parents[~keep[parents]]
        keep[frontier] = True
    members = np.flatnonzero(keep)
    new_position = np.full(len(pedigree), -1, dtype=np.int64)
    new_position[members] = np.arange(len(members))
    relabel = lambda parent: np.where(parent >= 0, new_position[np.maximum(parent, 0)], -1)
    d = np.maximum(pedigree.mendelian_variances[members], MIN_MENDELIAN_VARIANCE)
    pruned = (relabel(pedigree.sire[members]), relabel(pedigree.dam[members]), d)
    return pruned, new_position[positions]


@numba.njit(cache=True, nogil=True)
def relationship_columns(sire, dam, d, columns, rows):
    """``A[rows, columns]`` without A (Colleau 2002): ``A = T D T'`` with ``T =
    (I − P)⁻¹``, ``P`` holding ½ at each animal's parents, so a column of A is a
    sweep up the pedigree (``T'``: offspring pass ½ of their value to their parents)
    and one down (``T``: ½ of the parents' mean), O(animals) each.

    ``sire``, ``dam``: parent positions (-1 unknown), parents first; ``d``: the
    Mendelian-sampling variances.
    """
    n, k = len(sire), len(columns)
    x = np.zeros((n, k))
    last = 0
    for c in range(k):
        x[columns[c], c] = 1.0
        last = max(last, columns[c])
    for r in rows:
        last = max(last, r)
    for i in range(last, -1, -1):
        s, m = sire[i], dam[i]
        if s >= 0:
            for c in range(k):
                x[s, c] += 0.5 * x[i, c]
        if m >= 0:
            for c in range(k):
                x[m, c] += 0.5 * x[i, c]
    for i in range(last + 1):
        s, m = sire[i], dam[i]
        for c in range(k):
            value = d[i] * x[i, c]
            if s >= 0:
                value += 0.5 * x[s, c]
            if m >= 0:
                value += 0.5 * x[m, c]
            x[i, c] = value
    out = np.empty((len(rows), k))
    for a in range(len(rows)):
        for c in range(k):
            out[a, c] = x[rows[a], c]
    return out


def a22_columns(sire: np.ndarray, dam: np.ndarray, d: np.ndarray, genotyped: np.ndarray):
    """Yield ``(start, stop, A22[:, start:stop])``: ``A22`` among the ``genotyped``
    positions of a pedigree (parents first), a block of columns at a time by
    :func:`relationship_columns`, so that the whole of it is never held."""
    genotyped = np.asarray(genotyped, dtype=np.int64)
    for start in range(0, len(genotyped), A22_COLUMN_BLOCK):
        stop = min(start + A22_COLUMN_BLOCK, len(genotyped))
        yield start, stop, relationship_columns(sire, dam, d, genotyped[start:stop], genotyped)


def a22(sire: np.ndarray, dam: np.ndarray, d: np.ndarray, genotyped: np.ndarray) -> np.ndarray:
    """Dense ``A22`` (Fortran order), from :func:`a22_columns`."""
    out = np.empty((len(genotyped), len(genotyped)), order="F")
    for start, stop, columns in a22_columns(sire, dam, d, genotyped):
        out[:, start:stop] = columns
    return out


def ainverse_of(sire: np.ndarray, dam: np.ndarray, d: np.ndarray,
                lower: bool = False) -> sp.csc_matrix:
    """``A⁻¹`` of a pedigree given as parent positions (parents first) and
    Mendelian-sampling variances (Henderson's rules), CSC with sorted rows: the whole
    symmetric matrix, or its lower triangle (diagonal first in each column)."""
    n = len(sire)
    rows, cols, vals = _ainverse_triplets(sire, dam, d)
    triangle = sp.csc_matrix((vals, (rows, cols)), shape=(n, n))   # duplicates summed
    triangle.sort_indices()
    if lower:
        return triangle
    full = (triangle + sp.tril(triangle, -1).T).tocsc()
    full.sort_indices()
    return full


def check_conditional_variances(m: np.ndarray, g_diagonal: np.ndarray,
                                names: pd.Index) -> None:
    """APY: every non-core animal's conditional variance given the core above
    ``CONDITIONAL_VARIANCE_FLOOR`` of its ``g_ii`` (``names``: the non-core ids)."""
    floor = CONDITIONAL_VARIANCE_FLOOR * g_diagonal
    if len(m) and not np.all(m > floor):
        i = int(np.flatnonzero(~(m > floor))[0])
        raise DataError(f"APY: the conditional variance of non-core animal {names[i]!r} "
                        f"given the core is {m[i]:.3g}, not above "
                        f"{CONDITIONAL_VARIANCE_FLOOR:g} of its g_ii (its genotypes are "
                        "those of core animals, or nearly); use a larger blend or another "
                        "core")


def a22_inverse_factor(sire: np.ndarray, dam: np.ndarray, d: np.ndarray,
                       genotyped: np.ndarray) -> np.ndarray:
    """``L22`` (dense, lower, Fortran order) with ``A22⁻¹ = L22 L22'``.

    ``A22⁻¹`` is the Schur complement of ``A⁻¹`` onto the genotyped animals,
    ``A^{22} − A^{21} (A^{11})⁻¹ A^{12}``. With the other animals first (in a
    fill-reducing AMD order among themselves) and the genotyped last, the trailing
    block of the Cholesky factor of the permuted ``A⁻¹`` is its factor:
    ``P A⁻¹ P' = L L'`` gives ``A22⁻¹ = L22 L22'`` and ``log|A22| = −2 Σ log
    diag(L22)``. Only the pruned pedigree's ``A⁻¹`` (see :func:`prune_to_ancestors`)
    is factored.
    """
    n = len(sire)
    genotyped = np.asarray(genotyped, dtype=np.int64)
    full = ainverse_of(sire, dam, d)
    is_genotyped = np.zeros(n, dtype=bool)
    is_genotyped[genotyped] = True
    others = np.flatnonzero(~is_genotyped)
    if len(others) > 1:
        factor = cholmod_analyze(sp.tril(full[others][:, others]).tocsc(), ordering="amd")
        others = others[cholmod_permutation(factor)]
    permutation = np.concatenate([others, genotyped])
    permuted = sp.tril(full[permutation][:, permutation]).tocsc()
    del full
    factor = cholmod_analyze(permuted, ordering="natural", mode="supernodal")
    cholmod_refactor(factor, permuted)
    del permuted
    # the factor is not used again, so it is converted in place: the copy that
    # cholmod_lower_factor converts instead would be a second dense n_g²/2 block
    # (measured at 14,000 genotyped: peak +3.8 GB against +5.5 GB)
    L = sp.csc_matrix(factor.L())
    del factor
    start = len(others)
    offset = L.indptr[start]
    trailing = sp.csc_matrix((L.data[offset:], L.indices[offset:] - start,
                              L.indptr[start:] - offset), shape=(n - start, n - start))
    del L
    return trailing.toarray(order="F")


# ---------------------------------------------------------------- G* and its inverse
def blend_and_tune(G: np.ndarray, A22, blend: float,
                   tune: str | None) -> tuple[np.ndarray, tuple[float, float]]:
    """``G* = a + b ((1 − blend) G + blend A22)``, in place on ``G``, and ``(a, b)``:
    ``b = (d_A − o_A) / (d_G − o_G)``, ``a = o_A − b o_G`` with ``d``, ``o`` the means
    of the diagonal and off-diagonal of ``A22`` and of the blended G (``(0, 1)`` when
    ``tune`` is None).

    ``A22`` is a dense array or blocks of its columns as :func:`a22_columns` yields
    them (one block of A22 in memory at a time beside G).
    """
    n = len(G)
    if tune is not None and n < 2:
        raise DataError("tuning G to A22 needs at least two genotyped animals "
                        "(tune=None for one)")
    blocks = [(0, n, A22)] if isinstance(A22, np.ndarray) else A22
    trace_A = total_A = 0.0
    for start, stop, columns in blocks:
        trace_A += float(np.trace(columns[start:stop]))
        total_A += float(columns.sum())
        if blend:
            G[:, start:stop] *= 1.0 - blend
            G[:, start:stop] += blend * columns
    if tune is None:
        return G, (0.0, 1.0)
    a, b = tuning_to_a22(trace_A, total_A, float(np.trace(G)), float(G.sum()), n)
    G *= b
    G += a
    return G, (a, b)


def tuning_to_a22(trace_A: float, total_A: float, trace_G: float, total_G: float,
                  n: int) -> tuple[float, float]:
    """``(a, b)`` of ``G* = a + b G``: ``b = (d_A − o_A) / (d_G − o_G)``, ``a = o_A −
    b o_G`` with ``d``, ``o`` the means of the diagonal and off-diagonal of A22 and of
    G (n x n), from their traces and the sums of their entries."""
    diag_A, off_A = _means(trace_A, total_A, n)
    diag_G, off_G = _means(trace_G, total_G, n)
    if not diag_G - off_G > 0:
        raise DataError(f"cannot tune G to A22: the mean diagonal of G ({diag_G:.6g}) is not "
                        f"above its mean off-diagonal ({off_G:.6g}); tune=None")
    b = (diag_A - off_A) / (diag_G - off_G)
    return float(off_A - b * off_G), float(b)


def _means(trace: float, total: float, n: int) -> tuple[float, float]:
    """Means of the diagonal and of the off-diagonal entries of an n x n matrix from
    its trace and the sum of its entries."""
    return trace / n, (total - trace) / (n * (n - 1))


def _cholesky_in_place(matrix: np.ndarray, what: str, labels: pd.Index, hint: str) -> np.ndarray:
    with dense_blas_threads(len(matrix)):
        factor, info = lapack.dpotrf(matrix, lower=1, clean=0, overwrite_a=1)
    if info > 0:
        raise DataError(f"{what} is not positive definite (pivot {info} of {len(labels)}, "
                        f"genotyped animal {labels[info - 1]!r}); {hint}")
    if info < 0:
        raise ValueError(f"dpotrf: illegal argument {-info}")
    return factor


def _scaled_inverse(G: np.ndarray, tau: float, genotyped: pd.Index) -> tuple[np.ndarray, float]:
    """``τ G⁻¹`` (lower triangle, in place on ``G``) and ``log|G|``."""
    factor = _cholesky_in_place(G, "G* (G blended with A22, then tuned)", genotyped,
                                "use a larger blend, e.g. blend=0.1")
    logdet = 2.0 * float(np.sum(np.log(np.diag(factor))))
    inverse, info = lapack.dpotri(factor, lower=1, overwrite_c=1)
    if info:
        raise DataError(f"G* cannot be inverted (dpotri info {info})")
    if tau != 1.0:
        inverse *= tau
    return inverse, logdet


def apy_inverse(G: np.ndarray, core: np.ndarray, genotyped: pd.Index) -> tuple[np.ndarray, float]:
    """``G_APY⁻¹`` (Misztal 2016; full, Fortran order, over the same animals as
    ``G``, which it overwrites) and ``log|G_APY| = log|G_cc| + Σ log m_i``.

    ``G_APY⁻¹ = [[G_cc⁻¹, 0], [0, 0]] + [−G_cc⁻¹ G_cn; I] M⁻¹ [−G_nc G_cc⁻¹, I]``
    with ``M = diag(g_ii − g_ic G_cc⁻¹ g_ci)`` over the non-core animals ``n``.
    """
    n = len(G)
    is_core = np.zeros(n, dtype=bool)
    is_core[core] = True
    other = np.flatnonzero(~is_core)
    core_factor = _cholesky_in_place(np.asfortranarray(G[np.ix_(core, core)]),
                                     "G_cc (G* among the APY core)", genotyped[core],
                                     "use a larger blend or another core")
    logdet = 2.0 * float(np.sum(np.log(np.diag(core_factor))))
    if len(other):
        G_cn = np.asfortranarray(G[np.ix_(core, other)])
        solved, info = lapack.dpotrs(core_factor, G_cn, lower=1)   # G_cc⁻¹ G_cn
        m = G[other, other] - np.einsum("ij,ij->j", G_cn, solved)
        del G_cn
        check_conditional_variances(m, G[other, other], genotyped[other])
        logdet += float(np.sum(np.log(m)))
    core_inverse, info = lapack.dpotri(core_factor, lower=1, overwrite_c=1)
    _mirror_lower(core_inverse)
    out = G  # G is not needed any more: G_APY⁻¹ is written over it
    out[:] = 0.0
    if len(other):
        scaled = solved / np.sqrt(m)
        with dense_blas_threads(len(core_inverse)):
            core_inverse = blas.dsyrk(1.0, np.asfortranarray(scaled), beta=1.0,
                                      c=core_inverse, lower=1, overwrite_c=1)
        _mirror_lower(core_inverse)
        off = -(solved / m)                # the core x non-core block
        out[np.ix_(core, other)] = off
        out[np.ix_(other, core)] = off.T
        out[other, other] = 1.0 / m
    out[np.ix_(core, core)] = core_inverse
    return out, logdet


def _logdet_genotyped_schur(block: np.ndarray, L22: np.ndarray, omega: float,
                            genotyped: pd.Index) -> float:
    """``log|τ G*⁻¹ + (1 − ω) A22⁻¹|``, the Schur complement of ``H⁻¹`` onto the
    genotyped animals (``|H⁻¹| = |A⁻¹| / |A22⁻¹| · |that|``)."""
    with dense_blas_threads(len(block)):
        schur = blas.dsyrk(1.0 - omega, L22, beta=1.0, c=block.copy(order="F"), lower=1,
                           overwrite_c=1)
    factor = _cholesky_in_place(schur, "H⁻¹ (with these tau and omega)", genotyped,
                                "use tau and omega closer to 1")
    return 2.0 * float(np.sum(np.log(np.diag(factor))))


# ---------------------------------------------------------------- assembly
@numba.njit(cache=True, nogil=True)
def _column_counts(indptr, indices, slot, n_genotyped):
    """Entries of each column of ``A⁻¹ + block``: A⁻¹'s, plus for a genotyped column
    every genotyped row (those of A⁻¹ among them counted once)."""
    n = len(indptr) - 1
    counts = np.empty(n, dtype=np.int64)
    for j in range(n):
        if slot[j] < 0:
            counts[j] = indptr[j + 1] - indptr[j]
        else:
            outside = 0
            for p in range(indptr[j], indptr[j + 1]):
                if slot[indices[p]] < 0:
                    outside += 1
            counts[j] = outside + n_genotyped
    return counts


@numba.njit(cache=True, nogil=True)
def _fill_columns(indptr, indices, data, slot, genotyped, block, out_indptr, out_indices,
                  out_data):
    """Write ``A⁻¹ + block`` (``block`` dense over the sorted ``genotyped`` positions,
    its lower triangle read) column by column, rows sorted."""
    n = len(indptr) - 1
    n_genotyped = len(genotyped)
    for j in range(n):
        q = out_indptr[j]
        p, stop = indptr[j], indptr[j + 1]
        k = slot[j]
        if k < 0:
            for t in range(p, stop):
                out_indices[q] = indices[t]
                out_data[q] = data[t]
                q += 1
            continue
        for a in range(n_genotyped):
            row = genotyped[a]
            extra = 0.0
            while p < stop and indices[p] <= row:
                if indices[p] == row:
                    extra = data[p]
                else:  # a genotyped row below `row` was taken at its own turn
                    out_indices[q] = indices[p]
                    out_data[q] = data[p]
                    q += 1
                p += 1
            out_indices[q] = row
            out_data[q] = extra + (block[a, k] if a >= k else block[k, a])
            q += 1
        while p < stop:
            out_indices[q] = indices[p]
            out_data[q] = data[p]
            q += 1
            p += 1


def assemble_precision(ainverse: sp.csc_matrix, genotyped: np.ndarray,
                       block: np.ndarray) -> sp.csc_matrix:
    """``A⁻¹ + [[0, 0], [0, block]]`` as CSC, written directly (no triplets of the
    dense block: 20,000 genotyped animals are 4·10⁸ entries).

    ``genotyped``: sorted positions of the block's rows and columns; ``block``: its
    lower triangle is read.
    """
    ainverse = sp.csc_matrix(ainverse)
    if not ainverse.has_sorted_indices:
        ainverse = ainverse.sorted_indices()
    n = ainverse.shape[0]
    slot = np.full(n, -1, dtype=np.int64)
    slot[genotyped] = np.arange(len(genotyped))
    counts = _column_counts(ainverse.indptr, ainverse.indices, slot, len(genotyped))
    nnz = int(counts.sum())
    index_type = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n + 1, dtype=index_type)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(nnz, dtype=index_type)
    data = np.empty(nnz)
    _fill_columns(ainverse.indptr, ainverse.indices, ainverse.data, slot,
                  np.asarray(genotyped, dtype=np.int64), block, indptr, indices, data)
    matrix = sp.csc_matrix((data, indices, indptr), shape=(n, n), copy=False)
    matrix.has_sorted_indices = True
    return matrix
