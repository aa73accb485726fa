"""Stage 5 of the pipeline: optimise θ and hand the optimum to the results stage.

``lmm()`` is the public entry point: formula + data → :class:`Design` →
:class:`MixedModelEquations` → :class:`Objective` → optimiser →
:class:`~henderson.results.LinearMixedModel`.
"""
from __future__ import annotations

import inspect
import os
import time
import warnings

import numpy as np
import pandas as pd

from scipy.sparse import issparse as sp_issparse

from .design import Design, build_design
from .formula import parse_formula
from .aireml import (ai_convergence_check, newton_applies, newton_convergence_check,
                     optimize_ai_reml, optimize_newton, vector_moment_start)
from .blockdiag import BlockDiagonalObjective
from .errors import ConvergenceWarning, DataError, SingularFitWarning
from .mme import MixedModelEquations, check_residual_variation
from .objective import Objective, scalar_terms
from .report import SINGULAR_MESSAGE, _normal_term, group_names
from .results import LinearMixedModel
from .schur import schur_applies
from .streaming import as_chunk_source, chunked_design
from .threads import check_threads, fit_threads
from .optimize import (SETTINGS, OptimizerResult, OptimizerSettings, ScaledProblem,
                       check_convergence, ensure_convergence, falls_outward,
                       optimize_bobyqa, optimize_lbfgs, optimize_scipy, residual_at_limit,
                       theta_scale, upper_bounds)


#: whether this process has loaded the compiled Numba kernels (the first hd.lmm does)
_KERNELS_LOADED = False


def load_compiled_kernels() -> float:
    """Load the compiled Numba kernels of the common fitting path now, rather than in
    the first fit of the process: for a service that wants its first request fast.
    The first :func:`lmm` of a process calls it and reports its seconds as
    ``timings["numba_kernel_load"]`` (they were counted as "crossproducts" before), so
    the stages' timings are the same in every fit. Returns the seconds it took.

    The first call of a Numba function in a process sets up Numba's CPU target and
    each kernel's first call loads its machine code from the cache; this fits a 60-row
    crossed model through the block elimination and Newton steps (the kernels and the exact
    signatures of a real fit). Measured in fresh processes (median of 5): it costs
    ~0.3 s and saves the first fit ~0.25 s (sleepstudy 0.28 -> 0.04 s, InstEval 0.62
    -> 0.36 s), so importing henderson does not do it (a fit hidden in the import moved
    time, it did not save any). Where no cache exists yet (a fresh install) this
    compiles the kernels once.

    Examples
    --------
    >>> import henderson as hd
    >>> seconds = hd.load_compiled_kernels()
    """
    global _KERNELS_LOADED
    _KERNELS_LOADED = True
    start = time.perf_counter()
    _warm_up_fit()
    return time.perf_counter() - start


def _warm_up_fit():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"g1": np.repeat(np.arange(12), 5), "g2": np.tile(np.arange(6), 10),
                          "x": rng.normal(size=60)})
    frame["y"] = frame["x"] + rng.normal(size=60) + 0.5 * rng.normal(size=12)[frame["g1"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmm("y ~ x + (1 | g1) + (1 | g2)", frame, optimizer="newton", strategy="schur")


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
    if not isinstance(variances, dict):
        raise TypeError("fixed_variances must be a dict of variances by term, with "
                        f"'residual', got {type(variances).__name__}")
    given = dict(variances)
    residual = given.pop("residual", given.pop("Residual", None))
    try:
        residual = float(residual) if residual is not None else None
    except (TypeError, ValueError):
        raise ValueError(f"fixed_variances['residual'] must be a number, got {residual!r}") \
            from None
    if residual is None or not np.isfinite(residual) or residual <= 0:
        raise ValueError("fixed_variances needs a positive, finite 'residual' variance, "
                         f"got {residual!r}")
    names = group_names(design)
    # a term may also be named as the formula wrote it, "ar1(0 + t | g)"
    by_text = {_normal_term(str(key)): key for key in given}
    theta = []
    for name, term in zip(names, design.terms):
        value = given.pop(name, None)
        if value is None:
            value = given.pop(term.group, None) if names.count(term.group) <= 1 else None
        if value is None and _normal_term(term.label) in by_text:
            value = given.pop(by_text[_normal_term(term.label)])
        if value is None:
            raise ValueError(f"fixed_variances has no variance for term {name!r}")
        try:
            cov = np.atleast_2d(np.asarray(value, dtype=float))
        except (TypeError, ValueError):
            raise ValueError(f"fixed_variances[{name!r}] must be a number or a "
                             f"{term.n_coefs} x {term.n_coefs} matrix, got {value!r}") from None
        if cov.shape != (term.n_coefs, term.n_coefs):
            raise ValueError(f"fixed_variances[{name!r}] must be {term.n_coefs} x "
                             f"{term.n_coefs}, got shape {cov.shape}")
        if not np.all(np.isfinite(cov)) or not np.allclose(cov, cov.T, rtol=1e-10, atol=0):
            raise ValueError(f"fixed_variances[{name!r}] must be finite and symmetric")
        eigen = np.linalg.eigvalsh(cov)
        if eigen.min() < -1e-12 * max(1.0, float(np.abs(eigen).max())):
            raise ValueError(f"fixed_variances[{name!r}] is not positive semi-definite "
                             "(a negative variance?)")
        try:
            theta.extend(term.structure.theta_from_covariance(cov / residual))
        except ValueError as exc:
            raise ValueError(f"fixed_variances[{name!r}]: {exc}") from None
    if given:
        raise ValueError(f"fixed_variances names unknown terms: {', '.join(map(str, given))}")
    return np.array(theta), float(np.sqrt(residual))


def _is_breeding_model(formula, relationships, covary, reml, optimizer) -> bool:
    """Whether :func:`lmm` hands the model to the general-covariance equations."""
    from .multivariate import is_multivariate_formula
    from .pedigree import Pedigree

    if is_multivariate_formula(formula) or covary:
        return True
    if not isinstance(relationships, dict):
        return False
    if any(isinstance(k, Pedigree) and k.n_groups for k in relationships.values()):
        return True
    # a random regression on a pedigree: AI-REML (or BLUP) on the general equations,
    # whose results (breeding values per coefficient) the relative form does not give;
    # ML or another optimiser keeps the relative form
    if not reml or optimizer not in ("auto", "ai"):
        return False
    try:
        bars = parse_formula(formula).bars
    except Exception:
        return False
    return any(bar.group in relationships and bar.lhs.replace(" ", "") not in ("1", "0+1")
               and bar.structure == "us" for bar in bars)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


#: the values of lmm()'s options
OPTIMIZERS = ("auto", "ai", "newton", "bobyqa", "lbfgs", "Powell", "Nelder-Mead",
              "L-BFGS-B")


def check_options(reml=True, optimizer="auto", ordering="auto", method="mme",
                  strategy="auto", verbose=False, missing="raise",
                  sparse_fixed="auto") -> None:
    """A ValueError or TypeError naming the option, before any work is done."""
    if not isinstance(reml, (bool, np.bool_)):
        raise TypeError(f"reml must be True or False, got {reml!r}")
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("ordering", ordering, ("auto", "natural", "amd", "metis"))
    _check_choice("method", method, ("mme", "blockdiag"))
    _check_choice("strategy", strategy, ("auto", "schur", "cholmod"))
    _check_choice("missing", missing, ("raise", "drop"))
    if not (isinstance(sparse_fixed, (bool, np.bool_)) or sparse_fixed == "auto"):
        raise ValueError(f"sparse_fixed must be True, False or 'auto', got {sparse_fixed!r}")
    if isinstance(verbose, (bool, np.bool_)):
        return
    if not isinstance(verbose, (int, np.integer)) or verbose < 0:
        raise TypeError(f"verbose must be True/False or a number of evaluations, got "
                        f"{verbose!r}")


def fit_design(design: Design, reml: bool = True, optimizer: str = "auto",
               ordering: str = "auto", start: np.ndarray | None = None,
               verbose: bool | int = False, method: str = "mme",
               fixed_variances: dict | None = None, strategy: str = "auto",
               crossproducts=None, settings: OptimizerSettings = SETTINGS,
               threads: int | None = None):
    """Fit a model whose :class:`Design` is already built (lme4's modular route).

    ``crossproducts`` (:class:`~henderson.mme.CrossProducts`) are given for a design
    without rows (chunked and Dask fits). ``settings`` are the optimisers' tolerances
    (:class:`~henderson.optimize.OptimizerSettings`; profiles refit without exploring).

    ``fixed_variances`` (grouping factor or VarCorr name -> variance, or k x k
    covariance; plus ``"residual"``) skips estimation: the MME are solved once at the
    given variances (BLUP with known variances).

    ``method="blockdiag"`` optimises through the block-diagonal Σ path (all terms
    nested in one factor); the results are then read off the MME at the optimum.

    ``threads`` is :func:`lmm`'s: the threads of the fit (BLAS and henderson's own);
    inside a fit that already set them (``lmm``, a profile's refits) None keeps them.

    Returns
    -------
    LinearMixedModel
    """
    check_threads(threads)
    with fit_threads(threads):
        return _fit_design(design, reml, optimizer, ordering, start, verbose, method,
                           fixed_variances, strategy, crossproducts, settings)


def _fit_design(design, reml, optimizer, ordering, start, verbose, method,
                fixed_variances, strategy, crossproducts, settings):
    timings = {}
    t0 = time.perf_counter()
    check_options(reml=reml, optimizer=optimizer, ordering=ordering, method=method,
                  strategy=strategy, verbose=verbose)
    elimination = strategy == "schur" or (strategy == "auto" and schur_applies(design))
    mme = MixedModelEquations(design, ordering=ordering, crossproducts=crossproducts,
                              strategy="schur" if elimination else "cholmod")
    timings["mme_setup"] = time.perf_counter() - t0
    least_squares_sd = check_residual_variation(mme.xp, design.fixed_names)
    objective = Objective(mme, reml=reml)
    if design.residual_model is not None and (fixed_variances is not None
                                              or method != "mme" or optimizer == "ai"):
        raise ValueError("a dispformula model is fitted with method='mme' by BOBYQA or "
                         "L-BFGS-B, its variances estimated (not fixed_variances, "
                         "not AI-REML)")
    if fixed_variances is not None:
        theta, sigma = theta_from_variances(design, fixed_variances)
        t0 = time.perf_counter()
        model = LinearMixedModel(design, mme, objective, theta, None, fixed_sigma=sigma)
        timings["results"] = time.perf_counter() - t0
        model.timings.update(timings)
        return model
    if method == "blockdiag":
        design.require_rows("method='blockdiag'")
        search = BlockDiagonalObjective(design, reml=reml, shift=mme.xp.shift)
    else:
        search = objective
    lower = design.parameter_lower_bounds()
    t0 = time.perf_counter()
    if optimizer == "auto":
        has_known = any(t.level_precision is not None for t in design.terms)
        one_coef = all(t.n_coefs == 1 for t in design.terms)
        large = design.n_obs >= settings.lbfgs_min_rows
        # Newton in θ before AI-REML in the variances where both apply: from the
        # moment start InstEval takes 2 states and a last step, AI-REML 3 and one
        if method == "mme" and design.n_obs >= settings.newton_min_rows \
                and newton_applies(design):
            optimizer = "newton"
        elif (has_known or large) and one_coef and reml and method == "mme" \
                and design.residual_model is None:
            optimizer = "ai"
        elif method == "mme" and large:
            optimizer = "lbfgs"
        else:
            optimizer = "bobyqa"
    if optimizer in ("lbfgs", "newton") and method != "mme":
        raise ValueError(f"optimizer={optimizer!r} needs method='mme'")
    if optimizer == "newton" and not newton_applies(design):
        raise ValueError("optimizer='newton' needs random terms without a known level "
                         "covariance and no dispformula; use 'lbfgs' or 'ai'")
    n_params = design.n_theta + design.n_dispersion
    problem = ScaledProblem(objective, np.concatenate(
        [theta_scale(design, mme.xp), np.ones(design.n_dispersion)]), search)
    if start is not None:
        start = np.asarray(start, dtype=float).ravel()
        if start.shape != (n_params,) or not np.all(np.isfinite(start)):
            raise ValueError(f"start must be {n_params} finite values of θ (and γ), got "
                             f"{start}")
    elif optimizer in ("ai", "lbfgs", "newton") and method == "mme" \
            and design.residual_model is None:
        # the Newton-type optimisers gain most from a start near the optimum
        start = moment_start(design, mme.xp)
        if start is None and optimizer == "newton":
            start = vector_moment_start(design, mme.xp)
    # lme4 starts at Λ_t = I; here Λ̃_t = I, the same for intercepts and, for slopes,
    # a start on the scale of the covariate
    scaled_start = problem.to_scaled(start) if start is not None else design.parameter_start()
    if optimizer == "ai":
        result = optimize_ai_reml(objective, problem.to_theta(scaled_start), verbose=verbose)
    else:
        if optimizer == "bobyqa":
            result = optimize_bobyqa(problem.value, scaled_start, lower, verbose=verbose,
                                     settings=settings, upper=upper_bounds(lower, settings))
        elif optimizer == "newton":
            result = optimize_newton(problem, scaled_start, lower, verbose=verbose,
                                     settings=settings, upper=upper_bounds(lower, settings))
        elif optimizer == "lbfgs":
            result = optimize_lbfgs(problem, scaled_start, lower, verbose=verbose,
                                    settings=settings, upper=upper_bounds(lower, settings))
        else:
            result = optimize_scipy(problem.value, scaled_start, lower, method=optimizer,
                                    verbose=verbose, upper=upper_bounds(lower, settings))
        result.theta = problem.to_theta(result.theta)
        result.n_evaluations = problem.n_evaluations
    timings["optimize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_check = None
    if optimizer == "ai":
        ai_result = result
        first_check = lambda scaled: ai_convergence_check(  # noqa: E731
            objective, problem.to_theta(scaled), ai_result)
    elif optimizer == "newton" and getattr(result, "newton_state", None) is not None:
        newton_result = result
        first_check = lambda scaled: (  # noqa: E731
            newton_convergence_check(problem, problem.to_theta(scaled), newton_result)
            or check_convergence(problem, scaled, lower, settings))
    # where the other-minima search is not thorough, lme4's start by Newton steps
    local_search = None
    if method == "mme" and newton_applies(design):
        local_search = lambda scaled: optimize_newton(  # noqa: E731
            problem, scaled, lower, settings=settings, upper=upper_bounds(lower, settings))
    # exploration's loose BOBYQA runs from lme4's start would retrace a BOBYQA fit, not
    # another optimiser's (Nelder-Mead stopped at a boundary point 0.05 units up from
    # where BOBYQA went from the same start)
    result = ensure_convergence(problem, result, lower, settings, first_check=first_check,
                                local_search=local_search,
                                tried_starts=[scaled_start] if optimizer == "bobyqa" else [])
    timings["convergence_check"] = time.perf_counter() - t0
    theta = np.maximum(result.theta, lower)
    t0 = time.perf_counter()
    model = LinearMixedModel(design, mme, objective, theta, result)
    timings["results"] = time.perf_counter() - t0
    # σ → 0 and θ → ∞: either the random effects fit y exactly (the objective unbounded
    # below) or a structure's variances take up the residual variance (it levels off)
    limit = residual_at_limit(problem, problem.to_scaled(theta), lower, settings) \
        if np.isfinite(model.objective) else "unbounded"
    if limit == "unbounded" and np.isfinite(model.objective):
        # still falling at the limit: y fitted exactly (it falls without end), or an SD
        # genuinely above 1e4 σ (a group effect of 1e5 over noise of 1); go on without
        # the limit, with the digits the relative form keeps there
        with np.errstate(divide="ignore", invalid="ignore"):  # an exact fit runs to σ = 0
            beyond = optimize_lbfgs(problem, problem.to_scaled(theta), lower,
                                    settings=settings)
            falls = falls_outward(problem, beyond.theta, lower)
        if np.isfinite(beyond.objective) and falls <= settings.ridge_drop:
            theta = np.maximum(problem.to_theta(beyond.theta), lower)
            check = check_convergence(problem, beyond.theta, lower, settings)
            result = OptimizerResult(theta, beyond.objective, problem.n_evaluations,
                                     check.passed, f"{result.message}; beyond the SD limit: "
                                     f"{beyond.message}", f"{result.method}+beyond",
                                     result.history, check, result.n_evaluations)
            model = LinearMixedModel(design, mme, objective, theta, result)
            limit = "beyond" if np.isfinite(model.objective) else "unbounded"
    if limit == "unbounded" or model.sigma < 1e-7 * least_squares_sd:
        raise DataError(
            "the residual variance is estimated as 0 (σ = "
            f"{model.sigma:.3g}, objective {model.objective:.6g}): the random effects fit "
            "the response exactly, e.g. a response constant within the levels of "
            f"{design.terms[0].group!r}; the likelihood has no maximum")
    if limit == "beyond":
        warnings.warn(
            f"a random-effect SD is more than {settings.theta_limit:g} times σ (σ = "
            f"{model.sigma:.3g}): the objective there keeps fewer digits (~1e-13·(SD/σ)² "
            "relative), and so do the estimates", ConvergenceWarning, stacklevel=2)
    if limit == "levels off":
        model.residual_at_limit = True
        warnings.warn(
            f"the residual variance tends to 0 (σ = {model.sigma:.3g}, at henderson's "
            f"limit of {settings.theta_limit:g} for the random-effect SDs over σ): the "
            "variances of a structured term with one record per level take up the "
            "residual variance, and the likelihood is highest as σ → 0. The objective "
            "is within ~1e-6 (relative) of its limit; the split between σ² and the "
            "term's variances is not identified (glmmTMB fits this with dispformula = ~0)",
            ConvergenceWarning, stacklevel=2)
    model.timings.update(timings)
    return model


def lmm(formula: str, data: pd.DataFrame, reml: bool = True,
        weights: str | np.ndarray | None = None, missing: str = "raise",
        optimizer: str = "auto", ordering: str = "auto",
        verbose: bool | int = False, method: str = "mme",
        relationships: dict | None = None, sparse_fixed: bool | str = "auto",
        fixed_variances: dict | None = None, strategy: str = "auto",
        offset: str | np.ndarray | None = None, dispformula: str | None = None,
        covary: list | None = None, threads: int | None = None):
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
    optimizer : {"auto", "ai", "newton", "bobyqa", "lbfgs", "Powell", "Nelder-Mead", "L-BFGS-B"}
        ``"newton"``: Newton steps in θ with the average information as Hessian,
        REML or ML, any number of coefficients per term, from a moment start (the
        default from 50,000 rows for terms without a known level covariance: 200k
        rows with random slopes, or InstEval, in 2 steps); ``"ai"``:
        average-information REML in the variances (the default for REML models with
        one coefficient per term and a known level covariance); ``"lbfgs"``:
        quasi-Newton on the analytic gradient (the default for the remaining models
        from 50,000 rows, where its ~25 evaluations beat BOBYQA's ~135); ``"bobyqa"``:
        lme4's derivative-free optimiser (the default otherwise); or a bounded scipy
        method with finite differences.
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
    offset : str or array, optional
        A known term of the mean, as lme4's ``offset=``: a column name or one value
        per row (chunked fits: a column name); added to the formula's ``offset(...)``
        terms.
    dispformula : str, optional
        Heterogeneous residual variances, as glmmTMB's ``dispformula``: ``"~ Sex"``
        gives each sex its own residual variance (``log σ²`` linear in the formula's
        columns; ``m.dispersion`` and ``m.residual_variances`` report them). In memory
        only; BOBYQA or L-BFGS-B.
    covary : list of tuples, optional
        Random terms whose effects are correlated, on the same levels:
        ``[("animal", "dam")]`` for direct and maternal genetic effects.

        Breeding models — several traits (``"cbind(y1, y2) ~ ..."``: every fixed
        effect per trait, G0 ⊗ A and an unstructured residual covariance, records
        with some traits missing kept), ``covary``, a pedigree with unknown-parent
        groups, or a random regression (a term with several coefficients) on a
        relationship matrix fitted by REML — are fitted by AI-REML on Henderson's
        equations with general covariance matrices
        (:func:`henderson.breeding_model.fit_breeding_model`) and return a
        :class:`~henderson.breeding_model.BreedingModel`.
    strategy : {"auto", "schur", "cholmod"}
        How C is factored: ``"schur"`` eliminates the largest grouping factor's
        block-diagonal part and factors the small dense rest (crossed designs);
        ``"cholmod"`` a sparse Cholesky of C. ``"auto"`` takes the block elimination
        when the first term has identity covariance, X is small and dense, and the rest
        has at most 3,000 rows.
    threads : int, optional
        The threads the fit may use: BLAS's (NumPy, SciPy, CHOLMOD) and henderson's
        own, never both at once. By default the ``HENDERSON_THREADS`` environment
        variable, else the CPUs this process may use (affinity mask, cgroup quota),
        with one BLAS thread when other work holds the cores
        (:func:`henderson.threads.resolve_threads`). BLAS's previous thread counts
        are restored after the fit. Estimates do not depend on it.

    Returns
    -------
    LinearMixedModel or BreedingModel
        A :class:`~henderson.breeding_model.BreedingModel` for the breeding models
        listed under ``covary`` (multi-trait, covaried, group and, with REML and the
        default optimiser, random-regression-on-a-pedigree models), which has no
        ``save``, ``predict`` or ``anova`` yet.

    Examples
    --------
    >>> import henderson as hd
    >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    >>> round(m.objective, 3)
    1743.628
    >>> m.fixef.round(3).to_dict()
    {'(Intercept)': 251.405, 'Days': 10.467}
    >>> abs(hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"),
    ...            threads=1).objective - m.objective) < 1e-10
    True
    """
    check_options(reml=reml, optimizer=optimizer, ordering=ordering, method=method,
                  strategy=strategy, verbose=verbose, missing=missing, sparse_fixed=sparse_fixed)
    check_threads(threads)
    with fit_threads(threads):
        model = _lmm(formula, data, reml, weights, missing, optimizer, ordering, verbose,
                     method, relationships, sparse_fixed, fixed_variances, strategy,
                     offset, dispformula, covary)
    if hasattr(model, "fit_function"):
        model.call["threads"] = threads
        model.data_name = data_name(data, inspect.currentframe().f_back)
        if model.singular and not model.known_variances:   # estimated, not given
            warnings.warn(SINGULAR_MESSAGE, SingularFitWarning, stacklevel=2)
    return model


def _lmm(formula, data, reml, weights, missing, optimizer, ordering, verbose, method,
         relationships, sparse_fixed, fixed_variances, strategy, offset, dispformula,
         covary):
    if _is_breeding_model(formula, relationships, covary, reml, optimizer):
        from .breeding_model import fit_breeding_model

        if optimizer not in ("auto", "ai") or method != "mme" or strategy != "auto" \
                or ordering != "auto" or sparse_fixed != "auto":
            raise ValueError("multi-trait, maternal, group and random-regression models are "
                             "fitted by AI-REML on their own equations: optimizer, method, "
                             "ordering, strategy and sparse_fixed take their defaults")
        if weights is not None or offset is not None or dispformula is not None:
            raise ValueError("weights, offset and dispformula are not available in "
                             "multi-trait, maternal, group and random-regression models")
        return fit_breeding_model(formula, data, relationships=relationships, covary=covary,
                                  fixed_variances=fixed_variances, reml=reml, missing=missing,
                                  verbose=verbose)
    if covary:
        raise ValueError("covary needs two random terms of the formula")
    t0 = time.perf_counter()
    source = as_chunk_source(data)
    if source is None:
        design = build_design(formula, data, weights=weights, missing=missing,
                              relationships=relationships, sparse_fixed=sparse_fixed,
                              offset=offset, dispformula=dispformula)
        crossproducts = None
    else:
        if dispformula is not None:
                raise DataError("a dispformula model is fitted in memory (its weights change "
                            "the cross-products with the parameters); pass a DataFrame")
        design, crossproducts = chunked_design(
            formula, source, weights=weights, missing=missing, relationships=relationships,
            sparse_fixed=sparse_fixed, verbose=bool(verbose), offset=offset)
    design_seconds = time.perf_counter() - t0
    # after the design, so that a bad formula fails at once, also in the first call
    kernel_seconds = None if _KERNELS_LOADED else load_compiled_kernels()
    t0 += kernel_seconds or 0.0                 # not part of this fit's total
    model = fit_design(design, reml=reml, optimizer=optimizer, ordering=ordering,
                       verbose=verbose, method=method, fixed_variances=fixed_variances,
                       strategy=strategy, crossproducts=crossproducts)
    model.timings["design"] = design_seconds
    model.timings["total"] = time.perf_counter() - t0
    if kernel_seconds is not None:     # the first fit of the process: not in "total"
        model.timings = {"numba_kernel_load": kernel_seconds, **model.timings}
    model.call = dict(formula=formula, data=data, reml=reml, weights=weights,
                      missing=missing, optimizer=optimizer, ordering=ordering,
                      method=method, relationships=relationships,
                      sparse_fixed=sparse_fixed, fixed_variances=fixed_variances,
                      strategy=strategy, offset=offset, dispformula=dispformula)
    model.fit_function = lmm
    return model


def data_name(data, caller=None) -> str | None:
    """What the summary's ``Data:`` line shows: a path as given, else the name the
    caller bound the DataFrame to (lme4 prints the expression), else the name a
    bundled data set carries (``hd.datasets.load`` sets ``attrs["name"]``)."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if caller is not None:
        for name, value in caller.f_locals.items():
            if value is data and not name.startswith("_"):
                return name
    attrs = getattr(data, "attrs", None)
    if isinstance(attrs, dict) and attrs.get("rows") == len(data):   # not a subset of it
        return attrs.get("name")
    return None
