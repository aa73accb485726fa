"""Known level covariances for random terms: relationship matrices and GRMs.

A random term ``(1 | animal)`` may carry a known covariance ``K`` over its levels
(``G_t = K ⊗ Σ_t``). The solver only ever needs ``K⁻¹`` (sparse for a pedigree, dense
for a genomic matrix) and ``log|K|``, which :class:`RelationshipMatrix` supplies.
``grm`` builds VanRaden's genomic relationship matrix (method 1).
"""
from __future__ import annotations

import numbers
import warnings

import numba
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from .errors import DataError
from .threads import dense_blas_threads

# |K − K'| up to this times max |K| is rounding (K is then made exactly symmetric);
# more is an error
SYMMETRY_TOLERANCE = 1e-8


def _name(labels: pd.Index, i: int, j: int) -> str:
    return f"[{labels[i]!r}, {labels[j]!r}]"


def _checked_symmetric(matrix, labels: pd.Index, what: str):
    """``matrix`` made exactly symmetric, or a :class:`DataError` naming the entry that
    is not finite or whose transpose differs by more than rounding."""
    if sp.issparse(matrix):
        matrix = sp.csc_matrix(matrix, dtype=float)
        coo = matrix.tocoo()
        bad = ~np.isfinite(coo.data)
        if bad.any():
            k = np.flatnonzero(bad)[0]
            raise DataError(f"{what} has a missing or infinite value at "
                            f"{_name(labels, coo.row[k], coo.col[k])}")
        difference = (matrix - matrix.T).tocoo()
        values, rows, cols = difference.data, difference.row, difference.col
        scale = np.abs(coo.data).max(initial=0.0)
    else:
        bad = ~np.isfinite(matrix)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataError(f"{what} has a missing or infinite value at {_name(labels, i, j)}")
        # the largest |K_ij − K_ji|, a block of rows at a time (no second m x m array)
        values, rows, cols = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        for start in range(0, len(matrix), 1024):
            block = np.abs(matrix[start:start + 1024] - matrix[:, start:start + 1024].T)
            if block.size and block.max() > abs(values[0]):
                i, j = np.unravel_index(np.argmax(block), block.shape)
                values[0], rows[0], cols[0] = block[i, j], start + i, j
        scale = np.abs(matrix).max(initial=0.0)
    if not len(values) or not np.any(values):
        return matrix
    k = int(np.argmax(np.abs(values)))
    if abs(values[k]) > SYMMETRY_TOLERANCE * scale:
        i, j = sorted((rows[k], cols[k]))
        raise DataError(f"{what} is not symmetric: {_name(labels, i, j)} = {matrix[i, j]:.6g} "
                        f"but {_name(labels, j, i)} = {matrix[j, i]:.6g}")
    return (matrix + matrix.T) / 2.0


class RelationshipMatrix:
    """A labelled covariance or precision over the levels of a grouping factor.

    Parameters
    ----------
    matrix : array or sparse matrix, (m, m), symmetric positive definite
    labels : sequence of m level labels
    kind : {"covariance", "precision"}
    logdet_covariance : float, optional
        ``log|K|`` when already known (else computed).
    diagonal : array, optional
        ``diag(K)`` when known (a precision's is not computed).
    check : bool, default True
        Refuse a matrix with a missing or infinite value, or one that is not
        symmetric (up to rounding: it is then made exactly symmetric). Positive
        definiteness is checked when ``K⁻¹`` or ``log|K|`` is first computed.

    Raises
    ------
    DataError
        A non-numeric, non-square, missing, infinite or asymmetric matrix; labels not
        matching its size or not unique; (later) a matrix that is not positive
        definite.

    Examples
    --------
    >>> import numpy as np
    >>> K = RelationshipMatrix(np.array([[1.0, 0.5], [0.5, 1.0]]), ["a", "b"])
    >>> K.precision().toarray().round(3)
    array([[ 1.333, -0.667],
           [-0.667,  1.333]])
    """

    def __init__(self, matrix, labels, kind: str = "covariance",
                 logdet_covariance: float | None = None, diagonal=None, check: bool = True):
        if kind not in ("covariance", "precision"):
            raise ValueError(f"kind must be 'covariance' or 'precision', not {kind!r}")
        if not sp.issparse(matrix):
            try:
                matrix = np.asarray(matrix, dtype=float)
            except (TypeError, ValueError) as exc:
                raise DataError(f"relationship {kind} matrix must be numeric: {exc}") from exc
        self.labels = pd.Index(pd.Index(labels).astype(str))
        if matrix.ndim != 2 or matrix.shape != (len(self.labels), len(self.labels)):
            raise DataError(f"relationship {kind} matrix is {matrix.shape} but has "
                            f"{len(self.labels)} labels")
        if self.labels.has_duplicates:
            repeated = self.labels[self.labels.duplicated()].unique()
            raise DataError("relationship matrix labels are not unique: "
                            + ", ".join(map(repr, repeated[:10])))
        self.matrix = (_checked_symmetric(matrix, self.labels, f"relationship {kind} matrix")
                       if check else matrix)
        self.kind = kind
        self._diagonal = None if diagonal is None else np.asarray(diagonal, dtype=float)
        self._logdet = logdet_covariance
        self._precision = None

    def precision(self) -> sp.csc_matrix:
        """``K⁻¹`` as a sparse matrix (a dense covariance is inverted through its
        Cholesky factor, which also gives ``log|K|``)."""
        if self._precision is None:
            if self.kind == "precision":
                self._precision = sp.csc_matrix(self.matrix)
            else:
                dense = self.matrix.toarray() if sp.issparse(self.matrix) else np.asarray(self.matrix)
                try:
                    with dense_blas_threads(len(dense)):
                        factor = scipy.linalg.cho_factor(dense, lower=True)
                except (np.linalg.LinAlgError, ValueError) as exc:
                    raise DataError("relationship matrix is not positive definite; blend "
                                    "it (e.g. hd.grm(..., blend=0.05))") from exc
                self._logdet = 2.0 * float(np.sum(np.log(np.diag(factor[0]))))
                self._precision = sp.csc_matrix(scipy.linalg.cho_solve(factor, np.eye(len(dense))))
        return self._precision

    def diagonal(self) -> np.ndarray | None:
        """``diag(K)`` when known without inverting a precision (None otherwise)."""
        if self._diagonal is None and self.kind == "covariance":
            m = self.matrix
            self._diagonal = np.asarray(m.diagonal() if sp.issparse(m) else np.diag(m), dtype=float)
        return self._diagonal

    def logdet(self) -> float:
        """``log|K|`` of the covariance.

        Raises
        ------
        DataError
            The matrix is not positive definite.
        """
        if self._logdet is None:
            if self.kind == "covariance":
                self.precision()
            else:
                from sksparse.cholmod import CholmodError

                from .linalg import cholmod_analyze, cholmod_refactor

                lower = sp.tril(self.precision()).tocsc()
                try:
                    factor = cholmod_analyze(lower, ordering="amd")
                    cholmod_refactor(factor, lower)
                    pivots = factor.D()
                except CholmodError as exc:
                    raise DataError("relationship precision matrix is not positive "
                                    f"definite ({exc})") from exc
                # a simplicial LDL' factor of an indefinite matrix has pivots <= 0
                # instead of an error
                if not np.all(pivots > 0):
                    raise DataError("relationship precision matrix is not positive definite "
                                    f"({int(np.sum(~(pivots > 0)))} pivot(s) <= 0)")
                self._logdet = -float(np.sum(np.log(pivots)))
        return self._logdet


def as_relationship(known) -> RelationshipMatrix:
    """A :class:`RelationshipMatrix` from a Pedigree, a RelationshipMatrix or a
    labelled covariance DataFrame (the same labels on rows and columns, in any order;
    compared as text, so that an integer index matches the text header of a CSV)."""
    from .pedigree import Pedigree

    if isinstance(known, RelationshipMatrix):
        return known
    if getattr(known, "kind", None) == "implicit precision":
        raise DataError("this H⁻¹ (hd.implicit_single_step) is an operator, not a matrix: "
                        "REML and exact PEVs need a factor of the equations, which its dense "
                        "genotyped block rules out; solve with known variances by "
                        "hd.solve_blup(formula, data, {group: H}, variances)")
    if isinstance(known, Pedigree):
        # A⁻¹ is symmetric and finite by construction: no check of its millions of entries
        return RelationshipMatrix(known.inverse(), known.ids, kind="precision",
                                  logdet_covariance=known.logdet(),
                                  diagonal=1.0 + known.inbreeding, check=False)
    if isinstance(known, pd.DataFrame):
        rows = pd.Index(known.index.astype(str))
        columns = pd.Index(known.columns.astype(str))
        for axis, labels in (("rows", rows), ("columns", columns)):
            if labels.has_duplicates:
                raise DataError(f"a covariance DataFrame has repeated labels on its {axis}: "
                                + ", ".join(map(repr, labels[labels.duplicated()][:10])))
        if not rows.equals(columns):
            only_rows, only_columns = rows.difference(columns), columns.difference(rows)
            if len(only_rows) or len(only_columns):
                raise DataError(
                    "a covariance DataFrame needs the same labels on rows and columns: "
                    f"{len(only_rows)} only on rows ({', '.join(map(repr, only_rows[:5]))}), "
                    f"{len(only_columns)} only on columns "
                    f"({', '.join(map(repr, only_columns[:5]))})")
        frame = known.set_axis(rows, axis=0).set_axis(columns, axis=1)[rows]
        try:
            values = frame.mask(frame.isna(), np.nan).to_numpy(dtype=float)
        except (TypeError, ValueError) as exc:
            numbers = frame.apply(pd.to_numeric, errors="coerce")
            bad = numbers.isna().to_numpy() & frame.notna().to_numpy()
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise DataError(f"a covariance DataFrame must be numeric: entry "
                                f"({frame.index[i]!r}, {frame.columns[j]!r}) is "
                                f"{frame.iat[i, j]!r}") from None
            raise DataError(f"a covariance DataFrame must be numeric: {exc}") from exc
        return RelationshipMatrix(values, rows, kind="covariance")
    raise TypeError("relationships values must be a Pedigree, a RelationshipMatrix or a "
                    f"labelled covariance DataFrame, not {type(known).__name__}")


def _genotype_matrix(genotypes) -> tuple[np.ndarray, pd.Index, pd.Index]:
    """Genotypes as a float (animals × markers) array of 0/1/2, with the animal and
    marker labels; a :class:`DataError` naming the first cell that is missing or not
    an allele count."""
    if np.ndim(genotypes) != 2:
        raise DataError(f"genotypes must be a table of animals (rows) by markers (columns), "
                        f"not {np.ndim(genotypes)}-dimensional with shape "
                        f"{np.shape(genotypes)}; one marker is a column: reshape(-1, 1)")
    frame = genotypes if isinstance(genotypes, pd.DataFrame) else pd.DataFrame(genotypes)
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError(f"genotypes have {frame.shape[0]} animal(s) and {frame.shape[1]} "
                        "marker(s)")
    animals, markers = frame.index, frame.columns
    where = lambda i, j: f"animal {animals[i]!r}, marker {markers[j]!r}"
    missing = frame.isna().to_numpy()
    if missing.any():
        i, j = np.argwhere(missing)[0]
        raise DataError(f"genotypes have {int(missing.sum())} missing value(s) (first: "
                        f"{where(i, j)}); impute them first")
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        numeric = frame.apply(pd.to_numeric, errors="coerce").isna().to_numpy()
        i, j = np.argwhere(numeric)[0]
        raise DataError(f"genotypes must be allele counts 0, 1 or 2, not "
                        f"{frame.iat[i, j]!r} ({where(i, j)}); recode letter genotypes "
                        "(AA/AB/BB) as counts of one allele") from None
    wrong = ~np.isin(values, (0.0, 1.0, 2.0))
    if wrong.any():
        i, j = np.argwhere(wrong)[0]
        raise DataError(f"genotypes must be allele counts 0, 1 or 2, not {values[i, j]:g} "
                        f"({where(i, j)})")
    return values, animals, markers


def _aligned_relationship(relationship, labels: pd.Index) -> np.ndarray:
    """``relationship`` as a dense array in the order of the genotyped ``labels``."""
    if isinstance(relationship, RelationshipMatrix):
        if relationship.kind != "covariance":
            raise DataError("relationship must be a covariance (e.g. A), not a precision")
        matrix = relationship.matrix
        relationship = pd.DataFrame(matrix.toarray() if sp.issparse(matrix) else matrix,
                                    index=relationship.labels, columns=relationship.labels)
    if isinstance(relationship, pd.DataFrame):
        frame = as_relationship(relationship)
        position = frame.labels.get_indexer(labels.astype(str))
        if (position < 0).any():
            absent = labels[position < 0]
            raise DataError(f"relationship lacks {len(absent)} genotyped animal(s): "
                            + ", ".join(map(repr, absent[:10])))
        return np.asarray(frame.matrix)[np.ix_(position, position)]
    try:
        matrix = np.asarray(relationship, dtype=float)
    except (TypeError, ValueError) as exc:
        raise DataError(f"relationship must be numeric: {exc}") from exc
    if matrix.shape != (len(labels), len(labels)):
        raise DataError(f"relationship must be {len(labels)} x {len(labels)} (one row and "
                        f"column per genotyped animal, in their order), not {matrix.shape}")
    return _checked_symmetric(matrix, labels, "relationship")


GRM_METHODS = ("vanraden", "standardized")


def _block_crossproduct(counts: np.ndarray, method: str):
    """One block of variants' contribution to the GRM's numerator.

    ``counts`` is (samples x k) float32, NaN where missing (imputed by the mean, i.e.
    centred to 0). Returns ``(S_block, denominator, used, constant)``: ``S_block`` the
    (samples x samples) float64 sum of centred (vanraden) or standardised products,
    ``denominator`` this block's share of ``2 Σ p (1 − p)`` (vanraden) or its number of
    variants (standardized), ``constant`` a mask of the variants left out.

    Without missing values the raw 0/1/2 cross-product is computed in float32, where
    it is exact (integer sums below 2^24), and centred in float64 afterwards:
    ``MM' = XX' − s1' − 1s' + c`` with ``s = X(2p)`` and ``c = 4 p'p``. With missing
    values the centred block is multiplied in float32 (relative error ~1e-7).
    """
    from .kernels import centred_genotypes, genotype_moments, weighted_row_sums

    counts = np.asfortranarray(counts, dtype=np.float32)
    n_observed, mean, variance = genotype_moments(counts)
    constant = ~(variance > 1e-12) | (n_observed < 2)
    keep = ~constant
    if not keep.any():
        return None, 0.0, 0, constant
    if not keep.all():
        counts, n_observed, mean, variance = (np.asfortranarray(counts[:, keep]),
                                              n_observed[keep], mean[keep], variance[keep])
    freq = mean / 2.0
    complete = bool(np.all(n_observed == counts.shape[0]))
    if method == "vanraden":
        denominator = float(2.0 * np.sum(freq * (1.0 - freq)))
        if complete:
            with dense_blas_threads(len(counts), itemsize=4):
                product = (counts @ counts.T).astype(np.float64)
            s = weighted_row_sums(counts, mean)
            product -= s[:, None]
            product -= s[None, :]
            product += float(mean @ mean)
            return product, denominator, int(keep.sum()), constant
        scale = np.ones_like(mean)
    else:
        denominator = float(keep.sum())
        scale = 1.0 / np.sqrt(variance)
    centred = centred_genotypes(counts, mean, scale, True)
    with dense_blas_threads(len(centred), itemsize=4):
        product = (centred @ centred.T).astype(np.float64)
    return product, denominator, int(keep.sum()), constant


def genotype_crossproduct(genotypes, samples=None, variants=None, method: str = "vanraden",
                          block: int | None = None):
    """The GRM's numerator and denominator over a set of samples and variants.

    Returns ``(S, denominator, used, constant)`` with ``K = S / denominator``
    (see :func:`grm`); ``used`` counts the variants kept and ``constant`` holds the
    positions of those left out for having one genotype in every sample. Frequencies
    are those of the samples given.
    """
    if method not in GRM_METHODS:
        raise ValueError(f"method must be one of {GRM_METHODS}, not {method!r}")
    n = genotypes.n_samples if samples is None else len(np.arange(genotypes.n_samples)[samples])
    total = np.zeros((n, n))
    denominator, used, constant = 0.0, 0, []
    for positions, counts in genotypes.blocks(size=block, variants=variants, samples=samples):
        product, share, kept, flat = _block_crossproduct(counts, method)
        if product is not None:
            total += product
        denominator += share
        used += kept
        constant.append(positions[flat])
    return total, denominator, used, np.concatenate(constant)


def _as_genotypes(genotypes):
    from .plink import Genotypes

    if isinstance(genotypes, Genotypes):
        return genotypes
    values, labels, markers = _genotype_matrix(genotypes)
    return Genotypes.from_frame(pd.DataFrame(values, index=labels, columns=markers))


def grm(genotypes, blend: float = 0.01, relationship=None, method: str = "vanraden",
        cutoff: float | None = None, variants=None, block: int | None = None
        ) -> RelationshipMatrix:
    """A genomic relationship matrix, blended for invertibility.

    ``method="vanraden"`` (VanRaden's method 1, the default):
    ``G = M M' / (2 Σ p_j (1 − p_j))`` with ``M`` the 0/1/2 genotypes centred by twice
    the allele frequencies. ``method="standardized"`` (GCTA's and FaST-LMM's kernel):
    each variant centred and scaled to unit variance, ``G = Z Z' / m``. Then
    ``(1 − blend) G + blend K`` with ``K`` the identity or the pedigree relationship
    matrix given as ``relationship``. A missing genotype is imputed by the mean (it
    contributes 0 after centring).

    Markers with the same genotype in every animal (monomorphic, or heterozygous in
    all) say nothing about relationships; they are dropped with a warning (an
    all-heterozygous marker would otherwise add ``1/2`` to the denominator and shrink
    G).

    Parameters
    ----------
    genotypes : DataFrame (animals x markers, index = animal ids), 2-D array or Genotypes
        Allele counts 0, 1, 2. A table must have no missing value; a
        :class:`~henderson.plink.Genotypes` (e.g. from :func:`read_plink`) is read a
        block of variants at a time, with missing genotypes imputed.
    blend : float in [0, 1]
    relationship : array, DataFrame or RelationshipMatrix, optional
        A covariance over the genotyped animals: an array in their order, or labelled
        (a DataFrame or a :class:`RelationshipMatrix`, e.g. A of more animals), taken
        in their order.
    method : {"vanraden", "standardized"}
    cutoff : float, optional
        Keep only off-diagonal entries above ``cutoff`` (after blending): a sparse
        GRM, as fastGWA's ``--make-bK-sparse``, so that a model of 100,000 people is a
        sparse Cholesky instead of a dense n x n. Computed a block of rows at a time.
    variants : slice, positions or boolean mask, optional
        The variants of a :class:`Genotypes` to use (all by default).

    Returns
    -------
    RelationshipMatrix (a covariance; sparse when ``cutoff`` is given)

    Raises
    ------
    DataError
        Genotypes not 2-D, missing (in a table), or not 0/1/2; no marker that varies;
        a ``relationship`` of the wrong shape or labels, asymmetric or not finite.
    ValueError
        ``blend`` outside [0, 1], an unknown ``method``.

    Examples
    --------
    >>> import numpy as np
    >>> G = grm(np.array([[0, 1, 2], [1, 0, 0], [2, 1, 1]]), blend=0.0)
    >>> G.matrix.round(3)
    array([[ 1.462, -0.846, -0.615],
           [-0.846,  1.   , -0.154],
           [-0.615, -0.154,  0.769]])
    """
    if (isinstance(blend, bool) or not isinstance(blend, numbers.Real)
            or not 0.0 <= blend <= 1.0):
        raise ValueError(f"blend must be a number in [0, 1], not {blend!r}")
    if method not in GRM_METHODS:
        raise ValueError(f"method must be one of {GRM_METHODS}, not {method!r}")
    if cutoff is not None and not (isinstance(cutoff, numbers.Real) and np.isfinite(cutoff)):
        raise ValueError(f"cutoff must be a number, not {cutoff!r}")
    genotypes = _as_genotypes(genotypes)
    labels = pd.Index(genotypes.samples["iid"].astype(str))
    if cutoff is not None:
        return _sparse_grm(genotypes, blend, relationship, method, cutoff, variants, block)
    S, denominator, used, constant = genotype_crossproduct(genotypes, variants=variants,
                                                           method=method, block=block)
    _check_markers(used, constant, genotypes, len(labels))
    G = S / denominator
    other = (np.eye(len(G)) if relationship is None
             else _aligned_relationship(relationship, labels))
    return RelationshipMatrix((1.0 - blend) * G + blend * other, labels, kind="covariance")


def _check_markers(used: int, constant: np.ndarray, genotypes, n_samples: int) -> None:
    """Refuse a GRM without a varying marker; warn about (and name) the constant ones,
    given by their positions in ``genotypes.variants``."""
    if used == 0:
        raise DataError(f"none of the {len(constant)} markers varies across the {n_samples} "
                        "animals: a GRM needs markers whose genotypes differ")
    if len(constant):
        names = genotypes.variants["snp"].to_numpy()[constant]
        warnings.warn(f"{len(constant)} of {used + len(constant)} markers have the same "
                      "genotype in every animal and are left out of the GRM: "
                      + ", ".join(map(repr, names[:5])) + (" ..." if len(names) > 5 else ""),
                      UserWarning, stacklevel=3)


#: more off-diagonal entries per person than this above a sparse GRM's cutoff means the
#: cutoff is inside the GRM's sampling noise (sd ~ 1/sqrt(variants)), not at relatives
SPARSE_ENTRIES_PER_PERSON = 50


#: a sparse GRM whose largest group of people joined by entries above the cutoff is
#: larger than this (and than 1% of the people) warns: a few spurious entries per
#: person join the families into one group, whose sparse Cholesky factor fills in
SPARSE_LARGEST_GROUP = 2000


def _warn_large_related_group(rows, cols, n: int, cutoff: float, n_variants: int) -> None:
    """Warn when the off-diagonal entries join more than SPARSE_LARGEST_GROUP people
    (and 1% of them) into one group. Measured at 100,000 people (families of four):
    1.5 spurious entries per person (cutoff 0.05 from 20,000 variants) made one such
    group, and the null fit took 208 s and the scan ~37 variants/s, against 29 s and
    ~600 variants/s with the families apart (cutoff 0.1 from 5,000 variants)."""
    from scipy.sparse.csgraph import connected_components

    if n <= SPARSE_LARGEST_GROUP or len(rows) == 0:
        return
    graph = sp.csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    largest = int(np.bincount(labels).max())
    if largest > SPARSE_LARGEST_GROUP and largest > 0.01 * n:
        warnings.warn(
            f"the sparse GRM joins {largest:,} of {n:,} people into one group of relatives "
            f"through entries above cutoff {cutoff:g} ({len(rows) / n:.2f} per person): "
            "families are rarely that large, so some entries are the GRM's noise (sd about "
            f"{1 / np.sqrt(n_variants):.3g} from {n_variants:,} variants), and a sparse "
            "Cholesky factor of such a group fills in (null fits and scans many times "
            "slower); raise the cutoff or use more variants",
            UserWarning, stacklevel=4)


@numba.njit(cache=True)
def _centred_rows(codes, start, stop, mean, scale):
    """Rows ``start:stop`` of int8 counts centred and scaled as float32 (Fortran
    order); a missing count (-1) is imputed by the mean, i.e. 0 once centred."""
    k = codes.shape[1]
    out = np.empty((k, stop - start), dtype=np.float32).T
    for j in range(k):
        m = mean[j]
        s = scale[j]
        for i in range(start, stop):
            value = codes[i, j]
            out[i - start, j] = np.float32((value - m) * s) if value >= 0 else np.float32(0.0)
    return out


@numba.njit(cache=True)
def _entries_above(product, factor, cutoff, row_start, col_start, diagonal_tile):
    """The entries of a tile of ``factor * product`` above ``cutoff`` as (rows, cols,
    values), rows and columns offset to the whole matrix and given in both triangles;
    a diagonal tile contributes its strict upper triangle (mirrored) only."""
    rows_in, cols_in = product.shape
    count = 0
    for i in range(rows_in):
        first = i + 1 if diagonal_tile else 0
        for j in range(first, cols_in):
            if factor * product[i, j] > cutoff:
                count += 1
    rows = np.empty(2 * count, dtype=np.int32)
    cols = np.empty(2 * count, dtype=np.int32)
    values = np.empty(2 * count)
    at = 0
    for i in range(rows_in):
        first = i + 1 if diagonal_tile else 0
        for j in range(first, cols_in):
            value = factor * product[i, j]
            if value > cutoff:
                rows[at], cols[at], values[at] = row_start + i, col_start + j, value
                rows[at + 1], cols[at + 1], values[at + 1] = col_start + j, row_start + i, value
                at += 2
    return rows, cols, values


def sparse_grm_tile_rows(n_samples: int, n_variants: int) -> int:
    """Rows per tile of a sparse GRM: a tile of centred variants (rows x variants,
    float32) near 256 MB, its product with another (rows², float32) at most 256 MB."""
    return int(min(max(n_samples, 1), 8192, max(1024, 2**26 // max(n_variants, 1))))


def _sparse_grm(genotypes, blend, relationship, method, cutoff, variants, block):
    """A GRM with off-diagonal entries at or below ``cutoff`` set to 0, computed in
    tiles of rows: the genotypes are held once as int8 counts, each pair of row tiles
    (upper triangle only) is centred to float32 and multiplied, and only the entries
    above the cutoff are kept (int32 indices); the dense n x n never exists."""
    if relationship is not None:
        raise ValueError("a sparse GRM (cutoff=) blends with the identity only")
    n = genotypes.n_samples
    positions = np.arange(genotypes.n_variants)
    positions = positions if variants is None else positions[variants]
    codes = genotypes.codes(positions)
    from .kernels import genotype_moments

    n_observed, mean, variance = genotype_moments(codes)
    keep = (variance > 1e-12) & (n_observed >= 2)
    _check_markers(int(keep.sum()), positions[~keep], genotypes, n)
    if not keep.all():
        codes = np.asfortranarray(codes[:, keep])
        mean, variance = mean[keep], variance[keep]
    freq = mean / 2.0
    if method == "vanraden":
        scale = np.ones_like(mean)
        denominator = float(2.0 * np.sum(freq * (1.0 - freq)))
    else:
        scale = 1.0 / np.sqrt(variance)
        denominator = float(codes.shape[1])
    factor = (1.0 - blend) / denominator
    tile = sparse_grm_tile_rows(n, codes.shape[1])
    diagonal = np.empty(n)
    rows_kept, cols_kept, values_kept = [], [], []
    for row_start in range(0, n, tile):
        row_stop = min(n, row_start + tile)
        left = _centred_rows(codes, row_start, row_stop, mean, scale)
        for col_start in range(row_start, n, tile):
            col_stop = min(n, col_start + tile)
            right = left if col_start == row_start else _centred_rows(
                codes, col_start, col_stop, mean, scale)
            with dense_blas_threads(tile, itemsize=4):
                product = left @ right.T
            if col_start == row_start:
                diagonal[row_start:row_stop] = factor * np.diag(product).astype(np.float64)
            r, c, v = _entries_above(product, factor, cutoff, row_start, col_start,
                                     col_start == row_start)
            rows_kept.append(r)
            cols_kept.append(c)
            values_kept.append(v)
            del product, right
    per_person = sum(len(r) for r in rows_kept) / max(n, 1)
    if per_person > SPARSE_ENTRIES_PER_PERSON:
        warnings.warn(
            f"the sparse GRM keeps {per_person:.0f} entries per person above cutoff "
            f"{cutoff:g}: relatives are rarely that many, so the cutoff is inside the GRM's "
            f"noise (sd about {1 / np.sqrt(codes.shape[1]):.3g} from "
            f"{codes.shape[1]:,} variants); raise the cutoff or use more variants",
            UserWarning, stacklevel=3)
    _warn_large_related_group(np.concatenate(rows_kept) if rows_kept else np.zeros(0, int),
                              np.concatenate(cols_kept) if cols_kept else np.zeros(0, int),
                              n, cutoff, codes.shape[1])
    everything = np.arange(n, dtype=np.int32)
    rows = np.concatenate(rows_kept + [everything])
    cols = np.concatenate(cols_kept + [everything])
    values = np.concatenate(values_kept + [diagonal + blend])
    matrix = sp.csc_matrix((values, (rows, cols)), shape=(n, n))
    matrix.sort_indices()
    labels = pd.Index(genotypes.samples["iid"].astype(str))
    return RelationshipMatrix(matrix, labels, kind="covariance")
