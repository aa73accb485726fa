"""Simulation from a fitted model and the parametric bootstrap.

A bootstrap replicate only changes y: the cross-products that involve y (``Z'Wy``,
``X'Wy``, ``y'Wy``) are recomputed in one pass over the rows, while the pattern of C,
its symbolic factorisation (or block-elimination plan) and every other cross-product
are reused; each replicate then costs only the optimiser's numeric evaluations.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd

from . import kernels
from .objective import Objective
from .optimize import ScaledProblem, optimize_bobyqa, refit_upper_bounds, theta_scale
from .report import group_names


def simulate(model, n: int = 1, seed=None) -> np.ndarray:
    """Responses simulated from the fitted model: ``X β̂ + Z b* + e*`` with
    ``b* ~ N(0, G)``, ``e* ~ N(0, σ² W⁻¹)``; shape (n_obs, n).

    Examples
    --------
    >>> import henderson as hd
    >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    >>> m.simulate(3, seed=1).shape
    (180, 3)
    """
    design = model.design
    if any(t.level_precision is not None for t in design.terms):
        raise ValueError("simulate() supports terms with identity level covariance")
    rng = np.random.default_rng(seed)
    mean = np.asarray(design.X @ model.fixef.to_numpy()).ravel()
    if design.offset is not None:  # the response the formula names: offset included
        mean = mean + design.offset
    out = np.empty((design.n_obs, n))
    for r in range(n):
        y = mean + model.sigma * rng.normal(size=design.n_obs) / np.sqrt(design.weights)
        for term, lam in zip(design.terms, model.relative_factors):
            b = model.sigma * rng.normal(size=(term.n_levels, term.n_coefs)) @ lam.T
            y += np.einsum("ik,ik->i", term.z, b[term.level_codes])
        out[:, r] = y
    return out


def _with_response(mme, y: np.ndarray, private: bool = False):
    """A shallow copy of the equations for a new response: the pattern of C and the
    symbolic factorisation are shared; with ``private=True`` the numeric workspace
    (C's values and the numeric factor) is the copy's own, so that copies can be
    refitted in parallel threads."""
    if mme.design.offset is not None:  # simulate() gives the response with its offset
        y = y - mme.design.offset
    design = dataclasses.replace(mme.design, y=y)
    w = design.weights
    y = y - np.asarray(design.X @ mme.xp.shift).ravel()  # the fit's shifted response
    zy = [kernels.grouped_crossprod(t.level_codes, np.ascontiguousarray(t.z),
                                    y[:, None].copy(), w, t.n_levels)[:, :, 0]
          for t in design.terms]
    xy = np.asarray(design.X.T @ (w * y)).ravel()
    xp = dataclasses.replace(mme.xp, zy=zy, xy=xy, yy=float(np.dot(w * y, y)))
    clone = mme.with_private_workspace() if private else copy.copy(mme)
    clone.design, clone.xp = design, xp
    return clone


def parameter_vector(model) -> pd.Series:
    """lme4's ``confint`` parameters: each term's structure's parameters (SDs and
    correlations, lme4's names for ``us``), σ, then β."""
    return _parameters(model.design, model.theta, model.sigma, model.fixef.to_numpy())


def variance_parameters(design, theta: np.ndarray, sigma: float):
    """(name, kind, value) of every variance parameter (``flat_parameters`` of each
    term's structure, named ``<parameter>|<term>``), then σ."""
    out = []
    for name, term, sl in zip(group_names(design), design.terms, design.theta_slices()):
        out += [(f"{label}|{name}", kind, value)
                for label, kind, value in term.structure.flat_parameters(theta[sl], sigma)]
    return out + [("sigma", "sd", float(sigma))]


def _parameters(design, theta, sigma, beta) -> pd.Series:
    rows = variance_parameters(design, theta, sigma)
    return pd.Series([v for _, _, v in rows] + list(beta),
                     index=[n for n, _, _ in rows] + list(design.fixed_names))


def bootstrap(model, n: int = 200, seed=None, n_jobs: int = 1) -> pd.DataFrame:
    """Parametric bootstrap: ``n`` refits to responses simulated from the model.

    Replicates run in ``n_jobs`` threads; each thread refits on a private copy of C's
    values and numeric factor, sharing the pattern, the symbolic analysis and the
    cross-products that do not involve y. Results do not depend on ``n_jobs``. On the
    2-core CI machine threads did not pay (InstEval, 4 replicates: 12.5 s with one,
    14.1 s with two: LAPACK already uses both cores and the optimiser loop holds the
    GIL), hence the default of one. ``n_jobs`` is capped by the thread count of
    :func:`henderson.threads.active_threads` (``HENDERSON_THREADS``, else the CPUs
    this process may use; ``None``: that count); while several
    replicates run, BLAS runs one thread and each replicate's block elimination one.

    Returns a DataFrame (replicates x parameters, as :func:`parameter_vector`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from .threads import active_threads, fit_threads

    if model.design.residual_model is not None:
        raise ValueError("the parametric bootstrap of a dispformula model is not "
                         "available; use confint(method='wald')")
    responses = simulate(model, n, seed)
    lower = model.design.theta_lower_bounds()
    scale = theta_scale(model.design, model.mme.xp)
    allowed = active_threads()
    n_jobs = max(1, min(n, n_jobs or allowed, allowed))  # n_jobs=None: all allowed

    def refit(columns):
        with fit_threads(1, blas=1) if n_jobs > 1 else fit_threads():
            return _refit(columns)

    def _refit(columns):
        rows = []
        for r in columns:
            mme = _with_response(model.mme, responses[:, r], private=True)
            objective = Objective(mme, reml=model.reml)
            problem = ScaledProblem(objective, scale)
            result = optimize_bobyqa(problem.value, problem.to_scaled(model.theta), lower,
                                     tolerance=1e-8,
                                     upper=refit_upper_bounds(lower, scale * model.theta))
            theta = np.maximum(problem.to_theta(result.theta), lower)
            evaluation = objective.evaluate(theta, fixed_inverse=False)
            beta = evaluation.solution[mme.n_random:] + mme.xp.shift
            rows.append((r, _parameters(mme.design, theta, objective.sigma(evaluation), beta)))
        return rows

    chunks = [list(range(j, n, n_jobs)) for j in range(n_jobs)]
    if n_jobs == 1:
        results = refit(chunks[0])
    else:  # our threads, so one BLAS thread each (restored afterwards)
        with fit_threads(n_jobs, blas=1), ThreadPoolExecutor(n_jobs) as pool:
            results = [row for part in pool.map(refit, chunks) for row in part]
    results.sort(key=lambda item: item[0])
    return pd.DataFrame([row for _, row in results]).reset_index(drop=True)
