"""The block-diagonal Σ path (DESIGN.md section 5), an alternative to the MME.

When every random term nests in one grouping factor (longitudinal data, the seed's
pots), ``Σ = ⊕_g Σ_g`` and the REML/ML objective follows from per-group Woodbury
identities with no sparse factorisation. The result equals the MME path to rounding;
``BlockDiagonalObjective`` is interchangeable with :class:`~henderson.objective.Objective`
for the optimiser.
"""
from __future__ import annotations

import numba
import numpy as np

from . import kernels
from .design import Design
from .errors import FormulaError
from .mme import response_shift
from .threads import active_threads


def outermost_grouping(design: Design) -> int:
    """Index of a term whose grouping factor every other term nests in.

    Raises
    ------
    FormulaError
        When no such term exists (crossed factors).
    """
    for t, outer in enumerate(sorted(range(len(design.terms)),
                                     key=lambda i: design.terms[i].n_levels)):
        codes = design.terms[outer].level_codes
        nested = True
        for term in design.terms:
            # nested: each level of the term lies inside one level of the outer factor
            first = np.full(term.n_levels, -1, dtype=np.int64)
            first[term.level_codes] = codes
            if np.any(first[term.level_codes] != codes):
                nested = False
                break
        if nested:
            return outer
    raise FormulaError("the random terms do not all nest in one grouping factor; "
                       "the block-diagonal path needs Σ block diagonal")


class BlockDiagonalObjective:
    """θ → REML criterion / deviance through per-group Woodbury identities."""

    def __init__(self, design: Design, reml: bool = True, shift: np.ndarray | None = None):
        self.design = design
        self.reml = reml
        outer = outermost_grouping(design)
        groups = design.terms[outer].level_codes
        self.row_order = np.argsort(groups, kind="stable").astype(np.int64)
        counts = np.bincount(groups, minlength=design.terms[outer].n_levels)
        self.group_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n_groups = len(counts)
        n_terms = len(design.terms)
        self.local_cols = np.zeros((design.n_obs, n_terms), dtype=np.int64)
        local_counts = np.zeros((n_groups, n_terms), dtype=np.int64)
        for t, term in enumerate(design.terms):
            key = groups * term.n_levels + term.level_codes
            unique_keys, inverse = np.unique(key, return_inverse=True)
            key_group = unique_keys // term.n_levels
            first = np.searchsorted(key_group, np.arange(n_groups))
            self.local_cols[:, t] = inverse - first[groups]
            local_counts[:, t] = np.bincount(key_group, minlength=n_groups)
        widths = local_counts * np.array([t.n_coefs for t in design.terms])
        self.col_base = np.concatenate([np.zeros((n_groups, 1), dtype=np.int64),
                                        np.cumsum(widths, axis=1)[:, :-1]], axis=1)
        self.group_size = widths.sum(axis=1)
        self.term_k = np.array([t.n_coefs for t in design.terms], dtype=np.int64)
        self.z_offsets = np.concatenate([[0], np.cumsum(self.term_k)[:-1]]).astype(np.int64)
        self.z_all = np.ascontiguousarray(np.column_stack([t.z for t in design.terms]))
        self.kmax = int(self.term_k.max())
        # the shifted response of the MME path (mme.response_shift): y'V⁻¹y − β'X'V⁻¹y
        # cancels as y'Wy − sol'·rhs does when y has a large mean
        if shift is None:
            shift = response_shift(design.X, design.y, design.weights, design.fixed_names)
        self.y = np.ascontiguousarray(design.y - design.X @ shift)
        self.dof = design.n_obs - design.n_fixed if reml else design.n_obs
        self.constant = -float(np.sum(np.log(design.weights)))
        self.n_evaluations = 0

    def pieces(self, theta: np.ndarray):
        lam_all = np.zeros((len(self.design.terms), self.kmax, self.kmax))
        for t, (term, sl) in enumerate(zip(self.design.terms, self.design.theta_slices())):
            k = term.n_coefs
            lam_all[t, :k, :k] = term.relative_factor(theta[sl])
        d = self.design
        # the kernel's prange runs on the fit's threads (henderson.threads)
        previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(active_threads(), numba.config.NUMBA_NUM_THREADS)))
        try:
            return kernels.block_diagonal_sums(
                self.group_ptr, self.row_order, self.local_cols, self.col_base,
                self.group_size, self.z_all, self.z_offsets, lam_all, self.term_k,
                np.ascontiguousarray(d.X), self.y, d.weights)
        finally:
            numba.set_num_threads(previous)

    def __call__(self, theta: np.ndarray) -> float:
        self.n_evaluations += 1
        logdets, xvx, xvy, yvy = self.pieces(np.asarray(theta, dtype=float))
        chol = np.linalg.cholesky(xvx)
        beta = np.linalg.solve(xvx, xvy)
        prss = yvy - beta @ xvy
        logdet_v = logdets.sum() + self.constant
        value = logdet_v + self.dof * (1 + np.log(2 * np.pi * prss / self.dof))
        if self.reml:
            value += 2 * np.sum(np.log(np.diag(chol)))
        return float(value)
