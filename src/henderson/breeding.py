"""Breeding values and variance components of fitted models: EBVs with PEVs and
reliabilities, variance components with their SEs from the average information,
heritabilities. Functions over a fitted model's public accessors (``ranef``,
``prediction_error_variances``, ``relative_factors``, ``objective_function``,
``cache``); the model's methods of the same names call them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .aireml import AverageInformation
from .report import group_names


def breeding_values(model, group: str | None = None) -> pd.DataFrame:
    """BLUPs of a one-coefficient term with PEV and reliability.

    ``reliability = 1 − PEV / (K_ii σ²_t)``, with ``K_ii = 1 + F_i`` for a pedigree
    (``1 − PEV/σ²_t`` for non-inbred animals); inbreeding is listed when known.

    Parameters
    ----------
    group : str, optional
        Grouping factor (default: the first term with a known level covariance).
    """
    terms = model.design.terms
    if group is None:
        known = [t for t in terms if t.level_precision is not None]
        group = (known or terms)[0].group
    index = [i for i, t in enumerate(terms) if t.group == group and t.n_coefs == 1]
    if not index:
        choices = sorted({t.group for t in terms if t.n_coefs == 1})
        raise ValueError(f"breeding_values: {group!r} is not the grouping factor of a "
                         "one-coefficient random term; choose from "
                         f"{', '.join(map(repr, choices)) or 'none'}")
    t = index[0]
    term = terms[t]
    variance = model.sigma ** 2 * model.theta[model.design.theta_slices()[t]][0] ** 2
    ebv = model.ranef[group].iloc[:, 0].to_numpy()
    pev = model.prediction_error_variances[group].iloc[:, 0].to_numpy()
    diag = term.level_variance if term.level_variance is not None else np.ones(term.n_levels)
    frame = pd.DataFrame({"ebv": ebv, "pev": pev}, index=model.ranef[group].index)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["reliability"] = 1.0 - pev / (diag * variance)
    if term.level_variance is not None:
        frame["inbreeding"] = diag - 1.0
    return frame

def variance_components(model) -> pd.DataFrame:
    """Variances with standard errors from the average-information matrix (AI-REML
    fits of one-coefficient terms); NaN SEs otherwise."""
    names = [n for n in group_names(model.design)] + ["Residual"]
    values = np.append([model.sigma ** 2 * lam[0, 0] ** 2 for lam in model.relative_factors]
                       if all(t.n_coefs == 1 for t in model.design.terms) else
                       [np.nan] * len(model.design.terms), model.sigma ** 2)
    se = np.full(len(values), np.nan)
    covariance = variance_covariance(model)
    if covariance is not None:
        se = np.sqrt(np.diag(covariance))
    return pd.DataFrame({"variance": values, "std_error": se}, index=names)

def variance_covariance(model) -> np.ndarray | None:
    """AI⁻¹ over the variances off the boundary (0 rows/columns for those at 0)."""
    ai = getattr(model.optimizer_result, "average_information", None)
    phi = getattr(model.optimizer_result, "variance_components", None)
    if ai is None:
        state = average_information(model)
        if state is None:
            return None
        ai, phi = state.ai, state.phi
    free = phi > 0
    covariance = np.zeros_like(ai)
    covariance[np.ix_(free, free)] = np.linalg.inv(ai[np.ix_(free, free)])
    return covariance

def average_information(model):
    """The AI state at the estimates (REML fits of one-coefficient terms; None
    otherwise), computed once on first use."""
    if "average_information" not in model.cache:
        state = None
        if (model.reml and model.optimizer_result is not None
                and model.design.residual_model is None
                and all(t.n_coefs == 1 for t in model.design.terms)):
            state = AverageInformation(model.objective_function).at(model.theta)
        model.cache["average_information"] = state
    return model.cache["average_information"]

def heritability(model, group: str | None = None) -> tuple[float, float]:
    """``h² = σ²_group / (Σ σ²_t + σ²_e)`` and its SE (delta method on AI⁻¹)."""
    vc = variance_components(model)
    if group is None:
        known = [t.group for t in model.design.terms if t.level_precision is not None]
        group = (known or [model.design.terms[0].group])[0]
    values = vc["variance"].to_numpy()
    groups = [name for name in vc.index if name != "Residual"]
    if group not in groups:
        raise ValueError(f"heritability: {group!r} is not a random term; choose from "
                         f"{', '.join(map(repr, groups))}")
    i = list(vc.index).index(group)
    total = values.sum()
    h2 = values[i] / total
    gradient = -values[i] / total ** 2 * np.ones(len(values))
    gradient[i] += 1.0 / total
    covariance = variance_covariance(model)
    se = float(np.sqrt(gradient @ covariance @ gradient)) if covariance is not None else np.nan
    return float(h2), se
