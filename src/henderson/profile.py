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

from .bootstrap import parameter_vector, variance_parameters
from .mme import MixedModelEquations
from .objective import Objective
from .optimize import ScaledProblem, optimize_bobyqa, refit_upper_bounds, theta_scale


def _theta_from_flat(design, values, sigma):
    """θ from the variance parameters of :func:`~henderson.bootstrap.variance_parameters`
    (without σ); None outside the parameter space."""
    theta, position = [], 0
    for term in design.terms:
        count = len(term.structure.flat_parameters(term.structure.start(), 1.0))
        part = term.structure.theta_from_flat(values[position:position + count], sigma)
        if part is None:
            return None
        theta.append(part)
        position += count
    return np.concatenate(theta)


def profile_confint(model, level: float = 0.95) -> pd.DataFrame:
    """Profile-likelihood intervals for lme4's parameters (the terms' SDs and
    correlations, σ, β)."""
    from scipy import optimize, stats

    if model.design.residual_model is not None:
        raise ValueError("profile intervals of a dispformula model are not available; "
                         "use confint(method='wald')")
    ml = model.refit(reml=False) if model.reml else model
    objective = Objective(ml.mme, reml=False)
    estimates = parameter_vector(ml)
    layout = variance_parameters(ml.design, ml.theta, ml.sigma)  # ..., σ last
    n_var = len(layout) - 1
    base = ml.objective
    z = stats.norm.ppf(0.5 + level / 2)

    def deviance_var(params):  # params: the terms' parameters, then σ
        sigma = params[-1]
        if sigma <= 0:
            return np.inf
        theta = _theta_from_flat(ml.design, params[:-1], sigma)
        if theta is None:
            return np.inf
        evaluation = objective.evaluate(theta, fixed_inverse=False)
        return objective.at_sigma(evaluation, sigma ** 2)

    start_var = estimates.to_numpy()[:n_var + 1]
    lower_var = np.array([0.0 if kind == "sd" else -1.0 for _, kind, _ in layout])

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
    scale = theta_scale(design, ml.mme.xp)
    lower = design.theta_lower_bounds()

    def zeta_fixed(j, x):
        # the model with X_j β_j = X_j x as an offset, θ (and so σ, β) refitted by ML
        keep = [c for c in range(design.n_fixed) if c != j]
        reduced = dataclasses.replace(design, X=design.X[:, keep], y=y - design.X[:, j] * x,
                                      fixed_names=[design.fixed_names[c] for c in keep])
        problem = ScaledProblem(Objective(MixedModelEquations(reduced), reml=False), scale)
        result = optimize_bobyqa(problem.value, problem.to_scaled(ml.theta), lower,
                                 upper=refit_upper_bounds(lower, scale * ml.theta))
        return np.sign(x - ml.fixef.iloc[j]) * np.sqrt(max(result.objective - base, 0.0))

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
    for w, (name, kind, value) in enumerate(layout):
        bounds = (-1.0 + 1e-9, 1.0 - 1e-9) if kind == "cor" else (0.0, np.inf)
        step = 0.1 if kind == "cor" else max(0.1 * value, 1e-3)
        rows[name] = interval(lambda x, w=w: zeta_var(w, x), value, step, *bounds)
    for j, name in enumerate(design.fixed_names):
        rows[name] = interval(lambda x, j=j: zeta_fixed(j, x), ml.fixef.iloc[j], se[j])
    alpha = (1 - level) / 2
    frame = pd.DataFrame(rows, index=[f"{100 * alpha:.1f} %", f"{100 * (1 - alpha):.1f} %"]).T
    return frame.loc[estimates.index]
