"""How the mixed-model equations are factored: one small protocol, three strategies.

:class:`~henderson.mme.MixedModelEquations` owns C(θ) (its pattern and its values per
θ) and hands every use of the factor to its ``factorization``, an object with:

``factorize()``
    factor the values the equations hold now (raise on a non-positive-definite C);
``solve(rhs)``
    ``C x = rhs`` in the original order, for a vector or a matrix;
``logdet()``, ``logdet_random()``
    ``log|C|`` and ``log|C_zz|`` (ML needs the latter);
``fixed_block_inverse()``
    ``(C⁻¹)_ββ``;
``selected_inverse(random_block_only)``, ``inverse_diagonal(random_block_only)``
    ``C⁻¹`` (or ``C_zz⁻¹``) where the gradient and the PEVs need it: an object with
    ``entries(rows, cols)``, and its diagonal on the random effects;
``lower_factor(random_block_only)``
    the sparse factor L, where there is one;
``private_copy(equations)``
    the same symbolic work with a numeric workspace of its own (threads).

The strategies: :class:`SparseCholesky` (CHOLMOD on all of C: a sparse or wide X in
the fill-reducing ordering), :class:`DenseFixedBlock` (CHOLMOD on C_zz, the few dense
fixed effects eliminated densely, as lme4's R_ZX / R_X) and
:class:`~henderson.schur.BlockElimination` (the largest factor's block-diagonal part
eliminated, a dense Cholesky of the rest). Every call into CHOLMOD goes through
``linalg.py``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from . import kernels
from .linalg import cholmod_analyze, cholmod_lower_factor, cholmod_refactor, cholmod_supernodes
from .threads import dense_blas_threads

#: bytes of right-hand sides solved at once for (C⁻¹)_ββ
SOLVE_BLOCK_BYTES = 1 << 27
#: from this many entries in C's lower triangle (a dense block of 10,000 levels), the
#: selected inverse is taken from the factor itself rather than from a copy of it
RELEASE_FACTOR_NNZ = 50_000_000


@dataclass
class SelectedInverse:
    """An inverse known on the pattern of a Cholesky factor: ``matrix`` (lower
    triangle, factor coordinates) and the map from original indices to them."""

    matrix: sp.csc_matrix
    position: np.ndarray

    def entries(self, rows, cols) -> np.ndarray:
        r = self.position[np.asarray(rows, dtype=np.int64)]
        c = self.position[np.asarray(cols, dtype=np.int64)]
        m = self.matrix
        return kernels.lookup_symmetric(m.indptr, m.indices, m.data, r, c)


@dataclass
class SupernodalInverse:
    """An inverse known on the pattern of a supernodal Cholesky factor, in the
    factor's own storage (``nodes``: :class:`henderson.linalg.Supernodes`, whose
    values hold the inverse), and the map from original indices to its coordinates."""

    nodes: object
    column_node: np.ndarray
    position: np.ndarray

    def entries(self, rows, cols) -> np.ndarray:
        r = self.position[np.asarray(rows, dtype=np.int64)]
        c = self.position[np.asarray(cols, dtype=np.int64)]
        nodes = self.nodes
        return kernels.supernodal_lookup_symmetric(
            nodes.first_column, nodes.row_pointer, nodes.value_pointer, nodes.rows,
            self.column_node, nodes.values, r, c)


def _identity(permutation) -> bool:
    return bool(np.array_equal(permutation, np.arange(len(permutation))))


class _Cholmod:
    """What the two CHOLMOD strategies share: the selected inverse from L (Takahashi
    recurrences by supernodes) and its diagonal."""

    def __init__(self, equations):
        self.equations = equations

    def selected_inverse(self, random_block_only: bool = False) -> SelectedInverse:
        """``C⁻¹`` (or ``C_zz⁻¹``) on the pattern of its Cholesky factor."""
        lower = self.lower_factor(random_block_only)  # a copy: overwritten by C⁻¹
        kernels.selected_inverse_in_place(lower.indptr, lower.indices, lower.data)
        return SelectedInverse(lower, self._positions(random_block_only))

    def _positions(self, random_block_only: bool) -> np.ndarray:
        return self.equations.inverse_perm

    def inverse_diagonal(self, random_block_only: bool = False) -> np.ndarray:
        """The diagonal of ``C⁻¹`` (or ``C_zz⁻¹``) on the random effects, in original
        order: all that the gradient of a model whose terms each have one coefficient
        needs (``∂ log|C| / ∂θ_t = 2 (q_t − tr C⁻¹_tt) / θ_t``)."""
        index = np.arange(self.equations.n_random)
        return self.selected_inverse(random_block_only).entries(index, index)

    def private_copy(self, equations):
        clone = copy.copy(self)
        clone.equations = equations
        clone.factor = self.factor.copy()
        return clone


class SparseCholesky(_Cholmod):
    """CHOLMOD on all of C (lower triangle, in the equations' permutation): the
    strategy for a sparse or wide X, which belongs in the fill-reducing ordering."""

    name = "cholmod"

    def __init__(self, equations, mode: str = "auto"):
        super().__init__(equations)
        matrix = equations.matrix
        matrix.data[:] = 0.0
        matrix.data[matrix.indptr[:-1]] = 1.0  # the diagonal: any SPD values
        self.mode = mode
        self._factor = cholmod_analyze(matrix, ordering="natural", mode=mode)
        self._random_factor = None

    @property
    def factor(self):
        """The CHOLMOD factor of C at the equations' current values; made again
        (analysis and numbers) if :meth:`selected_inverse` gave it up."""
        if self._factor is None:
            matrix = self.equations.matrix
            self._factor = cholmod_analyze(matrix, ordering="natural", mode=self.mode)
            cholmod_refactor(self._factor, matrix)
        return self._factor

    @factor.setter
    def factor(self, value) -> None:
        self._factor = value

    def factorize(self) -> None:
        matrix = self.equations.matrix
        if self._factor is None:
            self._factor = cholmod_analyze(matrix, ordering="natural", mode=self.mode)
        cholmod_refactor(self._factor, matrix)

    def selected_inverse(self, random_block_only: bool = False):
        """As :meth:`_Cholmod.selected_inverse`, on CHOLMOD's supernodes where they can
        be read (:func:`henderson.linalg.cholmod_supernodes`): the inverse is written
        over a copy of the factor's values, or, for a large C, over the factor's own
        values, the factor then given up (and made again if it is needed after). No
        simplicial L is made: at 1M animals with 20,000 genotyped, CHOLMOD's
        conversion held the factor, a copy of it and the simplicial L at once (BLUP +
        every PEV peaked at 22.0 GB that way, 16.6 GB this way; docs/benchmarks.md).

        Otherwise L comes from CHOLMOD's conversion, for a large C of the factor
        itself (L, a copy of it and the factor would be three times 3.2 GB for a
        dense 20,000² block)."""
        if random_block_only:
            return super().selected_inverse(random_block_only)
        release = self.equations.matrix.nnz >= RELEASE_FACTOR_NNZ
        nodes = cholmod_supernodes(self.factor)
        if nodes is not None and not _identity(self.factor.P()):
            nodes = None  # analysed in the natural order, so never here
        if nodes is not None:
            if release:
                self._factor = None  # its values become the inverse's
            else:
                nodes = dataclasses.replace(nodes, values=nodes.values.copy(), owner=None)
            column_node = kernels.supernodal_selected_inverse_in_place(nodes)
            return SupernodalInverse(nodes, column_node, self._positions(False))
        if not release:
            return super().selected_inverse(random_block_only)
        lower = cholmod_lower_factor(self.factor, in_place=True)
        self._factor = None
        kernels.selected_inverse_in_place(lower.indptr, lower.indices, lower.data)
        return SelectedInverse(lower, self._positions(False))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        eq = self.equations
        solution = self.factor(rhs[eq.perm])
        out = np.empty_like(solution)
        out[eq.perm] = solution
        return out

    def logdet(self) -> float:
        return float(self.factor.logdet())

    def logdet_random(self) -> float:
        """``log|C_zz|`` from a CHOLMOD factor of C_zz of its own, analysed on first use."""
        eq = self.equations
        if self._random_factor is None:
            eq.split_pattern()
            self._random_factor = cholmod_analyze(eq.random_matrix, ordering="natural")
        eq.random_matrix.data[:] = eq.matrix.data[eq.zz_take]
        cholmod_refactor(self._random_factor, eq.random_matrix)
        return float(self._random_factor.logdet())

    def fixed_block_inverse(self) -> np.ndarray:
        """``(C⁻¹)_ββ`` by p solves with the factor, a block of right-hand sides at a
        time (all p at once were 8·size·p bytes, several times over: 4 GB at 100,000
        animals and 1,750 herd-year-seasons)."""
        eq = self.equations
        p, q = eq.n_fixed, eq.n_random
        if p == 0:
            return np.zeros((0, 0))
        fixed_positions = eq.inverse_perm[q:]  # where each fixed effect sits in the factor
        width = int(max(1, min(p, SOLVE_BLOCK_BYTES // (8 * eq.size))))
        out = np.empty((p, p))
        for start in range(0, p, width):
            columns = np.arange(start, min(start + width, p))
            unit = np.zeros((eq.size, len(columns)))
            unit[fixed_positions[columns], np.arange(len(columns))] = 1.0
            out[:, columns] = self.factor(unit)[fixed_positions]
        return out

    def lower_factor(self, random_block_only: bool = False) -> sp.csc_matrix:
        """L with ``L L' = C[perm][:, perm]``, or the factor of C_zz."""
        if random_block_only:
            self.logdet_random()  # refreshes C_zz's own factor at the current θ
            return cholmod_lower_factor(self._random_factor)
        return cholmod_lower_factor(self.factor)

    def _positions(self, random_block_only: bool) -> np.ndarray:
        eq = self.equations
        if not random_block_only:
            return eq.inverse_perm
        position = np.empty(eq.n_random, dtype=np.int64)
        position[eq.random_perm] = np.arange(eq.n_random)
        return position

    def private_copy(self, equations):
        clone = super().private_copy(equations)
        clone._random_factor = None
        return clone


class DenseFixedBlock(_Cholmod):
    """CHOLMOD on C_zz; ``R_ZX = L⁻¹ C_zx`` and ``C_xx − R_ZX'R_ZX = R_X R_X'`` dense,
    as lme4 does. CHOLMOD spends far more on a few dense rows at the end of C than
    their flops (InstEval: 120 ms against 43 ms + 11 ms this way), and log|C_zz| (ML)
    comes for free."""

    name = "cholmod"

    def __init__(self, equations, mode: str = "auto"):
        super().__init__(equations)
        equations.split_pattern()
        matrix = equations.random_matrix
        matrix.data[:] = 0.0
        matrix.data[matrix.indptr[:-1]] = 1.0
        self.factor = cholmod_analyze(matrix, ordering="natural", mode=mode)

    def factorize(self) -> None:
        eq = self.equations
        data = eq.matrix.data
        p, q = eq.n_fixed, eq.n_random
        eq.random_matrix.data[:] = data[eq.zz_take]
        cholmod_refactor(self.factor, eq.random_matrix)
        cross = np.zeros((q, p))
        cross[eq.xz_cols, eq.xz_rows] = data[eq.xz_take]
        self.cross_factor = self._solve_lower(cross) if p else cross  # R_ZX, q x p
        schur = np.zeros((p, p))
        schur[eq.xx_rows, eq.xx_cols] = data[eq.xx_take]
        schur = np.tril(schur) + np.tril(schur, -1).T
        with dense_blas_threads(p):
            schur -= self.cross_factor.T @ self.cross_factor
            self.fixed_factor = np.linalg.cholesky(schur) if p else schur  # R_X (lower)

    def _solve_lower(self, rhs):
        return self.factor.solve_L(rhs, use_LDLt_decomposition=False)

    def _solve_upper(self, rhs):
        return self.factor.solve_Lt(rhs, use_LDLt_decomposition=False)

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        eq = self.equations
        permuted = rhs[eq.perm]
        q = eq.n_random
        forward_z = self._solve_lower(permuted[:q])
        forward_x = scipy.linalg.solve_triangular(
            self.fixed_factor, permuted[q:] - self.cross_factor.T @ forward_z, lower=True)
        solution_x = scipy.linalg.solve_triangular(
            self.fixed_factor, forward_x, lower=True, trans="T")
        solution_z = self._solve_upper(forward_z - self.cross_factor @ solution_x)
        solution = np.concatenate([solution_z, solution_x])
        out = np.empty_like(solution)
        out[eq.perm] = solution
        return out

    def logdet(self) -> float:
        return self.logdet_random() + 2.0 * float(np.sum(np.log(np.diag(self.fixed_factor))))

    def logdet_random(self) -> float:
        return float(self.factor.logdet())

    def fixed_block_inverse(self) -> np.ndarray:
        """``(C⁻¹)_ββ = (R_X R_X')⁻¹``."""
        if self.equations.n_fixed == 0:
            return np.zeros((0, 0))
        inverse_factor = np.linalg.inv(self.fixed_factor)
        return inverse_factor.T @ inverse_factor

    def lower_factor(self, random_block_only: bool = False) -> sp.csc_matrix:
        """L of the permuted C: L_zz with the dense rows [R_ZX' R_X] below it (zeros
        kept in the pattern), or L_zz alone."""
        eq = self.equations
        q, p = eq.n_random, eq.n_fixed
        lower = cholmod_lower_factor(self.factor)
        if random_block_only:
            return lower
        counts = np.diff(lower.indptr)
        new_counts = np.concatenate([counts + p, p - np.arange(p)])
        indptr = np.concatenate([[0], np.cumsum(new_counts)])
        indices = np.empty(indptr[-1], dtype=np.int64)
        data = np.empty(indptr[-1])
        body = np.repeat(indptr[:q], counts) + (np.arange(lower.nnz)
                                                 - np.repeat(lower.indptr[:-1], counts))
        indices[body] = lower.indices
        data[body] = lower.data
        tail = (indptr[1:q + 1] - p)[:, None] + np.arange(p)[None, :]
        indices[tail] = q + np.arange(p)[None, :]
        data[tail] = self.cross_factor
        for c in range(p):
            span = slice(indptr[q + c], indptr[q + c + 1])
            indices[span] = q + np.arange(c, p)
            data[span] = self.fixed_factor[c:, c]
        return sp.csc_matrix((data, indices, indptr), shape=(eq.size, eq.size))

    def _positions(self, random_block_only: bool) -> np.ndarray:
        eq = self.equations
        return eq.inverse_perm[:eq.n_random] if random_block_only else eq.inverse_perm
