"""Average-information REML (Gilmour, Thompson & Cullis 1995) for variance components.

Works in the variance-component parametrisation ``φ = (σ²_1, …, σ²_T, σ²_e)`` of models
whose random terms each have one coefficient (``(1 | g)``, possibly with a known
level covariance K, as in animal models). Each iteration costs one factorisation of
the MME, one selected inverse (for ``tr(K⁻¹ C^{tt})``) and T + 1 solves for the average
information matrix; a step that leaves the parameter space or lowers the likelihood
is halved, and an EM-REML step is taken when halving fails.
"""
from __future__ import annotations

import sys
import time

from dataclasses import dataclass

import numpy as np

from .objective import Objective


@dataclass
class AIState:
    """Everything AI-REML needs at one θ."""

    objective: float
    phi: np.ndarray        # (σ²_1, ..., σ²_T, σ²_e)
    score: np.ndarray      # ∂ℓ_R/∂φ
    ai: np.ndarray         # average information
    traces: np.ndarray     # tr(K_t⁻¹ C^{tt}) of Henderson's MME
    quads: np.ndarray      # û_t' K_t⁻¹ û_t


class AverageInformation:
    """Score and average-information matrix of the REML log-likelihood at θ."""

    def __init__(self, objective: Objective):
        if not objective.reml:
            raise ValueError("AI-REML needs reml=True")
        design = objective.mme.design
        if any(t.n_coefs != 1 for t in design.terms):
            raise ValueError("AI-REML here handles terms with one coefficient each; "
                             "use optimizer='bobyqa' for random slopes")
        self.objective = objective
        self.mme = objective.mme
        self.design = design
        offsets = design.column_offsets()
        self.precision_entries = []
        for t, term in enumerate(design.terms):
            if term.level_precision is None:
                idx = offsets[t] + np.arange(term.n_levels)
                self.precision_entries.append((idx, idx, np.ones(term.n_levels)))
            else:
                coo = term.level_precision.tocoo()
                self.precision_entries.append(
                    (offsets[t] + coo.row, offsets[t] + coo.col, coo.data))

    def _z_transpose_w(self, vector: np.ndarray) -> list[np.ndarray]:
        w = self.design.weights
        return [np.bincount(t.level_codes, weights=w * vector * t.z[:, 0],
                            minlength=t.n_levels) for t in self.design.terms]

    def _z_times(self, blups: list[np.ndarray]) -> np.ndarray:
        out = np.zeros(self.design.n_obs)
        for term, b in zip(self.design.terms, blups):
            out += b[term.level_codes] * term.z[:, 0]
        return out

    def _x_transpose_w(self, vector: np.ndarray) -> np.ndarray:
        return np.asarray(self.design.X.T @ (self.design.weights * vector)).ravel()

    def at(self, theta: np.ndarray):
        """The :class:`AIState` at θ (σ² profiled to its REML value)."""
        design, mme = self.design, self.mme
        evaluation = self.objective.evaluate(theta, fixed_inverse=False)
        sigma2 = evaluation.penalized_rss / self.objective.dof
        q = design.n_random
        theta = np.asarray(theta, dtype=float)
        offsets = design.column_offsets()
        spherical = evaluation.solution[:q]
        blups = [theta[t] * spherical[offsets[t]:offsets[t + 1]] for t in range(len(theta))]
        beta = evaluation.solution[q:]
        residual = design.y - np.asarray(design.X @ beta).ravel() - self._z_times(blups)
        selected = mme.selected_inverse()
        variances = sigma2 * theta ** 2
        phi = np.append(variances, sigma2)
        score = np.zeros(len(phi))
        traces = np.zeros(len(theta))
        quads = np.zeros(len(theta))
        effective = 0.0
        for t, (rows, cols, vals) in enumerate(self.precision_entries):
            n_levels = design.terms[t].n_levels
            trace = theta[t] ** 2 * float(vals @ mme.inverse_entries(selected, rows, cols))
            precision = design.terms[t].level_precision
            b = blups[t]
            quad = float(b @ (b if precision is None else precision @ b))
            traces[t], quads[t] = trace, quad
            if variances[t] > 0:
                score[t] = -0.5 * (n_levels / variances[t] - trace * sigma2 / variances[t] ** 2
                                   - quad / variances[t] ** 2)
                effective += n_levels - trace * sigma2 / variances[t]
            else:
                score[t] = 0.0
        dof = self.objective.dof
        weighted_rss = float(residual @ (design.weights * residual))
        score[-1] = -0.5 * ((dof - effective) / sigma2 - weighted_rss / sigma2 ** 2)
        # working variates V_i P y and their P-projections via MME solves
        work = [self._z_times([b / v if (i == t and v > 0) else np.zeros_like(b)
                               for i, b in enumerate(blups)])
                for t, v in enumerate(variances)]
        work.append(residual / sigma2)
        projected = []
        for f in work:
            rhs_z = [lam * zw for lam, zw in zip(theta, self._z_transpose_w(f))]
            rhs = np.concatenate(rhs_z + [self._x_transpose_w(f)])
            sol = mme.solve(rhs)
            fitted = np.asarray(design.X @ sol[q:]).ravel() + self._z_times(
                [theta[t] * sol[offsets[t]:offsets[t + 1]] for t in range(len(theta))])
            projected.append(design.weights * (f - fitted) / sigma2)
        k = len(work)
        ai = np.empty((k, k))
        for i in range(k):
            for j in range(i, k):
                ai[i, j] = ai[j, i] = 0.5 * float(work[i] @ projected[j])
        return AIState(evaluation.objective, phi, score, ai, traces, quads)


def optimize_ai_reml(objective: Objective, start: np.ndarray, verbose: bool | int = False,
                     max_iterations: int = 60, tolerance: float = 1e-9):
    """AI-REML from θ ``start``; returns an :class:`~henderson.fit.OptimizerResult`."""
    from .fit import OptimizerResult

    info = AverageInformation(objective)
    theta = np.maximum(np.asarray(start, dtype=float), 0.0)
    history = []
    t0 = time.perf_counter()
    state = info.at(theta)
    converged, message = False, "maximum number of iterations reached"
    n_levels = np.array([t.n_levels for t in info.design.terms], dtype=float)
    for iteration in range(1, max_iterations + 1):
        phi, value = state.phi, state.objective
        # variances at the boundary (0) stay there; the step is taken in the others
        free = phi > 0
        step = np.zeros_like(phi)
        try:
            step[free] = np.linalg.solve(state.ai[np.ix_(free, free)], state.score[free])
            # a variance the step would turn negative moves to 1% of its value instead
            # (not to 0: from a poor start, InstEval's θ = 0.5, the first step overshoots
            # a variance far from 0), and the others take the Newton step given that
            # move; a variance that keeps shrinking reaches the boundary below.
            over = free & (phi + step < 0)
            over[-1] = False
            if over.any():
                rest = free & ~over
                step[over] = -0.99 * phi[over]
                step[rest] = np.linalg.solve(
                    state.ai[np.ix_(rest, rest)],
                    state.score[rest] - state.ai[np.ix_(rest, over)] @ step[over])
        except np.linalg.LinAlgError:
            step[:] = np.nan
        accepted = False
        scale = 1.0
        while scale > 1e-3 and np.all(np.isfinite(step)):
            candidate = phi + scale * step
            variances = candidate[:-1]
            variances[variances < 0] = 0.0
            variances[variances < 1e-10 * max(candidate[-1], 0.0)] = 0.0
            if candidate[-1] > 0:
                new_theta = np.sqrt(candidate[:-1] / candidate[-1])
                new_value = objective(new_theta)
                if new_value <= value + 1e-10 * abs(value):
                    accepted = True
                    break
            scale *= 0.5
        kind = "AI"
        if not accepted:  # EM-REML step: always feasible, never lowers the likelihood
            kind = "EM"
            sigma2 = phi[-1]
            new_phi = np.append((state.quads + state.traces * sigma2) / n_levels, sigma2)
            new_theta = np.sqrt(new_phi[:-1] / new_phi[-1])
        theta = new_theta
        old_value, old_phi = value, phi
        state = info.at(theta)
        value, phi, score, ai = state.objective, state.phi, state.score, state.ai
        history.append((iteration, kind, value, phi.copy()))
        if verbose:
            print(f"[henderson] AI-REML iter {iteration:3d} {kind}  objective {value:.8f}  "
                  f"φ={np.array2string(phi, precision=6)}  {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr)
        relative_change = float(np.max(np.abs(phi - old_phi)) / np.max(np.abs(phi)))
        free = phi > 0
        decrement = float(score[free] @ np.linalg.lstsq(ai[np.ix_(free, free)], score[free],
                                                        rcond=None)[0])
        # the objective is only known to ~1e-12 relative (5e-6 absolute at 700k
        # records), so a tiny change in φ ends the iterations as well as the decrement
        small_change = abs(old_value - value) < tolerance * max(1.0, abs(value))
        if decrement < 1e-10 or relative_change < 1e-8 or (small_change and relative_change < 1e-5):
            converged, message = True, f"AI-REML converged in {iteration} iterations"
            break
    result = OptimizerResult(theta, value, objective.n_evaluations, converged, message,
                             "ai-reml", history)
    result.average_information = state.ai
    result.variance_components = state.phi
    return result
