"""Known level covariances for random terms: relationship matrices and GRMs.

A random term ``(1 | animal)`` may carry a known covariance ``K`` over its levels
(``G_t = K ⊗ Σ_t``). The solver only ever needs ``K⁻¹`` (sparse for a pedigree, dense
for a genomic matrix) and ``log|K|``, which :class:`RelationshipMatrix` supplies.
``grm`` builds VanRaden's genomic relationship matrix (method 1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from .errors import DataError


class RelationshipMatrix:
    """A labelled covariance or precision over the levels of a grouping factor.

    Parameters
    ----------
    matrix : array or sparse matrix, (m, m), symmetric positive definite
    labels : sequence of m level labels
    kind : {"covariance", "precision"}
    logdet_covariance : float, optional
        ``log|K|`` when already known (else computed).

    Examples
    --------
    >>> import numpy as np
    >>> K = RelationshipMatrix(np.array([[1.0, 0.5], [0.5, 1.0]]), ["a", "b"])
    >>> K.precision().toarray().round(3)
    array([[ 1.333, -0.667],
           [-0.667,  1.333]])
    """

    def __init__(self, matrix, labels, kind: str = "covariance",
                 logdet_covariance: float | None = None, diagonal=None):
        if kind not in ("covariance", "precision"):
            raise ValueError("kind must be 'covariance' or 'precision'")
        self.matrix = matrix
        self.labels = pd.Index(pd.Index(labels).astype(str))
        if matrix.shape != (len(self.labels), len(self.labels)):
            raise DataError(f"relationship matrix is {matrix.shape} but has "
                            f"{len(self.labels)} labels")
        if self.labels.has_duplicates:
            raise DataError("relationship matrix labels are not unique")
        self.kind = kind
        self._diagonal = None if diagonal is None else np.asarray(diagonal, dtype=float)
        self._logdet = logdet_covariance
        self._precision = None

    def precision(self) -> sp.csc_matrix:
        if self._precision is None:
            if self.kind == "precision":
                self._precision = sp.csc_matrix(self.matrix)
            else:
                dense = self.matrix.toarray() if sp.issparse(self.matrix) else np.asarray(self.matrix)
                try:
                    factor = scipy.linalg.cho_factor(dense, lower=True)
                except np.linalg.LinAlgError as exc:
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
        """``log|K|`` of the covariance."""
        if self._logdet is None:
            if self.kind == "covariance":
                self.precision()
            else:
                from .mme import cholmod_analyze, cholmod_refactor

                lower = sp.tril(self.precision()).tocsc()
                factor = cholmod_analyze(lower, ordering="amd")
                cholmod_refactor(factor, lower)
                self._logdet = -float(factor.logdet())
        return self._logdet


def as_relationship(known) -> RelationshipMatrix:
    """A :class:`RelationshipMatrix` from a Pedigree, a RelationshipMatrix or a
    labelled covariance DataFrame."""
    from .pedigree import Pedigree

    if isinstance(known, RelationshipMatrix):
        return known
    if isinstance(known, Pedigree):
        return RelationshipMatrix(known.inverse(), known.ids, kind="precision",
                                  logdet_covariance=known.logdet(),
                                  diagonal=1.0 + known.inbreeding)
    if isinstance(known, pd.DataFrame):
        if not known.index.equals(known.columns):
            raise DataError("a covariance DataFrame needs the same labels on rows and columns")
        return RelationshipMatrix(known.to_numpy(dtype=float), known.index, kind="covariance")
    raise TypeError("relationships values must be a Pedigree, a RelationshipMatrix or a "
                    f"labelled covariance DataFrame, not {type(known).__name__}")


def grm(genotypes, blend: float = 0.01, relationship=None) -> RelationshipMatrix:
    """VanRaden's genomic relationship matrix, method 1, blended for invertibility.

    ``G = M M' / (2 Σ p_j (1 − p_j))`` with ``M`` the 0/1/2 genotypes centred by twice
    the allele frequencies, then ``(1 − blend) G + blend K`` with ``K`` the identity or
    the pedigree relationship matrix given as ``relationship`` (dense, same order).

    Parameters
    ----------
    genotypes : DataFrame (animals x markers, index = animal ids) or array
    blend : float
    relationship : array, optional

    Returns
    -------
    RelationshipMatrix (a covariance)

    Examples
    --------
    >>> import numpy as np
    >>> G = grm(np.array([[0, 1, 2], [1, 1, 0], [2, 1, 1]]), blend=0.0)
    >>> np.allclose(G.matrix, G.matrix.T)
    True
    """
    labels = genotypes.index if isinstance(genotypes, pd.DataFrame) else np.arange(len(genotypes))
    M = np.asarray(genotypes, dtype=np.float64)
    if np.isnan(M).any():
        raise DataError("genotypes contain missing values; impute them first")
    if not np.isin(M, (0.0, 1.0, 2.0)).all():
        raise DataError("genotypes must be coded 0, 1, 2")
    freq = M.mean(axis=0) / 2.0
    centred = M - 2.0 * freq
    scale = 2.0 * np.sum(freq * (1.0 - freq))
    if scale <= 0:
        raise DataError("no polymorphic markers")
    G = centred @ centred.T / scale
    other = np.eye(len(G)) if relationship is None else np.asarray(relationship)
    return RelationshipMatrix((1.0 - blend) * G + blend * other, labels, kind="covariance")
