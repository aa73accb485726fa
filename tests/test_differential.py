"""Differential test of the whole fit: random small designs (crossed, nested, slopes,
``||``, weights, variances on the boundary), every optimiser on each, against the
lowest objective any of them found and against a dense NumPy REML/ML on
V = Z Λ Λ' Z' + W⁻¹ computed here from the raw arrays, not from the package's matrices.

A fit that reports ``converged=True`` must be at that lowest objective; the objective it
reports must be the dense one at its θ. ``-m slow`` runs many more examples."""
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import covariance_from_parameters

import henderson as hd

FORMULAS = [
    "y ~ x + (1 | g)",
    "y ~ x + (x | g)",
    "y ~ x + (x || g)",
    "y ~ x + (1 | g) + (1 | h)",
    "y ~ x + (1 | g/h)",
    "y ~ x + (x | g) + (1 | h)",
    "y ~ x + (0 + x | h) + (1 | g)",
    "y ~ 1 + (1 | g) + (1 | g:h)",
    "y ~ x + cs(0 + f | g)",
    "y ~ x + ar1(0 + f | g)",
    "y ~ x + diag(1 + x | g)",
    "y ~ x + toep(0 + f | g) + (1 | h)",
]

EXAMPLES = 400 if os.environ.get("HENDERSON_DIFFERENTIAL") == "many" else 60


def dense_criterion(model, reml: bool) -> float:
    """−2 log (restricted) likelihood with σ² profiled, from V_rel = Z Σ Z'/σ² + W⁻¹,
    each term's Σ_t written out from its reported structure parameters."""
    design = model.design
    X = np.asarray(design.X, dtype=float)
    y = np.asarray(design.y, dtype=float)
    w = np.asarray(design.weights, dtype=float)
    n, p = X.shape
    columns = []
    for name, term in zip(model.covariance_parameters, design.terms):
        params = model.covariance_parameters[name]
        sigma_t = covariance_from_parameters(params["structure"], term.n_coefs, params)
        eigen, vectors = np.linalg.eigh(sigma_t / model.sigma ** 2)
        lam = vectors * np.sqrt(np.maximum(eigen, 0.0))  # any square root of Σ_t/σ²
        z_lambda = term.z @ lam  # n x k: row i's covariates times Λ_t
        block = np.zeros((n, term.n_levels * term.n_coefs))
        for a in range(term.n_coefs):
            block[np.arange(n), term.level_codes * term.n_coefs + a] = z_lambda[:, a]
        columns.append(block)
    ZL = np.hstack(columns)
    V = ZL @ ZL.T + np.diag(1.0 / w)
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    # y less a least-squares fit of X: the same residuals r = y - Xβ̂ (any Xβ₀ is
    # absorbed by β̂), without y ≈ 1e6 cancelling against Xβ̂ in r (1e-5 relative
    # lost where σ is 1e-5)
    y = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    rss = float(r @ Vi @ r)
    dof = n - p if reml else n
    value = np.linalg.slogdet(V)[1] + dof * (1 + np.log(2 * np.pi * rss / dof))
    if reml:
        value += np.linalg.slogdet(XtViX)[1]
    return float(value)


@st.composite
def designs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    formula = draw(st.sampled_from(FORMULAS))
    n_g = draw(st.integers(3, 9))
    n_h = draw(st.integers(2, 6))
    per = draw(st.integers(3, 8))
    n = n_g * per
    g = rng.integers(0, n_g, n)
    g[:n_g] = np.arange(n_g)  # every level present
    h = rng.integers(0, n_h, n)
    h[:n_h] = np.arange(n_h)
    x = rng.normal(size=n) * draw(st.sampled_from([1.0, 0.01, 100.0]))
    # group effects of either size, including none at all (boundary fits)
    sd_g = draw(st.sampled_from([0.0, 0.3, 1.5]))
    sd_h = draw(st.sampled_from([0.0, 0.5]))
    sd_slope = draw(st.sampled_from([0.0, 0.4]))
    xs = x / max(np.std(x), 1e-12)
    y = (1.0 + 0.5 * xs + sd_g * rng.normal(size=n_g)[g] + sd_h * rng.normal(size=n_h)[h]
         + sd_slope * rng.normal(size=n_g)[g] * xs + rng.normal(size=n))
    y = y * draw(st.sampled_from([1.0, 1e-3, 1e4])) + draw(st.sampled_from([0.0, 1e6]))
    f = rng.integers(0, 3, n)
    f[:3] = np.arange(3)
    frame = pd.DataFrame({"g": [f"g{v}" for v in g], "h": [f"h{v}" for v in h], "x": x, "y": y,
                          "f": pd.Categorical([f"f{v}" for v in f])})
    weights = rng.uniform(0.5, 2.0, n) if draw(st.booleans()) else None
    reml = draw(st.booleans())
    return formula, frame, weights, reml


def fit_all(formula, frame, weights, reml):
    optimizers = ["bobyqa", "lbfgs", "newton", "Nelder-Mead"]
    one_coefficient = "x |" not in formula and "x||" not in formula.replace(" ", "") \
        and "x ||" not in formula and "f |" not in formula
    if reml and one_coefficient:
        optimizers.append("ai")
    fits = {}
    for optimizer in optimizers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[optimizer] = hd.lmm(formula, frame, weights=weights, reml=reml,
                                     optimizer=optimizer)
    return fits


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(designs())
def test_every_optimizer_reaches_the_lowest_objective_and_the_dense_value(case):
    formula, frame, weights, reml = case
    try:
        fits = fit_all(formula, frame, weights, reml)
    except hd.DataError:
        return  # e.g. as many random effects as rows: refused, as lme4 refuses it
    best = min(m.objective for m in fits.values())
    scale = max(1.0, abs(best))
    for name, m in fits.items():
        dense = dense_criterion(m, reml)
        # y = 1e6 + noise of 1e-3 holds its residuals to ~1e-10 (the ulp of 1e6): with
        # σ ~ 1e-4 that is ~1e-6 of the objective in any double-precision computation
        # (40-digit arithmetic on the same data agreed with neither to 1e-8)
        data_digits = 10 * len(frame) * np.finfo(float).eps * np.max(np.abs(frame.y)) / m.sigma
        assert m.objective == pytest.approx(dense, rel=1e-8, abs=1e-8 + data_digits), name
        if m.converged:
            assert m.objective <= best + 1e-6 * scale, (name, m.objective, best)
    # the fits that report convergence include the best one
    assert any(m.converged and m.objective <= best + 1e-6 * scale for m in fits.values())
