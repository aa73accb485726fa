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
from .optimize import SETTINGS, ConvergenceCheck, OptimizerResult, OptimizerSettings


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

    def _precision_times(self, vectors: list[np.ndarray]) -> np.ndarray:
        """``J v``: each term's block times K_t⁻¹ (the identity when K is), the fixed
        block 0; J is what C adds to ``T'WT`` (T = [ZΛ X])."""
        out = [v if t.level_precision is None else t.level_precision @ v
               for t, v in zip(self.design.terms, vectors)]
        return np.concatenate(out + [np.zeros(self.design.n_fixed)])

    def at(self, theta: np.ndarray):
        """The :class:`AIState` at θ (σ² profiled to its REML value).

        Everything is computed in the space of the equations, from C and its factor,
        never from the rows: with ``T = [ZΛ X]`` and ``C = T'WT + J``, the working
        variate of term t is ``f_t = Z_t b_t / σ²_t = T g_t`` (``g_t = ũ_t / (σ² θ_t²)``
        on its block), so ``T'W f_t = (C − J) g_t``; the residual's is ``f_e = r / σ²``
        with ``T'W f_e = J [ũ; β] / σ²`` (C [ũ; β] = T'Wy) and ``r'Wr = r² − ũ'Jũ``.
        Then ``AI_ij = ½ (f_i'W f_j − (T'W f_i)' C⁻¹ T'W f_j) / σ²``. No pass over the
        rows (InstEval: 20 ms per state), and chunked designs, which have none, work.
        """
        design, mme = self.design, self.mme
        evaluation = self.objective.evaluate(theta, fixed_inverse=False)
        sigma2 = evaluation.penalized_rss / self.objective.dof
        q = design.n_random
        theta = np.asarray(theta, dtype=float)
        offsets = design.column_offsets()
        solution = evaluation.solution
        spherical = [solution[offsets[t]:offsets[t + 1]] for t in range(len(theta))]
        # identity K: tr(K⁻¹ C^{tt}) needs only the diagonal of C⁻¹ (no selected inverse)
        identity = all(t.level_precision is None for t in design.terms)
        if identity:
            diagonal = mme.inverse_diagonal()
        else:
            selected = mme.selected_inverse()
        variances = sigma2 * theta ** 2
        phi = np.append(variances, sigma2)
        score = np.zeros(len(phi))
        traces = np.zeros(len(theta))
        quads = np.zeros(len(theta))
        effective = 0.0
        j_solution = self._precision_times(spherical)
        for t, (rows, cols, vals) in enumerate(self.precision_entries):
            n_levels = design.terms[t].n_levels
            inverse = diagonal[rows] if identity else mme.inverse_entries(selected, rows, cols)
            trace = theta[t] ** 2 * float(vals @ inverse)
            block = slice(offsets[t], offsets[t + 1])
            quad = theta[t] ** 2 * float(spherical[t] @ j_solution[block])  # b'K⁻¹b
            traces[t], quads[t] = trace, quad
            if variances[t] > 0:
                score[t] = -0.5 * (n_levels / variances[t] - trace * sigma2 / variances[t] ** 2
                                   - quad / variances[t] ** 2)
                effective += n_levels - trace * sigma2 / variances[t]
            else:
                score[t] = 0.0
        dof = self.objective.dof
        weighted_rss = evaluation.penalized_rss - float(solution[:q] @ j_solution[:q])
        score[-1] = -0.5 * ((dof - effective) / sigma2 - weighted_rss / sigma2 ** 2)
        # working variates as vectors g of the equations' space (f = T g), and T'W f
        size = len(solution)
        directions, products = [], []
        for t, v in enumerate(variances):
            g = np.zeros(size)
            if v > 0:
                g[offsets[t]:offsets[t + 1]] = spherical[t] / (sigma2 * theta[t] ** 2)
            directions.append(g)
            jg = self._precision_times([g[offsets[s]:offsets[s + 1]]
                                        for s in range(len(theta))])
            products.append(mme.multiply(g) - jg)
        products.append(j_solution / sigma2)
        rhs = np.column_stack(products)
        solutions = mme.solve(rhs)  # all working variates in one solve
        k = len(products)
        gram = np.empty((k, k))      # f_i'W f_j
        for i in range(k - 1):
            for j in range(i, k):
                gram[i, j] = gram[j, i] = float(directions[i] @ products[j])
        gram[-1, -1] = weighted_rss / sigma2 ** 2
        ai = 0.5 * (gram - rhs.T @ solutions) / sigma2
        ai = 0.5 * (ai + ai.T)
        return AIState(evaluation.objective, phi, score, ai, traces, quads)


def ai_convergence_check(objective: Objective, theta: np.ndarray, result=None,
                         tolerance: float | None = None):
    """lme4's scaled-gradient test at θ from AI-REML's own quantities: the exact REML
    score and, for the Hessian, twice the average information (positive definite by
    construction, so the definiteness test is left to the boundary probe of
    :func:`optimize_ai_reml`), on the variances off the boundary. No finite
    differences: the state at θ is the one the results need for the SEs anyway, and is
    stored on ``result`` for them. Where AI-REML ended by its last-step rule (a full
    step whose predicted gain, the Newton decrement, the objective confirmed), that
    is the test, and no state is computed.

    Returns a :class:`~henderson.optimize.ConvergenceCheck`.
    """
    tolerance = SETTINGS.check_gradient if tolerance is None else tolerance
    theta = np.asarray(theta, dtype=float)
    if result is not None and getattr(result, "final_step_rule", False) \
            and np.array_equal(theta, result.theta):
        # the last full step's predicted and realised gains agreed (DESIGN.md §4): the
        # Newton decrement was below ai_final_gain and what is left is its mismatch
        # times ε; no state at θ is computed (the SEs compute it when asked)
        return ConvergenceCheck(True, "", result.objective, np.full(len(theta) + 1, np.nan),
                                np.zeros(len(theta) + 1), np.nan, [])
    state = AverageInformation(objective).at(theta)
    if result is not None:
        result.average_information, result.variance_components = state.ai, state.phi
    free = state.phi > 0
    gradient = -2.0 * state.score  # of the objective, −2ℓ_R, in the variances
    scaled = np.zeros(len(gradient))
    try:
        upper = np.linalg.cholesky(2.0 * state.ai[np.ix_(free, free)]).T
        scaled[free] = np.abs(np.linalg.solve(upper, gradient[free]))
    except np.linalg.LinAlgError:
        scaled[free] = np.inf
    worst = int(np.argmax(scaled))
    passed = bool(scaled[worst] <= tolerance)
    message = "" if passed else (f"max|scaled gradient| {scaled[worst]:.3g} > {tolerance:g} "
                                 f"(variance {worst})")
    return ConvergenceCheck(passed, message, state.objective, gradient, scaled, np.nan, [])


def optimize_ai_reml(objective: Objective, start: np.ndarray, verbose: bool | int = False,
                     settings: OptimizerSettings = SETTINGS,
                     probe_boundary: bool = True):
    """AI-REML from θ ``start``; returns an :class:`~henderson.optimize.OptimizerResult`."""
    info = AverageInformation(objective)
    theta = np.maximum(np.asarray(start, dtype=float), 0.0)
    history = []
    t0 = time.perf_counter()
    state = info.at(theta)
    state_is_current = True  # False when the last step ends without a state at its θ
    converged, message = False, "maximum number of iterations reached"
    n_levels = np.array([t.n_levels for t in info.design.terms], dtype=float)
    max_iterations, tolerance = settings.ai_max_iterations, settings.ai_tolerance
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
            # The conditioned step can push another variance below zero in turn (a
            # term nested in another, from a poor start): repeat until none is, or the
            # line search would clip it to 0 and strand it there.
            over = np.zeros_like(free)
            for _ in range(len(phi)):
                new_over = free & ~over & (phi + step < 0)
                new_over[-1] = False
                if not new_over.any():
                    break
                over |= new_over
                rest = free & ~over
                step[over] = -(1.0 - settings.ai_overshoot_keep) * phi[over]
                step[rest] = np.linalg.solve(
                    state.ai[np.ix_(rest, rest)],
                    state.score[rest] - state.ai[np.ix_(rest, over)] @ step[over])
        except np.linalg.LinAlgError:
            step[:] = np.nan
        # the objective (−2ℓ) the full step would gain if AI were the Hessian
        gain = float(state.score @ step) if np.all(np.isfinite(step)) else np.inf
        accepted = False
        scale = 1.0
        while scale > settings.ai_min_step and np.all(np.isfinite(step)):
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
        # Near the optimum the full step is the last: with AI = (1 + ε) H on a quadratic
        # the objective left above the minimum is ε times the mismatch between the
        # decrease predicted (``gain``) and the one found, so a small mismatch (and
        # |ε| < 1) ends the iterations with no score at the new point (InstEval: 3
        # states instead of 4; stopping at a mismatch of 1e-5 left θ 7e-6 off, and a
        # small fixed effect 1e-4 off lme4's).
        mismatch = abs((value - new_value) - gain) if accepted else np.inf
        last_mismatch = max(settings.ai_final_mismatch, 1e-13 * abs(value))
        last = accepted and scale == 1.0 and gain < settings.ai_final_gain \
            and mismatch < last_mismatch
        if last:
            value, phi = new_value, candidate
            state_is_current = False
        else:
            old_value, old_phi = value, phi
            state = info.at(theta)
            value, phi, score, ai = state.objective, state.phi, state.score, state.ai
        history.append((iteration, kind, value, phi.copy()))
        if verbose:
            print(f"[henderson] AI-REML iter {iteration:3d} {kind}  objective {value:.8f}  "
                  f"gain {gain:.2e} mismatch {mismatch:.1e}  "
                  f"φ={np.array2string(phi, precision=6)}{'  last step' if last else ''}  "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if last:
            converged, message = True, f"AI-REML converged in {iteration} iterations"
            break
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
    #: ended by a full step whose predicted gain (< ai_final_gain) the objective
    #: confirmed to ai_final_mismatch: the quadratic model holds, what is left is ~0
    result.final_step_rule = not state_is_current
    if state_is_current:
        result.average_information = state.ai
        result.variance_components = state.phi
    # else the last step left the last AI behind: the results compute it at θ on demand
    # θ_t = 0 is a stationary point of the profiled objective and AI-REML keeps a
    # variance that reached 0 there: probe inside the boundary, and start again from
    # the probe when it is lower (a variance stranded at 0 is a wrong answer reported
    # as converged)
    zero = np.asarray(theta) == 0
    if probe_boundary and zero.any():
        probe = np.array(theta, dtype=float)
        probe[zero] = settings.boundary_probe
        if objective(probe) < value:
            again = optimize_ai_reml(objective, probe, verbose, settings, probe_boundary=False)
            again.history = history + again.history
            return again
    return result
