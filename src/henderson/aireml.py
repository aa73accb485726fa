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


# ------------------------------------------------------------------ Newton steps in θ
@dataclass
class NewtonState:
    """The profiled objective at θ, its gradient and its average-information Hessian."""

    theta: np.ndarray
    objective: float
    gradient: np.ndarray   # ∂f/∂θ, f = −2 log L profiled over σ²
    hessian: np.ndarray    # 2 AI in (θ, σ²), σ² profiled out (a Schur complement)


def newton_applies(design) -> bool:
    """Newton steps need every term with identity K (the interior gradient's J = I)."""
    return all(t.level_precision is None for t in design.terms) \
        and getattr(design, "residual_model", None) is None


def newton_state(objective: Objective, theta: np.ndarray) -> NewtonState | None:
    """The :class:`NewtonState` at θ, or None where a Λ_t is not invertible.

    In the relative parametrisation ``V = σ² (ZΛΛ'Z' + W⁻¹)`` the working variate of
    θ_j is ``f_j = ∂V/∂θ_j P y = Z_t (D ũ_l + Λ D'Λ⁻ᵀ ũ_l)`` by level (``D = ∂Λ_t/∂θ_j``,
    ``Λ_t' Z_t'W r = ũ`` by the normal equations), that is ``f_j = T g_j`` with
    ``T = [ZΛ X]`` and ``g_j = (Λ⁻¹D + D'Λ⁻ᵀ) ũ_l``, so ``T'W f_j = (C − J) g_j``; σ²'s is
    ``f_σ = (y − Xβ̂)/σ²`` with ``T'W f_σ = C [ũ; 0] / σ²`` and
    ``f_σ'W f_σ = (r² + [ũ; 0]'C[ũ; 0]) / σ⁴``. Then, as in :meth:`AverageInformation.at`,
    ``AI_ij = ½ (f_i'W f_j − (T'W f_i)' C⁻¹ T'W f_j) / σ²``, that is ``½ f_i'P f_j / σ²``
    with REML's projection P, for ML as for REML (the mean of the observed and
    expected information of the objective with β profiled). One solve with a column
    per parameter, no pass over the rows; the gradient is the interior one
    (:mod:`henderson.objective`).
    """
    from .objective import interior_applies, interior_parts

    mme, design = objective.mme, objective.mme.design
    theta = np.asarray(theta, dtype=float)
    lams = mme.relative_factors(theta)
    if not interior_applies(design, lams):
        return None
    evaluation, gradient = interior_parts(objective, theta, lams)
    prss, dof = evaluation.penalized_rss, objective.dof
    sigma2 = prss / dof
    q = design.n_random
    offsets = design.column_offsets()
    solution = evaluation.solution
    size = len(solution)
    directions = []
    for t, (term, sl) in enumerate(zip(design.terms, design.theta_slices())):
        k = term.n_coefs
        spherical = solution[offsets[t]:offsets[t + 1]].reshape(term.n_levels, k)
        inverse = np.linalg.inv(lams[t])
        for jac in term.structure.factor_jacobian(theta[sl]):
            g = np.zeros(size)
            g[offsets[t]:offsets[t + 1]] = (spherical @ (inverse @ jac + jac.T @ inverse.T).T).ravel()
            directions.append(g)
    n = len(directions)
    products = []
    for g in directions:
        product = mme.multiply(g)
        product[:q] -= g[:q]                       # (C − J) g
        products.append(product)
    random_solution = np.concatenate([solution[:q], np.zeros(size - q)])
    c_random = mme.multiply(random_solution)
    products.append(c_random / sigma2)
    rhs = np.column_stack(products)
    gram = np.empty((n + 1, n + 1))
    for i in range(n):
        for j in range(n + 1):
            gram[i, j] = float(directions[i] @ products[j])
    gram[n, :n] = gram[:n, n]
    gram[n, n] = (prss + float(random_solution @ c_random)) / sigma2 ** 2
    # P, REML's projection, for ML too: with β profiled, ∂(y'Py)/∂θ_i = −y'PV_iPy
    # whichever the criterion, and the mean of ML's observed and expected information
    # is ½ y'PV_iPV_jPy as for REML. V⁻¹ in the middle (C_zz⁻¹, used before) is not:
    # its Newton steps fell short, InstEval ML took 3 states instead of 2 and ended
    # 1.4e-7 above lme4's optimum, 2e-8 with P
    quadratic = rhs.T @ mme.solve(rhs)
    ai = 0.5 * (gram - quadratic) / sigma2
    ai = 0.5 * (ai + ai.T)
    # f = −2ℓ: Hessian ≈ 2 AI; σ² profiled out
    hessian = 2.0 * (ai[:n, :n] - np.outer(ai[:n, n], ai[n, :n]) / ai[n, n])
    return NewtonState(theta.copy(), evaluation.objective, gradient, hessian)


def newton_convergence_check(problem, theta: np.ndarray, result,
                             tolerance: float | None = None):
    """lme4's scaled-gradient test at θ from the Newton state the optimiser ended with
    (its average-information Hessian, positive definite by construction: as for
    :func:`ai_convergence_check`, saddles are left to the boundary probes), in the
    problem's coordinates. None when there is no state at θ (the generic check runs).
    """
    state = getattr(result, "newton_state", None)
    theta = np.asarray(theta, dtype=float)
    if state is not None and getattr(result, "final_step_rule", False) \
            and np.array_equal(theta, problem.to_theta(result.theta)):
        # the last full step's predicted and realised falls agreed (optimize_newton)
        return ConvergenceCheck(True, "", result.objective, np.full(len(theta), np.nan),
                                np.zeros(len(theta)), np.nan, [])
    if state is None or not np.array_equal(theta, state.theta):
        return None
    tolerance = SETTINGS.check_gradient if tolerance is None else tolerance
    gradient = state.gradient / problem.scale
    hessian = state.hessian / np.outer(problem.scale, problem.scale)
    try:
        upper = np.linalg.cholesky(hessian).T
        scaled = np.minimum(np.abs(np.linalg.solve(upper, gradient)), np.abs(gradient))
    except np.linalg.LinAlgError:
        return None
    worst = int(np.argmax(scaled))
    passed = bool(scaled[worst] <= tolerance)
    message = "" if passed else (f"max|scaled gradient| {scaled[worst]:.3g} > {tolerance:g} "
                                 f"(θ[{worst}])")
    return ConvergenceCheck(passed, message, state.objective, gradient, scaled,
                            float(np.linalg.eigvalsh(hessian)[0]), [] if passed else
                            [problem.to_scaled(state.theta)])


def optimize_newton(problem, start: np.ndarray, lower: np.ndarray,
                    verbose: bool | int = False, settings: OptimizerSettings = SETTINGS,
                    upper: np.ndarray | None = None):
    """Newton steps on the profiled objective with the average information as Hessian
    (:func:`newton_state`), REML or ML, for terms of any number of coefficients;
    ``problem`` is a :class:`~henderson.optimize.ScaledProblem` and ``start``, the
    result's θ and ``lower`` are in its coordinates, as for
    :func:`~henderson.optimize.optimize_lbfgs`.

    A step that would take a bounded parameter (a diagonal of Λ_t) below its bound
    is shortened to keep 1% of the distance; a step that does not lower the
    objective is halved. It ends when the Newton decrement ``g'H⁻¹g`` is below
    ``settings.newton_decrement``; where a Λ_t becomes singular (an optimum on the
    boundary) or after ``settings.newton_max_iterations`` it hands the point to
    L-BFGS-B, which handles bounds.
    """
    from .optimize import optimize_lbfgs

    objective = problem.objective
    theta = problem.to_theta(start)
    lower_theta = problem.to_theta(lower)
    bounded = np.isfinite(lower_theta)
    history = []
    t0 = time.perf_counter()
    state = None
    for iteration in range(1, settings.newton_max_iterations + 1):
        try:
            state = newton_state(objective, theta)
        except np.linalg.LinAlgError:
            state = None
        if state is None:
            break
        objective.history.append((theta.copy(), state.objective))
        try:
            step = -np.linalg.solve(state.hessian, state.gradient)
        except np.linalg.LinAlgError:
            state = None
            break
        decrement = float(-state.gradient @ step)
        history.append((iteration, "Newton", state.objective, theta.copy()))
        if verbose:
            print(f"[henderson] Newton iter {iteration:3d}  objective {state.objective:.8f}  "
                  f"decrement {decrement:.2e}  {time.perf_counter() - t0:.2f}s",
                  file=sys.stderr)
        if not np.isfinite(decrement) or decrement < 0:
            state = None
            break
        if decrement < settings.newton_decrement:
            result = OptimizerResult(problem.to_scaled(theta), state.objective,
                                     problem.n_evaluations, True,
                                     f"Newton converged in {iteration} iterations", "newton",
                                     history)
            result.newton_state = state
            return result
        shrinking = bounded & (step < 0)
        scale = 1.0
        if shrinking.any():
            room = (1.0 - settings.ai_overshoot_keep) * (theta - lower_theta)[shrinking]
            scale = min(1.0, float(np.min(room / -step[shrinking])))
        if scale == 1.0 and decrement < settings.newton_final_decrement:
            # near the optimum the full step is the last when the objective falls by
            # what the quadratic model predicts (½ g'H⁻¹g): with AI = (1 + ε)H the fall
            # misses the prediction by ~ε·gain and leaves ~ε²·gain = mismatch²/gain
            # above the optimum (200k slopes: 1e-12; InstEval REML 3e-9), and the state
            # (gradient, AI) at the new point is not computed
            candidate = theta + step
            value = objective(candidate)
            gain = 0.5 * decrement
            mismatch = abs((state.objective - value) - gain)
            if mismatch < settings.newton_final_mismatch * gain and mismatch ** 2 / gain \
                    < max(settings.newton_final_gap, 1e-13 * abs(value)):
                history.append((iteration, "Newton (last)", value, candidate.copy()))
                result = OptimizerResult(problem.to_scaled(candidate), value,
                                         problem.n_evaluations, True,
                                         f"Newton converged in {iteration} iterations "
                                         "(last step)", "newton", history)
                result.newton_state = state
                result.final_step_rule = True
                return result
        accepted = False
        while scale > settings.ai_min_step:
            candidate = theta + scale * step
            if objective(candidate) < state.objective:
                accepted = True
                break
            scale *= 0.5
        if not accepted:
            break
        theta = candidate
    # on the boundary, singular, or slow: L-BFGS-B from the best point
    result = optimize_lbfgs(problem, problem.to_scaled(theta), lower, verbose=verbose,
                            settings=settings, upper=upper)
    result.method = "newton+lbfgs"
    result.history = history + list(result.history)
    return result


def vector_moment_start(design, xp) -> np.ndarray | None:
    """θ from per-level least squares, for designs with a vector-valued term (random
    slopes) and identity K; None otherwise (:func:`henderson.fit.moment_start` covers
    one-coefficient terms).

    From the cross-products only: β by OLS, then per level ``b̂_l = D_l⁻¹ Z_l'W r``
    (``D_l = Z_l'WZ_l``, r the OLS residual), ``Σ_t = mean(b̂ b̂') − σ² mean(D_l⁻¹)``
    over the levels whose D_l is well conditioned (``det(D_l / (tr D_l / k)) > 0.05``:
    nearly singular levels' b̂_l and D_l⁻¹ are large and noisy, and left the slope
    variance at 40% of the optimum's), σ² the first term's within-level variance less
    the other terms' shares ``tr(Σ_s Σ_l D_l) / n``, and Σ_t lifted to positive definite
    (every eigenvalue at least 1% of the largest, θ = 0 being a stationary point). A
    start, not an estimate: crossed terms absorb a little of each other. 200k rows of
    ``y ~ x + (1 + x | g1) + (1 | g2)``: θ = (1.0088, 0.314, 0.643, 0.671) against the
    optimum's (1.0088, 0.307, 0.640, 0.670), and 2 Newton states instead of 4.
    """
    from scipy.sparse import issparse

    terms = design.terms
    if all(t.n_coefs == 1 for t in terms) or design.n_fixed == 0 or issparse(xp.xx) \
            or any(t.level_precision is not None for t in terms):
        return None
    n = float(xp.n_obs)
    beta = np.linalg.lstsq(np.asarray(xp.xx), xp.xy, rcond=None)[0]
    rss = float(xp.yy - beta @ xp.xy)
    if not (n > design.n_fixed and rss > 0):
        return None
    fits = []
    for t, term in enumerate(terms):
        k, levels = term.n_coefs, term.n_levels
        pairs, blocks = xp.zx[t]
        weighted = blocks[:, :, 0] * beta[pairs[:, 1]][:, None]
        sums = xp.zy[t] - np.stack([np.bincount(pairs[:, 0], weights=weighted[:, a],
                                                minlength=levels) for a in range(k)], axis=1)
        cross = xp.diagonal[t]
        scale = np.maximum(np.einsum("laa->l", cross) / k, 1e-300)
        usable = np.linalg.det(cross / scale[:, None, None]) > 0.05
        if usable.sum() < max(2, k + 1):
            return None
        inverse = np.linalg.inv(cross[usable])
        estimates = np.einsum("lab,lb->la", inverse, sums[usable])
        explained = float(np.einsum("la,la->", estimates, sums[usable]))
        # the variance left within levels: σ² plus the other terms' variances, the
        # noise of this term's b̂_l
        within = (rss - explained) / (n - design.n_fixed - k * usable.sum())
        if not within > 0:
            return None
        covariance = estimates.T @ estimates / usable.sum() - within * inverse.mean(axis=0)
        values, vectors = np.linalg.eigh(0.5 * (covariance + covariance.T))
        floor = 0.01 * max(float(values.max()), 0.0025 * within)
        covariance = (vectors * np.maximum(values, floor)) @ vectors.T
        # what the term adds to a row's variance on average: tr(Σ_t Σ_l D_l) / n
        share = float(np.sum(covariance * cross.sum(axis=0))) / n
        fits.append((covariance, within, share))
    # σ² is the first term's within-level variance less the other terms' shares
    sigma2 = max(fits[0][1] - sum(share for _, _, share in fits[1:]), 0.1 * fits[0][1])
    theta = []
    for term, (covariance, _, _) in zip(terms, fits):
        try:
            theta.extend(term.structure.theta_from_covariance(covariance / sigma2))
        except (ValueError, np.linalg.LinAlgError):
            return None
    return np.asarray(theta, dtype=float)
