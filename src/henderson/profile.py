"""Profile-likelihood confidence intervals, as lme4's ``confint(method="profile")``.

As lme4, profiles are taken on the ML deviance (a REML fit is refitted by ML first):
for an SD, a correlation or σ, the deviance is minimised over the other variance
parameters with the profiled one held fixed; for a fixed effect β_j, the model is
refitted with ``X_j β_j`` as an offset. ``ζ = sign(x − x̂)·sqrt(dev(x) − dev(x̂))`` and
the interval ends are where ``ζ = ±z_{1−α/2}``, found by root finding (lme4
interpolates a spline through profile points).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .bootstrap import parameter_vector


def _variance_layout(model):
    """(term index, kind, a, b) for each SD / correlation in lme4's order."""
    layout = []
    for t, term in enumerate(model.design.terms):
        for a in range(term.n_coefs):
            layout.append((t, "sd", a, a))
            for b in range(a + 1, term.n_coefs):
                layout.append((t, "cor", b, a))
    return layout


def _theta_from_sdcor(model, values, sigma):
    """θ (lme4's order) from SDs and correlations; None outside the parameter space."""
    theta = []
    position = 0
    for term in model.design.terms:
        k = term.n_coefs
        sd = np.zeros(k)
        corr = np.eye(k)
        for a in range(k):
            sd[a] = values[position]
            position += 1
            for b in range(a + 1, k):
                corr[b, a] = corr[a, b] = values[position]
                position += 1
        if np.any(sd < 0) or np.any(np.abs(corr[np.tril_indices(k, -1)]) >= 1):
            return None
        cov = np.outer(sd, sd) * corr / sigma ** 2
        try:
            lam = np.linalg.cholesky(cov + 1e-300 * np.eye(k)) if np.all(sd > 0) else \
                np.diag(sd / sigma)
        except np.linalg.LinAlgError:
            return None
        rows, cols = np.tril_indices(k)
        order = np.lexsort((rows, cols))
        theta.extend(lam[rows[order], cols[order]])
    return np.array(theta)


def profile_confint(model, level: float = 0.95) -> pd.DataFrame:
    """Profile-likelihood intervals for lme4's parameters (SDs, correlations, σ, β)."""
    from .fit import fit_design
    from .optimize import optimize_bobyqa
    from .objective import Objective

    ml = model.refit(reml=False) if model.reml else model
    objective = Objective(ml.mme, reml=False)
    estimates = parameter_vector(ml)
    layout = _variance_layout(ml)
    n_var = len(layout)
    base = ml.objective
    z = stats.norm.ppf(0.5 + level / 2)

    def deviance_var(params):  # params: SDs/cors then σ
        sigma = params[-1]
        if sigma <= 0:
            return np.inf
        theta = _theta_from_sdcor(ml, params[:-1], sigma)
        if theta is None:
            return np.inf
        evaluation = objective.evaluate(theta, fixed_inverse=False)
        return objective.at_sigma(evaluation, sigma ** 2)

    start_var = estimates.to_numpy()[:n_var + 1]
    lower_var = np.array([0.0 if kind == "sd" else -1.0 for _, kind, _, _ in layout] + [0.0])

    def zeta_var(w, x):
        free = [i for i in range(n_var + 1) if i != w]

        def reduced(v):
            params = start_var.copy()
            params[free] = v
            params[w] = x
            return deviance_var(params)

        if free:
            result = optimize_bobyqa(reduced, start_var[free], lower_var[free], tolerance=1e-10)
            value = result.objective
        else:
            value = reduced(np.zeros(0))
        return np.sign(x - start_var[w]) * np.sqrt(max(value - base, 0.0))

    design = ml.design
    y = design.y

    def zeta_fixed(j, x):
        keep = [c for c in range(design.n_fixed) if c != j]
        reduced = dataclasses.replace(design, X=design.X[:, keep], y=y - design.X[:, j] * x,
                                      fixed_names=[design.fixed_names[c] for c in keep])
        fit = fit_design(reduced, reml=False, optimizer="bobyqa", start=ml.theta,
                         strategy="cholmod")
        return np.sign(x - ml.fixef.iloc[j]) * np.sqrt(max(fit.objective - base, 0.0))

    def interval(zeta, estimate, scale, low_bound=-np.inf, high_bound=np.inf):
        ends = []
        for side in (-1, 1):
            step = scale
            inner, outer = estimate, estimate + side * step
            while abs(zeta(outer)) < z and step < 1e6 * scale:
                if (side < 0 and outer <= low_bound) or (side > 0 and outer >= high_bound):
                    break
                inner, step = outer, step * 2
                outer = estimate + side * step
            outer = min(max(outer, low_bound), high_bound)
            if abs(zeta(outer)) < z:
                ends.append(np.nan if not np.isfinite(outer) else outer)
                continue
            ends.append(optimize.brentq(lambda x: zeta(x) - side * z, min(inner, outer),
                                        max(inner, outer), xtol=1e-10 * max(1, abs(estimate))))
        return ends

    rows = {}
    se = np.sqrt(np.diag(ml.vcov.to_numpy()))
    for w, name in enumerate(estimates.index[:n_var + 1]):
        kind = "cor" if name.startswith("cor_") else "sd"
        bounds = (-1.0 + 1e-9, 1.0 - 1e-9) if kind == "cor" else (0.0, np.inf)
        scale = 0.1 if kind == "cor" else max(0.1 * estimates.iloc[w], 1e-3)
        rows[name] = interval(lambda x, w=w: zeta_var(w, x), estimates.iloc[w], scale, *bounds)
    for j, name in enumerate(design.fixed_names):
        rows[name] = interval(lambda x, j=j: zeta_fixed(j, x), ml.fixef.iloc[j], se[j])
    alpha = (1 - level) / 2
    frame = pd.DataFrame(rows, index=[f"{100 * alpha:.1f} %", f"{100 * (1 - alpha):.1f} %"]).T
    return frame.loc[estimates.index]
