"""Stage 4 of the pipeline: the profiled REML / ML objective from the factor of C.

    REML: log|C| + Σ k_t log|K_t| − log|W| + ν (1 + log(2π r²/ν)),  ν = n − p
    ML:   log|C_zz| + Σ k_t log|K_t| − log|W| + n (1 + log(2π r²/n))

with ``r² = y'Wy − sol'·rhs`` the penalised residual sum of squares and
``log|C_zz| = log|C| + log|(C⁻¹)_ββ|``. Both equal lme4's REML criterion / deviance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mme import MixedModelEquations, NotPositiveDefiniteError


@dataclass
class Evaluation:
    """Everything the objective computed at one θ."""

    theta: np.ndarray
    objective: float
    solution: np.ndarray  # [ũ; β̂] in original order
    penalized_rss: float
    logdet_C: float
    logdet_Czz: float
    fixed_inverse: np.ndarray  # (C⁻¹)_ββ


class Objective:
    """θ → −2 log (restricted) likelihood, σ² profiled out.

    Parameters
    ----------
    mme : MixedModelEquations
    reml : bool
    """

    def __init__(self, mme: MixedModelEquations, reml: bool = True):
        self.mme = mme
        self.reml = reml
        design = mme.design
        self.n_obs = design.n_obs
        self.dof = design.n_obs - design.n_fixed if reml else design.n_obs
        self.constant = (
            sum(t.n_coefs * t.logdet_level_covariance for t in design.terms)
            - mme.xp.sum_log_weights
        )
        self.n_evaluations = 0
        self.history: list[tuple[np.ndarray, float]] = []

    def evaluate(self, theta: np.ndarray, fixed_inverse: bool = True) -> Evaluation:
        """Factor C(θ) and compute the objective.

        ``fixed_inverse=False`` skips ``(C⁻¹)_ββ``, which the objective itself never
        needs (ML takes ``log|C_zz|`` from a factor).
        """
        mme = self.mme
        mme.factorize(theta)
        rhs = mme.rhs(theta)
        solution = mme.solve(rhs)
        prss = max(mme.xp.yy - float(solution @ rhs), 0.0)
        logdet_C = mme.logdet()
        logdet_Czz = np.nan if self.reml else mme.logdet_random()
        fixed_inverse = mme.fixed_block_inverse() if fixed_inverse else np.zeros((0, 0))
        if prss <= 0.0:
            value = -np.inf
        else:
            logdet = logdet_C if self.reml else logdet_Czz
            value = (logdet + self.constant
                     + self.dof * (1.0 + np.log(2.0 * np.pi * prss / self.dof)))
        self.n_evaluations += 1
        return Evaluation(np.array(theta, dtype=float), float(value), solution, prss,
                          logdet_C, logdet_Czz, fixed_inverse)

    def __call__(self, theta: np.ndarray) -> float:
        try:
            value = self.evaluate(theta, fixed_inverse=False).objective
        except NotPositiveDefiniteError:
            value = np.inf
        self.history.append((np.array(theta, dtype=float), value))
        return value

    def at_sigma(self, evaluation: Evaluation, sigma2: float) -> float:
        """The criterion at θ and a given σ² (not profiled): known-variance models."""
        logdet = evaluation.logdet_C if self.reml else self.mme.logdet_random()
        return float(logdet + self.constant + self.dof * np.log(2 * np.pi * sigma2)
                     + evaluation.penalized_rss / sigma2)

    def sigma(self, evaluation: Evaluation) -> float:
        return float(np.sqrt(evaluation.penalized_rss / self.dof))
