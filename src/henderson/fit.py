"""Stage 5 of the pipeline: optimise θ and hand the optimum to the results stage.

``lmm()`` is the public entry point: formula + data → :class:`Design` →
:class:`MixedModelEquations` → :class:`Objective` → optimiser →
:class:`~henderson.results.LinearMixedModel`.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scipy.sparse import issparse as sp_issparse

from .design import Design, build_design
from .errors import ConvergenceWarning
from .mme import MixedModelEquations
from .objective import Objective


@dataclass
class OptimizerResult:
    theta: np.ndarray
    objective: float
    n_evaluations: int
    converged: bool
    message: str
    method: str
    history: list = field(default_factory=list)


class _Progress:
    """Prints the objective every ``every`` evaluations to stderr."""

    def __init__(self, objective: Objective, verbose: bool | int):
        self.objective = objective
        self.every = 1 if verbose is True else int(verbose)
        self.start = time.perf_counter()
        self.best = np.inf

    def __call__(self, theta):
        value = self.objective(theta)
        self.best = min(self.best, value)
        count = self.objective.n_evaluations
        if self.every and count % self.every == 0:
            print(
                f"[henderson] eval {count:5d}  objective {value:.6f}  best {self.best:.6f}"
                f"  θ={np.array2string(np.asarray(theta), precision=5)}"
                f"  {time.perf_counter() - self.start:.1f}s",
                file=sys.stderr,
            )
        return value


#: from this many rows ``optimizer="auto"`` takes the quasi-Newton optimiser
LBFGS_MIN_ROWS = 50_000


def optimize_bobyqa(objective: Objective, start: np.ndarray, lower: np.ndarray,
                    verbose: bool | int = False, max_evaluations: int = 100_000,
                    tolerance: float = 1e-10) -> OptimizerResult:
    """Powell's BOBYQA (nlopt), lme4's default optimiser for ``lmer``, on any
    callable θ → value (an :class:`Objective` or a plain function).

    Stops at ``ftol_abs = xtol_abs = 1e-10``, tighter than lme4's 1e-8: that costs
    25-35% more evaluations (InstEval 70 vs 52) but pins down flat directions (the
    near-zero intercept-slope covariance of weighted sleepstudy moves by 1% between
    the two), which the agreement with lme4's printed variance components needs."""
    import nlopt

    func = _Progress(objective, verbose) if verbose else objective
    n = len(start)
    opt = nlopt.opt(nlopt.LN_BOBYQA, n)
    opt.set_lower_bounds(np.where(np.isfinite(lower), lower, -1e300))
    opt.set_min_objective(lambda x, grad: func(x))
    opt.set_ftol_abs(tolerance)
    opt.set_xtol_abs(tolerance)
    opt.set_maxeval(max_evaluations)
    opt.set_initial_step(np.full(n, 0.75))
    with np.errstate(all="ignore"):
        theta = opt.optimize(np.asarray(start, dtype=float))
    code = opt.last_optimize_result()
    converged = code in (nlopt.FTOL_REACHED, nlopt.XTOL_REACHED, nlopt.SUCCESS,
                         nlopt.STOPVAL_REACHED)
    return OptimizerResult(theta, opt.last_optimum_value(),
                           getattr(objective, "n_evaluations", opt.get_numevals()),
                           converged, f"nlopt BOBYQA return code {code}", "bobyqa")


def optimize_scipy(objective: Objective, start: np.ndarray, lower: np.ndarray,
                   method: str = "Powell", verbose: bool | int = False) -> OptimizerResult:
    """A bounded scipy optimiser (``Powell``, ``Nelder-Mead``, ``L-BFGS-B`` with
    finite differences)."""
    from scipy.optimize import Bounds, minimize

    func = _Progress(objective, verbose) if verbose else objective
    bounds = Bounds(lower, np.full_like(lower, np.inf))
    result = minimize(func, start, method=method, bounds=bounds,
                      options={"xtol": 1e-10, "ftol": 1e-12, "maxfev": 100_000}
                      if method == "Powell" else {})
    return OptimizerResult(result.x, float(result.fun), objective.n_evaluations,
                           bool(result.success), str(result.message), method)


class _GradientSmall(Exception):
    """Raised inside L-BFGS-B when an evaluated point is already optimal."""

    def __init__(self, theta, value, gradient):
        super().__init__("projected gradient below tolerance")
        self.theta, self.value, self.gradient = theta, value, gradient


def optimize_lbfgs(objective: Objective, start: np.ndarray, lower: np.ndarray,
                   verbose: bool | int = False) -> OptimizerResult:
    """Quasi-Newton (L-BFGS-B) on the analytic gradient from the selected inverse.

    Stops at the first evaluated point (line-search trials included) whose projected
    gradient is below ``max(1e-6, 1e-8·|f|)`` and whose value is the lowest so far.
    The gradient scales with the objective (the deviance of n rows): an absolute 1e-6
    is out of reach at a million rows, and L-BFGS-B, which tests only accepted iterates,
    idled at the objective's noise floor (InstEval: optimal at evaluation 13, stopped
    at 31; 1M-row crossed: optimal at 22, stopped at 34). The θ error this tolerance
    allows is ~|g|/H ≈ 1e-8, far below what lme4 prints."""
    from scipy.optimize import minimize

    from .objective import objective_gradient

    progress = _Progress(objective, verbose) if verbose else None
    start_value = objective(np.asarray(start, dtype=float))
    scale = abs(start_value) if np.isfinite(start_value) else 1.0
    tolerance = max(1e-6, 1e-8 * scale)
    bounded = np.isfinite(lower)
    best = [np.inf]

    def value_and_gradient(theta):
        try:
            value, gradient = objective_gradient(objective, theta)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros_like(theta)
        objective.history.append((np.array(theta), value))
        if progress is not None and progress.every and objective.n_evaluations % progress.every == 0:
            print(f"[henderson] eval {objective.n_evaluations:5d}  objective {value:.6f}  "
                  f"|gradient| {np.max(np.abs(gradient)):.2e}", file=sys.stderr)
        at_bound = bounded & (theta <= lower) & (gradient > 0)
        if value <= best[0] and np.max(np.abs(np.where(at_bound, 0.0, gradient))) < tolerance:
            raise _GradientSmall(np.array(theta, dtype=float), value, gradient)
        best[0] = min(best[0], value)
        return value, gradient

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

    theta, value, gradient, success, message = run(start)
    # θ_i = 0 is a stationary point of the profiled objective (it is even in the
    # diagonal of a one-coefficient term), so a projected step onto the bound can stop
    # there at a saddle: probe inside the bound and restart when that is lower
    for _ in range(3):
        at_zero = np.flatnonzero(bounded & (theta <= lower + 1e-10))
        if not len(at_zero):
            break
        probe = theta.copy()
        probe[at_zero] = 0.1
        if objective(probe) >= value:
            break
        best[0] = np.inf
        theta, value, gradient, success, message = run(probe)
    # a line search that fails at the noise floor of the objective (~1e-13 relative) is
    # convergence when the projected gradient is negligible
    at_bound = bounded & (theta <= lower) & (gradient > 0)
    projected = np.where(at_bound, 0.0, gradient)
    converged = success or float(np.max(np.abs(projected))) < 1e-3
    return OptimizerResult(theta, value, objective.n_evaluations, converged, message, "lbfgs")


def load_compiled_kernels() -> None:
    """Load the compiled Numba kernels of the common fitting path, as importing the
    package does (``HENDERSON_NO_WARMUP=1`` skips it).

    The first call of a Numba function in a process sets up Numba's CPU target
    (0.4 s here) and each kernel's first call loads its machine code from the cache
    (~10 ms each). That is loading the library, as ``library(lme4)`` loads lme4's
    compiled code, so it is done here, by fitting a 60-row crossed model through the
    block elimination and AI-REML (the kernels and the exact signatures of a real
    fit), and not in a user's first fit. Where no cache exists yet (a fresh install)
    this compiles the kernels once; nothing here ever makes the import fail.
    """
    import os

    if os.environ.get("HENDERSON_NO_WARMUP"):
        return
    try:
        _warm_up_fit()
    except Exception:  # noqa: BLE001 - a warm-up must never break the import
        pass


def _warm_up_fit():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"g1": np.repeat(np.arange(12), 5), "g2": np.tile(np.arange(6), 10),
                          "x": rng.normal(size=60)})
    frame["y"] = frame["x"] + rng.normal(size=60) + 0.5 * rng.normal(size=12)[frame["g1"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmm("y ~ x + (1 | g1) + (1 | g2)", frame, optimizer="ai", strategy="schur")


def moment_start(design: Design, xp) -> np.ndarray | None:
    """θ from one-way ANOVA estimates of each term's variance, for models whose terms
    each have one coefficient and identity K (None otherwise); a slope term
    (``(0 + x | g)``) starts at 1, as in lme4.

    From the cross-products only (chunked designs have no rows): the OLS residual r,
    for each term its level sums ``Z_t'Wr`` and counts ``diag(Z_t'WZ_t)``, the between-
    and within-level mean squares and ``σ²_t = (MS_b − MS_w) / n₀``; ``σ²_e`` is the
    residual variance less the terms'. A start, not an estimate: crossed terms each
    absorb a little of the others (InstEval: θ = (0.264, 0.432) against the optimum's
    (0.276, 0.435), where lme4 starts from (1, 1)), and it saves the Newton-type
    optimisers half their iterations.
    """
    from .objective import scalar_terms

    if not scalar_terms(design) or design.n_fixed == 0 or sp_issparse(xp.xx):
        return None
    n = float(np.sum(xp.diagonal[0][:, 0, 0]))
    beta = np.linalg.lstsq(np.asarray(xp.xx), xp.xy, rcond=None)[0]
    rss = float(xp.yy - beta @ xp.xy)
    if not (n > design.n_fixed and rss > 0):
        return None
    total = rss / (n - design.n_fixed)
    variances, within = [], [total]
    for t, term in enumerate(design.terms):
        if term.coef_names != ["(Intercept)"]:  # a slope (z not 0/1): no one-way ANOVA
            variances.append(np.nan)
            continue
        counts = xp.diagonal[t][:, 0, 0]
        pairs, blocks = xp.zx[t]
        sums = xp.zy[t][:, 0] - np.bincount(pairs[:, 0], weights=blocks[:, 0, 0]
                                            * beta[pairs[:, 1]], minlength=term.n_levels)
        levels = term.n_levels
        if levels < 2 or n <= levels:
            return None
        between = float(np.sum(sums ** 2 / np.maximum(counts, 1e-300)))
        mean_between = between / (levels - 1)
        mean_within = max(rss - between, 0.0) / (n - levels)
        within.append(mean_within)
        n0 = (n - float(np.sum(counts ** 2)) / n) / (levels - 1)
        variances.append(max(mean_between - mean_within, 0.0) / n0)
    variances = np.array(variances)
    if np.all(np.isnan(variances)):
        return None
    # Nested terms (each level of one inside a single level of the other) both count
    # the inner one's variance, so the total less the terms' falls towards 0; the
    # finest term's within-level mean square is σ²_e there. Crossed terms: that mean
    # square also holds the other terms' variances, and the total less them is closer.
    nested = any(len(pairs) in (design.terms[t].n_levels, design.terms[u].n_levels)
                 for (t, u), (pairs, _) in xp.crossed.items())
    residual = min(within) if nested else max(total - np.nansum(variances), 0.1 * total)
    # θ = 0 is a stationary point of the profiled objective: start inside; slopes
    # start where lme4 does
    theta = np.clip(np.sqrt(variances / residual), 0.05, 20.0)
    return np.where(np.isnan(theta), 1.0, theta)


def theta_from_variances(design: Design, variances: dict) -> tuple[np.ndarray, float]:
    """θ and σ for known variances: ``Λ_t = chol(Σ_t / σ²_e)``."""
    from .results import _group_names

    given = dict(variances)
    residual = given.pop("residual", given.pop("Residual", None))
    if residual is None or residual <= 0:
        raise ValueError("fixed_variances needs a positive 'residual' variance")
    names = _group_names(design)
    theta = []
    for name, term in zip(names, design.terms):
        value = given.pop(name, None)
        if value is None:
            value = given.pop(term.group, None) if names.count(term.group) <= 1 else None
        if value is None:
            raise ValueError(f"fixed_variances has no variance for term {name!r}")
        cov = np.atleast_2d(np.asarray(value, dtype=float))
        if cov.shape != (term.n_coefs, term.n_coefs):
            raise ValueError(f"variance of {name!r} must be {term.n_coefs} x {term.n_coefs}")
        eigen = np.linalg.eigvalsh(cov)
        if eigen.min() < 0:
            raise ValueError(f"variance of {name!r} is not positive semi-definite")
        lam = np.linalg.cholesky(cov / residual + 1e-300 * np.eye(term.n_coefs)) \
            if eigen.min() > 0 else np.sqrt(np.maximum(cov / residual, 0))
        rows, cols = np.tril_indices(term.n_coefs)
        order = np.lexsort((rows, cols))
        theta.extend(lam[rows[order], cols[order]])
    if given:
        raise ValueError(f"fixed_variances names unknown terms: {', '.join(map(str, given))}")
    return np.array(theta), float(np.sqrt(residual))


def fit_design(design: Design, reml: bool = True, optimizer: str = "auto",
               ordering: str = "auto", start: np.ndarray | None = None,
               verbose: bool | int = False, method: str = "mme",
               fixed_variances: dict | None = None, strategy: str = "auto",
               crossproducts=None):
    """Fit a model whose :class:`Design` is already built (lme4's modular route).

    ``crossproducts`` (:class:`~henderson.mme.CrossProducts`) are given for a design
    without rows (chunked and Dask fits).

    ``fixed_variances`` (grouping factor or VarCorr name -> variance, or k x k
    covariance; plus ``"residual"``) skips estimation: the MME are solved once at the
    given variances (BLUP with known variances).

    ``method="blockdiag"`` optimises through the block-diagonal Σ path (all terms
    nested in one factor); the results are then read off the MME at the optimum.

    Returns
    -------
    LinearMixedModel
    """
    from .results import LinearMixedModel

    timings = {}
    t0 = time.perf_counter()
    from .schur import BlockEliminationEquations, schur_applies

    if strategy not in ("auto", "schur", "cholmod"):
        raise ValueError("strategy must be 'auto', 'schur' or 'cholmod'")
    if strategy == "schur" or (strategy == "auto" and schur_applies(design)):
        mme = BlockEliminationEquations(design, crossproducts=crossproducts)
    else:
        mme = MixedModelEquations(design, ordering=ordering, crossproducts=crossproducts)
    timings["mme_setup"] = time.perf_counter() - t0
    objective = Objective(mme, reml=reml)
    if fixed_variances is not None:
        theta, sigma = theta_from_variances(design, fixed_variances)
        t0 = time.perf_counter()
        model = LinearMixedModel(design, mme, objective, theta, None, fixed_sigma=sigma)
        timings["results"] = time.perf_counter() - t0
        model.timings.update(timings)
        return model
    if method == "blockdiag":
        design.require_rows("method='blockdiag'")
        from .blockdiag import BlockDiagonalObjective

        search = BlockDiagonalObjective(design, reml=reml)
    elif method == "mme":
        search = objective
    else:
        raise ValueError(f"unknown method {method!r}; use 'mme' or 'blockdiag'")
    lower = design.theta_lower_bounds()
    t0 = time.perf_counter()
    if optimizer == "auto":
        has_known = any(t.level_precision is not None for t in design.terms)
        one_coef = all(t.n_coefs == 1 for t in design.terms)
        large = design.n_obs >= LBFGS_MIN_ROWS
        if (has_known or large) and one_coef and reml and method == "mme":
            optimizer = "ai"
        elif method == "mme" and large:
            optimizer = "lbfgs"
        else:
            optimizer = "bobyqa"
    if start is not None:
        start = np.asarray(start, dtype=float).ravel()
        if start.shape != (design.n_theta,) or not np.all(np.isfinite(start)):
            raise ValueError(f"start must be {design.n_theta} finite values of θ, got {start}")
    elif optimizer in ("ai", "lbfgs") and method == "mme":
        # the Newton-type optimisers gain most from a start near the optimum
        start = moment_start(design, mme.xp)
    if start is None:
        start = design.theta_start()
    if optimizer == "ai":
        from .aireml import optimize_ai_reml

        result = optimize_ai_reml(objective, start, verbose=verbose)
    elif optimizer == "bobyqa":
        result = optimize_bobyqa(search, start, lower, verbose=verbose)
    elif optimizer == "lbfgs":
        if method != "mme":
            raise ValueError("optimizer='lbfgs' needs method='mme'")
        result = optimize_lbfgs(objective, start, lower, verbose=verbose)
    elif optimizer in ("Powell", "Nelder-Mead", "L-BFGS-B"):
        result = optimize_scipy(search, start, lower, method=optimizer, verbose=verbose)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'auto', 'ai', 'bobyqa', "
                         "'lbfgs', 'Powell', 'Nelder-Mead' or 'L-BFGS-B'")
    timings["optimize"] = time.perf_counter() - t0
    if not result.converged:
        warnings.warn(f"optimiser did not converge: {result.message}", ConvergenceWarning,
                      stacklevel=2)
    theta = np.maximum(result.theta, lower)
    t0 = time.perf_counter()
    model = LinearMixedModel(design, mme, objective, theta, result)
    timings["results"] = time.perf_counter() - t0
    model.timings.update(timings)
    return model


def lmm(formula: str, data: pd.DataFrame, reml: bool = True,
        weights: str | np.ndarray | None = None, missing: str = "raise",
        optimizer: str = "auto", ordering: str = "auto",
        verbose: bool | int = False, method: str = "mme",
        relationships: dict | None = None, sparse_fixed: bool | str = "auto",
        fixed_variances: dict | None = None, strategy: str = "auto"):
    """Fit a linear mixed model with lme4's formula syntax.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``: ``(x | g)``
        correlated, ``(x || g)`` independent, ``(1 | a/b)`` nested, ``(1 | a:b)``.
    data : pandas.DataFrame, path, ChunkedData or dask DataFrame
        Categorical columns keep their category order; the first is the reference.
        A Parquet/CSV path or :func:`hd.chunked` source is read in chunks (out of
        core) and a Dask DataFrame is reduced on its cluster: only the cross-products
        are built, so ``fitted``/``residuals`` are not available, everything the MME
        give is (estimates, BLUPs, conditional SDs, ``predict``).
    reml : bool, default True
        REML (lme4's default) or maximum likelihood.
    weights : str or array, optional
        Prior weights: ``R = σ² W⁻¹``.
    missing : {"raise", "drop"}
        Rows with NaN/inf in a used column raise a ``DataError`` or are dropped.
    optimizer : {"auto", "ai", "bobyqa", "lbfgs", "Powell", "Nelder-Mead", "L-BFGS-B"}
        ``"ai"``: average-information REML (the default for REML models with one
        coefficient per term that have a known level covariance or at least 50,000
        rows); ``"lbfgs"``: quasi-Newton on the analytic gradient (the default for
        other models from 50,000 rows, where its ~25 evaluations beat BOBYQA's ~135);
        ``"bobyqa"``: lme4's derivative-free optimiser (the default otherwise); or a
        bounded scipy method with finite differences.
    ordering : {"auto", "natural", "amd", "metis"}
        Fill-reducing ordering for CHOLMOD (``auto`` measures the candidates).
    verbose : bool or int
        Print the objective to stderr every evaluation (or every ``verbose``).
    method : {"mme", "blockdiag"}
        Sparse mixed-model equations (any design) or the block-diagonal Σ path
        (random terms nested in one grouping factor).
    relationships : dict, optional
        Known level covariances by grouping factor: ``{"animal": hd.Pedigree(...)}``,
        a :class:`RelationshipMatrix` (e.g. from :func:`hd.grm`) or a labelled
        covariance DataFrame.
    sparse_fixed : bool or "auto"
        Keep X sparse (fixed factors with thousands of levels).
    fixed_variances : dict, optional
        Known variances, e.g. ``{"animal": 20.0, "residual": 40.0}``: no estimation,
        the MME are solved once (BLUP, PEVs and reliabilities at those variances).
    strategy : {"auto", "schur", "cholmod"}
        How C is factored: ``"schur"`` eliminates the largest grouping factor's
        block-diagonal part and factors the small dense rest (crossed designs);
        ``"cholmod"`` a sparse Cholesky of C. ``"auto"`` takes the block elimination
        when the first term has identity covariance, X is small and dense, and the rest
        has at most 3,000 rows.

    Returns
    -------
    LinearMixedModel

    Examples
    --------
    >>> import henderson as hd
    >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    >>> round(m.objective, 3)
    1743.628
    >>> m.fixef.round(3).to_dict()
    {'(Intercept)': 251.405, 'Days': 10.467}
    """
    from .streaming import as_chunk_source, chunked_design

    t0 = time.perf_counter()
    source = as_chunk_source(data)
    if source is None:
        design = build_design(formula, data, weights=weights, missing=missing,
                              relationships=relationships, sparse_fixed=sparse_fixed)
        crossproducts = None
    else:
        design, crossproducts = chunked_design(
            formula, source, weights=weights, missing=missing, relationships=relationships,
            sparse_fixed=sparse_fixed, verbose=bool(verbose))
    design_seconds = time.perf_counter() - t0
    model = fit_design(design, reml=reml, optimizer=optimizer, ordering=ordering,
                       verbose=verbose, method=method, fixed_variances=fixed_variances,
                       strategy=strategy, crossproducts=crossproducts)
    model.timings["design"] = design_seconds
    model.timings["total"] = time.perf_counter() - t0
    model.call = dict(formula=formula, data=data, reml=reml, weights=weights,
                      missing=missing, optimizer=optimizer, ordering=ordering,
                      method=method, relationships=relationships,
                      sparse_fixed=sparse_fixed, fixed_variances=fixed_variances,
                      strategy=strategy)
    return model
