"""Stage 5 of the pipeline, the optimiser: θ̂ of the profiled objective.

Owns the optimisers (BOBYQA as lme4, L-BFGS-B on the analytic gradient, scipy's
bounded methods; AI-REML lives in ``aireml.py``), their tolerances in one
:class:`OptimizerSettings`, the coordinates they search in, and the check that a
point is a minimum (lme4's ``checkConv``) with the recovery when it is not.

**Coordinates.** The optimisers see ``θ̃ = d ∘ θ``: each entry of a term's Λ_t scaled
by a power of two near the root mean square of its row's covariate (``Λ̃_t = D_t Λ_t``,
still lower triangular, the same model: ``z Λ = (z D⁻¹)(D Λ)``). An intercept has
d = 1; a slope in a covariate of size 5e6 has d = 2²², so that its θ̃ is of order one
and an absolute tolerance or a first step of 0.75 means the same whatever the
covariate's units. Powers of two make the scaling exact.

**Local minima.** Below ``explore_rows`` rows the checked minimum is compared with the
ones reached from lme4's start and from each variance's other side of its bound, and
the lowest is kept.

**Convergence.** A fit is reported converged only where :func:`check_convergence`
passes: the projected gradient in θ̃ (KKT at the bounds), lme4's scaled gradient
``min(|R⁻¹g|, |g|) < 2e-3`` with ``H = R'R`` the finite-difference Hessian of the
analytic gradient on the free parameters, and no negative curvature. A zero diagonal
of Λ_t with a nonzero column below it is a point where flipping that column's sign
gives the same Σ_t and the opposite derivative along the diagonal, so its derivative
must vanish, not merely point outwards: BOBYQA stopped at such points (808.29 where
807.79 was the minimum). Where the check fails, :func:`ensure_convergence` restarts
from the failing point and from the flipped ones, with L-BFGS-B and BOBYQA, keeps the
lowest, and warns when the check still fails.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import ConvergenceWarning
from .objective import objective_gradient


@dataclass(frozen=True)
class OptimizerSettings:
    """Every tolerance and constant of the optimisers, with the reason for its value.

    Attributes
    ----------
    bobyqa_tolerance : float
        ``ftol_abs`` and ``xtol_abs`` of BOBYQA. Tighter than lme4's 1e-8: 25-35% more
        evaluations (InstEval 70 vs 52), but flat directions are pinned down (the
        near-zero intercept-slope covariance of weighted sleepstudy moves by 1%
        between the two), which agreement with lme4's printed numbers needs.
    bobyqa_initial_step : float
        BOBYQA's first trust-region radius in θ̃ (lme4 takes 0.75 in θ = 1 units).
    bobyqa_max_evaluations : int
    lbfgs_min_rows : int
        From this many rows ``optimizer="auto"`` takes L-BFGS-B (~25 evaluations
        against BOBYQA's ~135).
    lbfgs_gradient_floor, lbfgs_gradient_per_row : float
        L-BFGS-B stops at the first evaluated point whose projected gradient is below
        ``max(floor, per_row · n)``: the deviance of n rows is O(n) and its gradient
        cannot be computed more finely (an absolute 1e-6 is out of reach at a million
        rows, where the line search then idles at the noise floor). Per row, not per
        unit of the objective, so that scaling y (which adds a constant to the
        objective) changes nothing.
    boundary_probe : float
        θ̃ of a diagonal element moved inside its bound to test whether the bound is a
        minimum (θ_t = 0 is a stationary point of the profiled objective).
    check_gradient : float
        lme4's ``check.conv.grad`` tolerance on ``min(|R⁻¹g|, |g|)``.
    check_curvature : float
        Negative curvature below ``−check_curvature · max(1, |λ|max)`` fails the check.
    check_step : float
        Relative step of the finite-difference Hessian (forward differences of the
        analytic gradient, in θ̃).
    boundary_gain : float
        A diagonal element of Λ below ``boundary_threshold`` (θ̃) is set to exactly 0
        when the objective rises by less than this (deviance units): lme4's BOBYQA
        stops on the bound, Newton-type methods only approach it.
    boundary_threshold : float
    max_recoveries : int
        Restart rounds of :func:`ensure_convergence`.
    explore_rows : int
        Below this many rows a checked minimum is compared with the minima reached
        from each variance's other side of its bound (:func:`_explore_boundaries`):
        one L-BFGS-B run per diagonal element of Λ. Small data have more than one
        local minimum (on the boundary and inside) often enough that BOBYQA and
        Nelder-Mead from the same start ended in different ones.
    explore_all_rows, explore_min_levels : int
        From ``explore_all_rows`` rows (and below ``explore_rows``) the exploration is
        thorough only where the minimum gives a reason (:func:`_explore_thoroughly`: a
        term with fewer than ``explore_min_levels`` levels, a structure with
        correlation parameters, a Σ_t nearly singular or a correlation near ±1);
        otherwise it is one loose run from lme4's start. The boundary and correlation
        starts cost 2-10 fits there (40,000 rows of ``y ~ x + (1 + x | g1) + (1 | g2)``:
        2.3 s against 0.15 s at 50,000 rows, where there is no exploration).
    explore_gain : float
        Relative gain that makes an explored minimum replace the one found.
    explore_tolerance : float
        BOBYQA's tolerance in the exploring runs (only a lower minimum is then polished
        by L-BFGS-B): L-BFGS-B with a loose gradient tolerance spent ~35 ms of
        Orthodont's 50 ms fit on exploring, BOBYQA's cheaper evaluations much less.
    correlation_threshold, correlation_limit : float
        A structure's unconstrained correlation parameter beyond the threshold (ar1:
        |ρ| > 0.95) is tried at the limit (|ρ| = 1 − 5e-9) and kept there when the
        objective is no higher (:func:`_snap_to_boundary`).
    ai_max_iterations, ai_tolerance : int, float
        AI-REML's iterations and its relative change in the objective that, with a
        change in the variances below 1e-5, ends them.
    ai_final_gain, ai_final_mismatch : float
        A full AI step whose predicted gain is below ``ai_final_gain`` and matches the
        gain found to ``max(ai_final_mismatch, 1e-13|f|)`` is the last (DESIGN.md §4:
        on a quadratic with AI = (1 + ε)H what is left is ε times the mismatch;
        stopping at 1e-5 left θ 7e-6 off).
    ai_overshoot_keep : float
        A variance that an AI step would turn negative keeps this fraction of its value
        (0 stranded InstEval's student variance at the boundary, 2,435 above the
        optimum).
    ai_min_step : float
        The line search halves an AI step down to this fraction, then takes EM-REML's.
    theta_limit : float
        Upper bound of every scaled SD parameter θ̃ (a diagonal of Λ̃: a random-effect
        SD over σ). Beyond it the relative-form objective loses digits as ~1e-13 θ̃²
        (cancellation in the fixed-effect Schur complement and the PRSS): a toep fit
        whose residual variance went to 0 computed 7904.9 at θ̃ = 4e6 where the dense
        value is 8304.9. A fit that ends there has σ → 0 (:func:`residual_at_limit`).
    ridge_drop : float
        At θ̃ = ``theta_limit``, a fall of the objective by more than this from
        θ̃/10 means it is unbounded below (the random effects fit y exactly); less,
        that it levels off as σ → 0 (a structure's variances take up σ²).
    hessian_rows : int
        From this many rows the convergence check takes the optimiser's BFGS curvature
        instead of a finite-difference Hessian (:func:`check_convergence`).
    newton_min_rows : int
        From this many rows ``optimizer="auto"`` takes Newton steps in θ
        (:func:`henderson.aireml.optimize_newton`) where they apply; below, BOBYQA,
        whose evaluations are cheaper than a Newton state on small data.
    newton_max_iterations : int
        Newton steps (:func:`henderson.aireml.optimize_newton`) before L-BFGS-B takes
        over.
    newton_decrement : float
        Newton ends where ``g'H⁻¹g`` (twice the gain its quadratic model predicts) is
        below this.
    newton_final_decrement, newton_final_mismatch, newton_final_gap : float
        Below this decrement a full Newton step is the last (no state at its point)
        when the objective falls by the predicted ½ g'H⁻¹g to within this fraction of
        it, and the objective this leaves above the optimum, mismatch² / gain, is below
        ``max(newton_final_gap, 1e-13 |f|)``.
    """

    bobyqa_tolerance: float = 1e-10
    bobyqa_initial_step: float = 0.75
    bobyqa_max_evaluations: int = 100_000
    lbfgs_min_rows: int = 50_000
    lbfgs_gradient_floor: float = 1e-6
    lbfgs_gradient_per_row: float = 1e-8
    boundary_probe: float = 0.1
    check_gradient: float = 2e-3
    check_curvature: float = 1e-6
    check_step: float = 1e-5
    boundary_gain: float = 1e-7
    boundary_threshold: float = 1e-3
    max_recoveries: int = 3
    explore_rows: int = 50_000
    explore_all_rows: int = 5_000
    explore_min_levels: int = 50
    explore_gain: float = 1e-9
    explore_tolerance: float = 1e-4
    correlation_threshold: float = 3.0
    correlation_limit: float = 1e4
    theta_limit: float = 1e4
    ridge_drop: float = 0.5
    ai_max_iterations: int = 60
    ai_tolerance: float = 1e-9
    ai_final_gain: float = 0.1
    ai_final_mismatch: float = 1e-7
    ai_overshoot_keep: float = 0.01
    ai_min_step: float = 1e-3
    hessian_rows: int = 50_000
    newton_min_rows: int = 5_000
    newton_max_iterations: int = 30
    newton_decrement: float = 1e-6
    newton_final_decrement: float = 0.01
    newton_final_mismatch: float = 0.1
    newton_final_gap: float = 1e-8


#: the settings every fit uses
SETTINGS = OptimizerSettings()


@dataclass
class OptimizerResult:
    """Where an optimiser stopped and whether the point passed the convergence check.

    The optimisers return ``theta`` in the coordinates of the function they were given
    (θ̃ for a :class:`ScaledProblem`); :func:`~henderson.fit.fit_design` turns it into
    θ before :func:`ensure_convergence`, whose result is in θ."""

    theta: np.ndarray
    objective: float
    n_evaluations: int
    converged: bool
    message: str
    method: str
    history: list = field(default_factory=list)
    check: object = None  # the ConvergenceCheck at theta, when one was made
    #: evaluations of the optimiser itself, before the check and any recovery
    optimizer_evaluations: int | None = None


class _Progress:
    """Prints the objective every ``every`` evaluations to stderr."""

    def __init__(self, func, verbose: bool | int, count=None):
        self.func = func
        self.every = 1 if verbose is True else int(verbose)
        self.start = time.perf_counter()
        self.best = np.inf
        self.count = count
        self.calls = 0

    def __call__(self, theta):
        value = self.func(theta)
        self.calls += 1
        self.best = min(self.best, value)
        count = self.count() if self.count is not None else self.calls
        if self.every and count % self.every == 0:
            print(
                f"[henderson] eval {count:5d}  objective {value:.6f}  best {self.best:.6f}"
                f"  θ̃={np.array2string(np.asarray(theta), precision=5)}"
                f"  {time.perf_counter() - self.start:.1f}s",
                file=sys.stderr,
            )
        return value


class _Best:
    """Remembers the lowest value a callable returned and where: nlopt raises on
    roundoff without handing back its last point."""

    def __init__(self, func):
        self.func = func
        self.theta = None
        self.value = np.inf

    def __call__(self, theta):
        value = float(self.func(theta))
        if value < self.value or self.theta is None:
            self.theta, self.value = np.array(theta, dtype=float), value
        return value


def upper_bounds(lower: np.ndarray, settings: OptimizerSettings = SETTINGS) -> np.ndarray:
    """Upper bounds of θ̃: ``theta_limit`` for the SD parameters (those bounded below),
    none for the others."""
    return np.where(np.isfinite(lower), settings.theta_limit, np.inf)


def refit_upper_bounds(lower: np.ndarray, fitted: np.ndarray,
                       settings: OptimizerSettings = SETTINGS) -> np.ndarray:
    """Upper bounds of θ̃ for refits near a fit at θ̃ = ``fitted`` (bootstrap replicates,
    profiles): the limit, or 100 times the fit's largest SD parameter when the fit went
    past it (an SD 1e5 σ: bootstrap replicates held at 1e4 gave intervals that missed
    the estimate)."""
    finite = np.isfinite(lower)
    largest = float(np.max(np.asarray(fitted, dtype=float)[finite])) if finite.any() else 0.0
    return np.where(finite, max(settings.theta_limit, 100.0 * largest), np.inf)


def optimize_bobyqa(objective, start: np.ndarray, lower: np.ndarray,
                    verbose: bool | int = False, max_evaluations: int | None = None,
                    tolerance: float | None = None, initial_step: float | None = None,
                    settings: OptimizerSettings = SETTINGS,
                    upper: np.ndarray | None = None) -> OptimizerResult:
    """Powell's BOBYQA (nlopt), lme4's default optimiser for ``lmer``, on any callable
    θ → value.

    nlopt's roundoff-limited stop (the trust region cannot shrink further: the
    objective is flat to rounding there) returns the best point found; whether it is a
    minimum is for :func:`check_convergence` to say.
    """
    import nlopt

    count = getattr(objective, "n_evaluations", None)
    func = _Progress(objective, verbose, (lambda: objective.n_evaluations)
                     if count is not None else None) if verbose else objective
    best = _Best(func)
    n = len(start)
    tolerance = settings.bobyqa_tolerance if tolerance is None else tolerance
    opt = nlopt.opt(nlopt.LN_BOBYQA, n)
    opt.set_lower_bounds(np.where(np.isfinite(lower), lower, -1e300))
    if upper is not None:
        opt.set_upper_bounds(np.where(np.isfinite(upper), upper, 1e300))
    opt.set_min_objective(lambda x, grad: best(x))
    opt.set_ftol_abs(tolerance)
    opt.set_xtol_abs(tolerance)
    opt.set_maxeval(settings.bobyqa_max_evaluations if max_evaluations is None
                    else max_evaluations)
    opt.set_initial_step(np.full(n, settings.bobyqa_initial_step if initial_step is None
                                 else initial_step))
    start = np.maximum(np.asarray(start, dtype=float), np.where(np.isfinite(lower), lower,
                                                                -np.inf))
    if upper is not None:
        start = np.minimum(start, upper)
    try:
        with np.errstate(all="ignore"):
            theta = opt.optimize(start)
        code = opt.last_optimize_result()
        value = opt.last_optimum_value()
        converged = code in (nlopt.FTOL_REACHED, nlopt.XTOL_REACHED, nlopt.SUCCESS,
                             nlopt.STOPVAL_REACHED)
        message = f"nlopt BOBYQA return code {code}"
    except nlopt.RoundoffLimited:
        theta, value = best.theta, best.value
        converged, message = True, "nlopt BOBYQA stopped on roundoff"
    except RuntimeError as exc:  # nlopt's generic failure (e.g. a non-finite value)
        if best.theta is None:
            raise
        theta, value = best.theta, best.value
        converged, message = False, f"nlopt BOBYQA failed: {exc}"
    if best.theta is not None and best.value < value:
        theta, value = best.theta, best.value
    evaluations = objective.n_evaluations if count is not None else opt.get_numevals()
    return OptimizerResult(np.asarray(theta, dtype=float), float(value), evaluations,
                           converged, message, "bobyqa")


def optimize_scipy(objective, start: np.ndarray, lower: np.ndarray, method: str = "Powell",
                   verbose: bool | int = False,
                   upper: np.ndarray | None = None) -> OptimizerResult:
    """A bounded scipy optimiser (``Powell``, ``Nelder-Mead``, ``L-BFGS-B`` with
    finite differences) on a callable θ → value."""
    from scipy.optimize import Bounds, minimize

    func = _Progress(objective, verbose) if verbose else objective
    bounds = Bounds(lower, np.full_like(lower, np.inf) if upper is None else upper)
    result = minimize(func, start, method=method, bounds=bounds,
                      options={"xtol": 1e-10, "ftol": 1e-12, "maxfev": 100_000}
                      if method == "Powell" else {})
    return OptimizerResult(result.x, float(result.fun),
                           getattr(objective, "n_evaluations", int(result.nfev)),
                           bool(result.success), str(result.message), method)


class _GradientSmall(Exception):
    """Raised inside L-BFGS-B when an evaluated point is already optimal."""

    def __init__(self, theta, value, gradient):
        super().__init__("projected gradient below tolerance")
        self.theta, self.value, self.gradient = theta, value, gradient


def optimize_lbfgs(problem: "ScaledProblem", start: np.ndarray, lower: np.ndarray,
                   verbose: bool | int = False,
                   settings: OptimizerSettings = SETTINGS,
                   upper: np.ndarray | None = None) -> OptimizerResult:
    """Quasi-Newton (L-BFGS-B) on the analytic gradient, in the problem's coordinates.

    Stops at the first evaluated point (line-search trials included) whose projected
    gradient is below ``max(1e-6, 1e-8·n)`` and whose value is the lowest so far
    (:class:`OptimizerSettings`): L-BFGS-B tests only accepted iterates and idled at
    the objective's noise floor (InstEval: optimal at evaluation 13, stopped at 31).
    """
    from scipy.optimize import minimize

    tolerance = max(settings.lbfgs_gradient_floor,
                    settings.lbfgs_gradient_per_row * problem.n_obs)
    bounded = np.isfinite(lower)
    best = [np.inf]

    def value_and_gradient(theta):
        try:
            value, gradient = problem.value_and_gradient(theta)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros_like(theta)
        if verbose and problem.n_evaluations % (1 if verbose is True else int(verbose)) == 0:
            print(f"[henderson] eval {problem.n_evaluations:5d}  objective {value:.6f}  "
                  f"|gradient| {np.max(np.abs(gradient)):.2e}", file=sys.stderr)
        at_bound = bounded & (((theta <= lower) & (gradient > 0))
                              | ((theta >= upper) & (gradient < 0)))
        if value <= best[0] and np.max(np.abs(np.where(at_bound, 0.0, gradient))) < tolerance:
            raise _GradientSmall(np.array(theta, dtype=float), value, gradient)
        best[0] = min(best[0], value)
        return value, gradient

    upper = np.full(len(lower), np.inf) if upper is None else upper
    # the upper bounds only where a run went past them: finite bounds shorten
    # L-BFGS-B's first steps even far from them (InstEval ML: 12 evaluations, not 8)
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    options = {"ftol": 1e-13, "gtol": tolerance, "maxiter": 1000}

    def run(theta0):
        try:
            result = minimize(value_and_gradient, theta0, jac=True, method="L-BFGS-B",
                              bounds=bounds, options=options)
            return result.x, float(result.fun), result.jac, bool(result.success), \
                str(result.message)
        except _GradientSmall as stop:
            return stop.theta, float(stop.value), stop.gradient, True, \
                "projected gradient below tolerance"

    theta, value, gradient, success, message = run(np.asarray(start, dtype=float))
    if np.any(theta > upper):
        bounds = [(lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
                  for lo, hi in zip(lower, upper)]
        best[0] = np.inf
        theta, value, gradient, success, message = run(np.asarray(start, dtype=float))
    # θ_i = 0 is a stationary point of the profiled objective (it is even in the
    # diagonal of a one-coefficient term), so a projected step onto the bound can stop
    # there at a saddle: probe inside the bound and restart when that is lower
    for _ in range(3):
        at_zero = np.flatnonzero(bounded & (theta <= lower + 1e-10))
        if not len(at_zero):
            break
        probe = theta.copy()
        probe[at_zero] = settings.boundary_probe
        if problem.value(probe) >= value:
            break
        best[0] = np.inf
        theta, value, gradient, success, message = run(probe)
    # a line search that fails at the noise floor of the objective (~1e-13 relative) is
    # convergence when the projected gradient is negligible (the check says)
    at_bound = bounded & (((theta <= lower) & (gradient > 0))
                          | ((theta >= upper) & (gradient < 0)))
    projected = np.where(at_bound, 0.0, gradient)
    converged = success or float(np.max(np.abs(projected))) < 1e-3
    return OptimizerResult(theta, value, problem.n_evaluations, converged, message, "lbfgs")


#: gradient pairs kept for the quasi-Newton curvature of large fits' check
QUASI_NEWTON_PAIRS = 20


# ---------------------------------------------------------------- coordinates
def theta_scale(design, crossproducts) -> np.ndarray:
    """``d`` of ``θ̃ = d ∘ θ``: per parameter, a power of two near the root mean square
    of the covariate whose scale it carries (its structure's ``scale_rows``: the row
    of Λ_t for ``us``, the coefficient of an SD), from ``diag(Z_t'WZ_t)`` (so with
    prior weights an intercept's is the weights' root mean square, not 1); 1 for
    correlations."""
    n = max(float(crossproducts.n_obs), 1.0)
    scales = []
    for t, term in enumerate(design.terms):
        second_moment = np.einsum("laa->a", crossproducts.diagonal[t]) / n
        if term.level_variance is not None:  # a known K: levels without records count 0
            second_moment = second_moment * term.n_levels / max(
                np.count_nonzero(crossproducts.diagonal[t][:, 0, 0]), 1)
        rms = np.sqrt(np.maximum(second_moment, 0.0))
        row_scale = np.where(rms > 0, 2.0 ** np.round(np.log2(np.where(rms > 0, rms, 1.0))), 1.0)
        rows = term.structure.scale_rows()
        scales.append(np.where(rows >= 0, row_scale[np.maximum(rows, 0)], 1.0))
    return np.concatenate(scales) if scales else np.zeros(0)


class ScaledProblem:
    """The profiled objective in the optimiser's coordinates θ̃ = d ∘ θ.

    Parameters
    ----------
    objective : Objective
        θ → value, with the analytic gradient (:func:`objective_gradient`).
    scale : ndarray
        ``d`` (:func:`theta_scale`).
    search : callable, optional
        What derivative-free optimisers evaluate (the block-diagonal path); the
        objective by default.
    """

    def __init__(self, objective, scale: np.ndarray, search=None):
        self.objective = objective
        self.scale = np.asarray(scale, dtype=float)
        self.search = objective if search is None else search
        self.n_obs = objective.n_obs
        #: the last (θ̃, value, gradient) evaluated, and the recent (θ̃, gradient) pairs
        #: (a quasi-Newton curvature for the convergence check of large fits)
        self._last = None
        self.gradients: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def n_evaluations(self) -> int:
        return self.objective.n_evaluations + (
            self.search.n_evaluations if self.search is not self.objective else 0)

    def to_theta(self, scaled: np.ndarray) -> np.ndarray:
        return np.asarray(scaled, dtype=float) / self.scale

    def to_scaled(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(theta, dtype=float) * self.scale

    def value(self, scaled: np.ndarray) -> float:
        """The objective at θ̃ (inf where C is not positive definite)."""
        return float(self.search(self.to_theta(scaled)))

    __call__ = value

    def value_and_gradient(self, scaled: np.ndarray) -> tuple[float, np.ndarray]:
        scaled = np.asarray(scaled, dtype=float)
        if self._last is not None and np.array_equal(self._last[0], scaled):
            return self._last[1], self._last[2].copy()  # the check after the optimiser
        value, gradient = objective_gradient(self.objective, self.to_theta(scaled))
        self.objective.history.append((self.to_theta(scaled), value))
        gradient = gradient / self.scale
        self._last = (scaled.copy(), value, gradient.copy())
        self.gradients = self.gradients[-(QUASI_NEWTON_PAIRS - 1):] + [(scaled.copy(),
                                                                         gradient.copy())]
        return value, gradient

    def quasi_newton_hessian(self, index: np.ndarray) -> np.ndarray | None:
        """A BFGS approximation of the Hessian on the parameters ``index`` from the
        gradients the optimiser evaluated (None with too few useful pairs)."""
        pairs = []
        for (a, ga), (b, gb) in zip(self.gradients, self.gradients[1:]):
            step, change = (b - a)[index], (gb - ga)[index]
            if step @ change > 1e-12 * np.linalg.norm(step) * np.linalg.norm(change) > 0:
                pairs.append((step, change))
        if len(pairs) < len(index):
            return None
        step, change = pairs[-1]
        hessian = (change @ change) / (step @ change) * np.eye(len(index))
        for step, change in pairs:
            Hs = hessian @ step
            hessian += np.outer(change, change) / (change @ step) - np.outer(Hs, Hs) / (step @ Hs)
        return 0.5 * (hessian + hessian.T)


# ---------------------------------------------------------------- the check
@dataclass
class ConvergenceCheck:
    """What :func:`check_convergence` found at a point (θ̃ coordinates).

    Attributes
    ----------
    passed : bool
    message : str
        Why it failed, or "".
    value : float
    gradient : ndarray
        ∂f/∂θ̃ (for AI-REML's check: of −2ℓ in the variances φ).
    scaled_gradient : ndarray
        lme4's ``min(|R⁻¹g|, |g|)`` on the free parameters (0 on those at a bound).
    min_eigenvalue : float
        The smallest eigenvalue of the Hessian on the free parameters (NaN for
        AI-REML's check, whose Hessian is 2·AI, positive definite by construction).
    restarts : list of ndarray
        Points to restart from when the check failed (sign flips at zero diagonals).
    """

    passed: bool
    message: str
    value: float
    gradient: np.ndarray
    scaled_gradient: np.ndarray
    min_eigenvalue: float
    restarts: list


def _zero_diagonals(design, scaled: np.ndarray, lower: np.ndarray):
    """(index, flips) of every parameter at a bound of 0 (a zero diagonal of Λ_t, a zero
    SD), with the parameters whose sign can flip there without changing Σ_t (the
    column of Λ_t below a zero diagonal, for ``us``), in θ order."""
    out = []
    for term, sl in zip(design.terms, design.theta_slices()):
        for index, flips in term.structure.boundary_parameters():
            if scaled[sl.start + index] <= lower[sl.start + index]:
                out.append((sl.start + index, sl.start + np.asarray(flips, dtype=np.int64)))
    return out


def check_convergence(problem: ScaledProblem, scaled: np.ndarray, lower: np.ndarray,
                      settings: OptimizerSettings = SETTINGS) -> ConvergenceCheck:
    """Whether θ̃ is a minimum of the problem: KKT at the bounds, lme4's scaled gradient
    and the Hessian's definiteness on the free parameters (module docstring).

    From ``settings.hessian_rows`` rows the Hessian is the optimiser's own BFGS
    curvature (from the gradients it evaluated) when there is enough of it, instead of
    finite differences of the gradient (one gradient per parameter: a quarter of a
    million-row fit's time); that curvature is positive definite by construction, so
    there a saddle is left to the boundary probes of the optimisers."""
    design = problem.objective.mme.design
    scaled = np.asarray(scaled, dtype=float)
    try:
        value, gradient = problem.value_and_gradient(scaled)
    except np.linalg.LinAlgError as exc:
        return ConvergenceCheck(False, f"objective undefined at the optimum: {exc}", np.inf,
                                np.full(len(scaled), np.nan), np.full(len(scaled), np.nan),
                                np.nan, [])
    tol = settings.check_gradient
    at_bound = np.isfinite(lower) & (scaled <= lower)
    problems, restarts = [], []
    # at the upper limit of an SD (σ → 0, settings.theta_limit) the objective must
    # still fall outwards, or be flat
    at_limit = _at_sd_limit(scaled, lower, settings)
    for i in np.flatnonzero(at_limit & (gradient > tol)):
        problems.append(f"descent from the upper limit at θ[{i}] (derivative "
                        f"{gradient[i]:.3g})")
        probe = scaled.copy()
        probe[i] = 0.5 * settings.theta_limit
        restarts.append(probe)
    free = ~(at_bound | at_limit)
    # at a bound the gradient must point outwards; at a zero diagonal of Λ_t with a
    # nonzero column below it, flipping the column gives the same point and the
    # opposite derivative, so the derivative must vanish
    for diagonal, below in _zero_diagonals(design, scaled, lower):
        flips = len(below) and np.any(scaled[below] != 0)
        derivative = gradient[diagonal]
        if derivative < -tol or (flips and abs(derivative) > tol):
            problems.append(f"descent from the boundary at θ[{diagonal}] "
                            f"(derivative {derivative:.3g})")
            probe = scaled.copy()
            if flips and derivative > 0:
                probe[below] = -probe[below]
            probe[diagonal] = settings.boundary_probe
            restarts.append(probe)
    scaled_gradient = np.zeros(len(scaled))
    min_eigenvalue = np.nan
    # second order: the curvature must be ≥ 0 on the free parameters and on those at a
    # bound with a zero derivative (θ_t = 0 of a one-coefficient term is stationary by
    # symmetry: a maximum there passes every first-order test; L-BFGS-B stopped at one)
    degenerate = at_bound & ~at_limit & (np.abs(gradient) <= tol)
    index = np.flatnonzero(free | degenerate)
    if len(index):
        hessian = None
        if problem.n_obs >= settings.hessian_rows:
            degenerate[:] = False  # no curvature along bounds from the optimiser's steps
            index = np.flatnonzero(free)
            hessian = problem.quasi_newton_hessian(index) if len(index) else np.zeros((0, 0))
    if len(index) and hessian is None:
        hessian = np.empty((len(index), len(index)))
        steps = settings.check_step * np.maximum(1.0, np.abs(scaled[index]))
        try:
            for a, i in enumerate(index):
                moved = scaled.copy()
                moved[i] += steps[a]  # inwards for those at a bound
                hessian[:, a] = (problem.value_and_gradient(moved)[1][index]
                                 - gradient[index]) / steps[a]
        except np.linalg.LinAlgError:
            hessian[:] = np.nan
        hessian = 0.5 * (hessian + hessian.T)
    if len(index):
        g = gradient[index]
        if not np.all(np.isfinite(hessian)):
            problems.append("Hessian not finite at the optimum")
        else:
            eigenvalues = np.linalg.eigvalsh(hessian)
            min_eigenvalue = float(eigenvalues[0])
            if min_eigenvalue < -settings.check_curvature * max(1.0, float(np.max(np.abs(eigenvalues)))):
                problems.append(f"negative curvature ({min_eigenvalue:.3g}): not a minimum")
                vectors = np.linalg.eigh(hessian)[1]
                for sign in (1.0, -1.0):  # down the negative-curvature direction
                    probe = scaled.copy()
                    probe[index] += sign * settings.boundary_probe * vectors[:, 0] \
                        * max(1.0, np.linalg.norm(scaled))
                    probe = np.maximum(probe, lower)
                    probe[index[degenerate[index]]] = np.maximum(
                        probe[index[degenerate[index]]], settings.boundary_probe)
                    restarts.append(probe)
                scaled_gradient[index] = np.abs(g)
            else:
                inside = ~degenerate[index]  # the gradient test is on the free ones
                try:
                    upper = np.linalg.cholesky(hessian[np.ix_(inside, inside)]).T  # lme4: H = R'R
                    newton = np.linalg.solve(upper, g[inside])
                except np.linalg.LinAlgError:  # singular: flat directions, g alone decides
                    newton = np.full(int(inside.sum()), np.inf)
                scaled_gradient[index[inside]] = np.minimum(np.abs(newton), np.abs(g[inside]))
            worst = int(np.argmax(scaled_gradient))
            if scaled_gradient[worst] > tol:
                problems.append(f"max|scaled gradient| {scaled_gradient[worst]:.3g} > {tol:g} "
                                f"(θ[{worst}])")
                restarts.append(scaled.copy())
    return ConvergenceCheck(not problems, "; ".join(problems), float(value), gradient,
                            scaled_gradient, min_eigenvalue, restarts)


def ensure_convergence(problem: ScaledProblem, result: OptimizerResult, lower: np.ndarray,
                       settings: OptimizerSettings = SETTINGS, warn: bool = True,
                       first_check=None, tried_starts=(),
                       local_search=None) -> OptimizerResult:
    """Check the optimiser's point; where the check fails, restart (L-BFGS-B from the
    point and from the flipped or probed ones it suggests, then BOBYQA with a small
    first step from the best), keep the lowest, and check again. Diagonal elements of
    Λ that the objective lets be exactly 0 are set to 0. Returns the result with
    ``converged`` the verdict of the check (and a ``ConvergenceWarning`` when it failed).

    ``result.theta`` is in θ; the check runs in θ̃. ``first_check(θ̃)``, when given,
    makes the first check instead of :func:`check_convergence` (AI-REML's, from its
    score and average information, with no finite differences). ``tried_starts`` (θ̃)
    are not explored again. ``local_search(θ̃)``, when given, runs a fit from lme4's
    start where the exploration is not thorough (the caller's Newton steps) instead of
    a loose BOBYQA run.
    """
    scaled = problem.to_scaled(result.theta)
    value = result.objective
    if not np.isfinite(value):
        # an optimiser that ran off to where C is numerically singular: go back to the
        # lowest point it evaluated
        finite = [(v, t) for t, v in problem.objective.history if np.isfinite(v)]
        if finite:
            value, theta = min(finite, key=lambda item: item[0])
            scaled = problem.to_scaled(theta)
    scaled, value = _snap_to_boundary(problem, scaled, value, lower, settings)
    check = (first_check or (lambda point: check_convergence(problem, point, lower, settings)))(
        scaled)
    value = check.value if np.isfinite(check.value) else value
    method = result.method
    for round_ in range(settings.max_recoveries + 1):
        for _ in range(settings.max_recoveries):
            if check.passed:
                break
            improved = False
            for start in check.restarts or [scaled]:
                for attempt in ("lbfgs", "bobyqa"):
                    if attempt == "lbfgs":
                        trial = optimize_lbfgs(problem, start, lower, settings=settings,
                                               upper=upper_bounds(lower, settings))
                    else:
                        trial = optimize_bobyqa(problem.value, start, lower,
                                                initial_step=0.1, settings=settings,
                                                upper=upper_bounds(lower, settings))
                    # any decrease counts: a polish by 1.8e-9 (below 1e-12 relative)
                    # of a cs fit at ρ = 1 took its scaled gradient from 0.0035 to
                    # under the tolerance; the check after it decides
                    if trial.objective < value:
                        scaled, value, improved = trial.theta, trial.objective, True
                        method = f"{result.method}+{attempt}"
            if not improved:
                break
            scaled, value = _snap_to_boundary(problem, scaled, value, lower, settings)
            check = check_convergence(problem, scaled, lower, settings)
            value = check.value if np.isfinite(check.value) else value
        if not check.passed or problem.n_obs >= settings.explore_rows \
                or round_ == settings.max_recoveries:
            break
        better = _explore_boundaries(problem, scaled, value, lower, settings, tried_starts,
                                     _explore_thoroughly(problem, scaled, settings),
                                     local_search)
        if better is None:
            break
        scaled, value = _snap_to_boundary(problem, *better, lower, settings)
        method = f"{method}+explore"
        check = check_convergence(problem, scaled, lower, settings)
        value = check.value if np.isfinite(check.value) else value
    message = result.message if check.passed else \
        f"{result.message}; convergence check failed: {check.message}"
    if not check.passed and warn:
        warnings.warn(f"the fit may not be at a minimum: {check.message} (objective "
                      f"{value:.6f}); {_remedy(problem.objective.mme.design)}",
                      ConvergenceWarning, stacklevel=3)
    out = OptimizerResult(problem.to_theta(scaled) + 0.0, value, problem.n_evaluations,
                          check.passed, message, method, result.history, check,
                          result.n_evaluations)
    for name in ("average_information", "variance_components"):
        if hasattr(result, name) and np.array_equal(out.theta, result.theta):
            setattr(out, name, getattr(result, name))
    return out


def residual_at_limit(problem: ScaledProblem, scaled: np.ndarray, lower: np.ndarray,
                      settings: OptimizerSettings = SETTINGS) -> str | None:
    """None unless some θ̃ ended at ``theta_limit`` (σ → 0); then ``"unbounded"`` when
    the objective still falls steeply there (by more than ``ridge_drop`` from the
    point with every SD parameter ten times smaller: the random effects fit y exactly, and the
    likelihood has no maximum), else ``"levels off"`` (the likelihood approaches its
    highest value as σ → 0: a structure's variances take up the residual variance)."""
    if not np.any(_at_sd_limit(scaled, lower, settings)):
        return None
    drop = -falls_outward(problem, scaled, lower, factor=0.1)  # σ ten times larger
    return "unbounded" if not np.isfinite(drop) or drop > settings.ridge_drop \
        else "levels off"


def _at_sd_limit(scaled: np.ndarray, lower: np.ndarray,
                 settings: OptimizerSettings = SETTINGS) -> np.ndarray:
    """The SD parameters at ``theta_limit`` (within an optimiser's tolerance of it)."""
    return np.isfinite(lower) & (np.asarray(scaled, dtype=float) >= 0.999 * settings.theta_limit)


def falls_outward(problem: ScaledProblem, scaled: np.ndarray, lower: np.ndarray,
                  factor: float = 2.0) -> float:
    """How much lower the objective is with every SD parameter ``factor`` times larger
    (σ smaller, the same covariances): > 0 where it still falls as σ → 0; NaN where
    the objective cannot be evaluated."""
    scaled = np.asarray(scaled, dtype=float)
    outward = scaled.copy()
    outward[np.isfinite(lower)] *= factor
    try:
        return float(problem.value(scaled) - problem.value(outward))
    except np.linalg.LinAlgError:
        return np.nan


def _remedy(design) -> str:
    """What to try after a failed check: centring a random slope's covariate whose mean
    is far from 0 on the scale of its spread (lme4 says "Rescale variables?"), which is
    the same model and a better conditioned one; otherwise another optimiser."""
    hints = []
    for term in design.terms:
        if term.z.shape[1] < 2 or not np.all(term.z[:, 0] == 1.0):
            continue
        for name, column in zip(term.coef_names[1:], term.z[:, 1:].T):
            mean, spread = float(np.mean(column)), float(np.std(column))
            if spread > 0 and abs(mean) > 100.0 * spread:
                hints.append(f"{name!r} in ({term.covariates or name} | {term.group}) has "
                             f"mean {mean:.4g} and SD {spread:.4g}: centre it (the same "
                             f"model, better conditioned)")
    return "; ".join(hints) if hints else "try another optimizer, or rescale covariates"


#: a Σ_t whose smallest eigenvalue is below this fraction of its largest, or a
#: correlation beyond this in absolute value, makes the exploration thorough
NEAR_SINGULAR = 1e-3
NEAR_UNIT_CORRELATION = 0.95


def _explore_thoroughly(problem: ScaledProblem, scaled: np.ndarray,
                        settings: OptimizerSettings = SETTINGS) -> bool:
    """Whether the exploration tries every start (:func:`_explore_boundaries`) or only
    lme4's: thorough below ``settings.explore_all_rows`` rows, for a term with fewer
    than ``settings.explore_min_levels`` levels or a structure with correlation
    parameters (cs, ar1, toep and the like: their minima at ρ → ±1 are where other
    basins were found), and where the minimum is near a face of the parameter space
    (a Σ_t nearly singular, a correlation near ±1), the places the other minima of
    the test suite's designs were. Elsewhere, many levels and an interior minimum:
    the profiled likelihood is well determined there."""
    design = problem.objective.mme.design
    if problem.n_obs < settings.explore_all_rows or design.n_dispersion \
            or getattr(design, "residual_model", None) is not None:
        return True
    if any(term.n_levels < settings.explore_min_levels for term in design.terms) \
            or _correlation_parameters_by_term(design):
        return True
    theta = problem.to_theta(np.asarray(scaled, dtype=float))[:design.n_theta]
    for term, sl in zip(design.terms, design.theta_slices()):
        if term.n_coefs == 1:
            # θ̃ of a scalar term is its SD over σ on the covariate's scale
            if not np.asarray(scaled)[sl][0] > 10 * settings.boundary_threshold:
                return True
            continue
        lam = term.relative_factor(theta[sl])
        sigma = lam @ lam.T
        values = np.linalg.eigvalsh(sigma)
        if not values[0] > NEAR_SINGULAR * values[-1]:
            return True
        sd = np.sqrt(np.diag(sigma))
        correlation = sigma / np.outer(sd, sd)
        if np.any(np.abs(correlation[np.triu_indices(len(sd), 1)]) > NEAR_UNIT_CORRELATION):
            return True
    return False


def _explore_boundaries(problem: ScaledProblem, scaled: np.ndarray, value: float,
                        lower: np.ndarray, settings: OptimizerSettings, tried_starts=(),
                        thorough: bool = True, local_search=None):
    """L-BFGS-B from lme4's start (Λ̃ = I), from the point with each diagonal element
    of Λ moved across its bound's side (a nonzero one to 0, a zero one to 1), and with
    each structure's correlation parameter at 0 and at its opposite:
    the profiled objective of small data often has a minimum on the boundary and
    another inside, and which one an optimiser finds depends on where it starts
    (BOBYQA from lme4's start and L-BFGS-B from the moment start ended in different
    ones). Returns the lowest (θ̃, value) found when it is lower than ``value``, else
    None. Not ``thorough`` (:func:`_explore_thoroughly`): one run from lme4's start
    (``local_search``, else a loose BOBYQA), none where that start was tried."""
    design = problem.objective.mme.design
    starts = _exploration_starts(design, scaled, lower) if thorough \
        else [design.parameter_start()]
    # a loose run (BOBYQA: evaluations without gradients, ~5x cheaper on small data)
    # tells which basin a start leads to; only a lower one is polished
    best = None
    for number, start in enumerate(starts):
        if np.array_equal(start, scaled) or any(np.array_equal(start, t) for t in tried_starts):
            continue  # (a default fit has run BOBYQA from lme4's start: both runs skipped)
        if not thorough and local_search is not None:
            # the caller's Newton steps: 20,000 rows of y ~ x + (1 + x | g1) + (1 | g2)
            # with 1,000 g2 levels, a loose BOBYQA run took 45 evaluations (1.0 s), 4x
            # the fit
            trial = local_search(start)
        else:
            # from lme4's start, the run a default fit makes (BOBYQA to its own
            # tolerance): a loose run stopped there at 13.07 on a 9-row cs fit whose
            # minimum from that start is 2.18, and L-BFGS-B's fit kept 4.01. (After a
            # default fit this start is among tried_starts and costs nothing.)
            tight = thorough and number == 0
            trial = optimize_bobyqa(problem.value, start, lower,
                                    tolerance=None if tight else settings.explore_tolerance,
                                    initial_step=None if tight else 0.5, settings=settings,
                                    upper=upper_bounds(lower, settings))
        target = value if best is None else best[1]
        if trial.objective < target - settings.explore_gain * max(1.0, abs(target)):
            trial = optimize_lbfgs(problem, trial.theta, lower, settings=settings,
                                   upper=upper_bounds(lower, settings))
            if trial.objective < target - settings.explore_gain * max(1.0, abs(target)):
                best = (trial.theta, trial.objective)
    return best


def _exploration_starts(design, scaled: np.ndarray, lower: np.ndarray) -> list[np.ndarray]:
    """The starts of a thorough exploration (θ̃): lme4's (tight, then loose), each
    bounded parameter moved across its bound's side, and each structure's
    correlations moved (:func:`_explore_boundaries`)."""
    starts = [design.parameter_start(), design.parameter_start()]  # tight, then loose
    for i in np.flatnonzero(np.isfinite(lower)):
        start = np.array(scaled, dtype=float)
        start[i] = lower[i] if start[i] > lower[i] else 1.0
        starts.append(start)
    # a correlation run to one end of its range (ρ → ±1) may have its minimum at the
    # other, or in the middle: start again from no correlation and from a strong one
    # of either sign (φ = ±3, |ρ| ≈ 0.95: not farther out, where the objective is flat
    # and a loose run stops at once; a toep fit on 9 rows reached its lowest basin
    # only from φ = +3, having stopped at φ = 0.24). One parameter at a time for a
    # structure with one or two; all of a structure's together for more (a toep over
    # 9 levels has 8, and 8 x 5 loose runs cost more than the fit).
    for indices in _correlation_parameters_by_term(design):
        groups = [indices[[j]] for j in range(len(indices))] if len(indices) <= 2 \
            else [indices]
        for group in groups:
            for moved in (0.0, -3.0, 3.0):
                start = np.array(scaled, dtype=float)
                start[group] = moved
                starts.append(start)
            # and from lme4's start with the correlations near either end (φ = ±8): a
            # cs term over 8 levels (1,600 rows) has one minimum with ρ = 0.23 and
            # σ → 0, another 9.5 lower with ρ → 1 and σ ≈ 1 (glmmTMB's), reached from
            # none of the above
            for moved in (-8.0, 8.0):
                start = np.array(design.parameter_start(), dtype=float)
                start[group] = moved
                starts.append(start)
    return starts


def _correlation_parameters_by_term(design) -> list[np.ndarray]:
    """Indices in θ of each structure's correlation parameters, for the terms that
    have any."""
    out = [sl.start + np.flatnonzero(term.structure.scale_rows() < 0)
           for term, sl in zip(design.terms, design.theta_slices())]
    return [indices.astype(np.int64) for indices in out if len(indices)]


def _correlation_parameters(design) -> np.ndarray:
    """Indices in θ of the structures' correlation parameters (those of no covariate's
    scale)."""
    by_term = _correlation_parameters_by_term(design)
    return np.concatenate(by_term) if by_term else np.zeros(0, dtype=np.int64)


def _snap_to_boundary(problem: ScaledProblem, scaled: np.ndarray, value: float,
                      lower: np.ndarray, settings: OptimizerSettings):
    """Diagonal elements of Λ near 0 set to exactly 0 when the objective allows
    (rises by less than ``boundary_gain``), one at a time, smallest first; a
    structure's correlation far out (|φ| above ``correlation_threshold``) taken to the
    end of its range (``correlation_limit``) when that is no higher: the objective
    approaches a ρ = ±1 optimum only as φ → ±∞, where each optimiser stops somewhere
    on the flat way (7.5e-5 apart on an ar1 fit)."""
    scaled = np.array(scaled, dtype=float)
    near = np.flatnonzero(np.isfinite(lower) & (scaled > lower)
                          & (scaled < settings.boundary_threshold))
    for i in near[np.argsort(scaled[near])]:
        trial = scaled.copy()
        trial[i] = lower[i]
        trial_value = problem.value(trial)
        if trial_value <= value + settings.boundary_gain:
            scaled, value = trial, trial_value
    for i in _correlation_parameters(problem.objective.mme.design):
        if abs(scaled[i]) > settings.correlation_threshold:
            trial = scaled.copy()
            trial[i] = np.sign(scaled[i]) * settings.correlation_limit
            trial_value = problem.value(trial)
            if trial_value <= value:
                scaled, value = trial, trial_value
    return scaled, value
