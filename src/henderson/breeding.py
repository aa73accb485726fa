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
    """BLUPs of a one-coefficient term with PEV and reliability: index animal; columns
    trait (the response), ebv, pev, reliability and inbreeding (when known), the layout
    of multi-trait models (:meth:`BreedingModel.breeding_values`).

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
    frame = pd.DataFrame({"trait": model.design.response_name, "ebv": ebv, "pev": pev},
                         index=model.ranef[group].index)
    with np.errstate(divide="ignore", invalid="ignore"):
        # PEV ≤ the prior variance: a reliability outside [0, 1] is rounding
        frame["reliability"] = np.clip(1.0 - pev / (diag * variance), 0.0, 1.0)
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

def heritability(model, group=None) -> tuple[float, float]:
    """``h² = σ²_group / (Σ σ²_t + σ²_e)`` and its SE (delta method on AI⁻¹).

    ``group`` may be a list of terms, e.g. ``["id.1", "id.2"]`` for the heritability of
    several relationship matrices on one factor together (their variances summed).
    """
    vc = variance_components(model)
    if group is None:
        known = [t.group for t in model.design.terms if t.level_precision is not None]
        group = (known or [model.design.terms[0].group])[0]
    chosen = [group] if isinstance(group, str) else list(group)
    values = vc["variance"].to_numpy()
    groups = [name for name in vc.index if name != "Residual"]
    absent = [g for g in chosen if g not in groups]
    if absent or not chosen:
        raise ValueError(f"heritability: {', '.join(map(repr, absent)) or 'nothing'} is not a "
                         f"random term; choose from {', '.join(map(repr, groups))}")
    index = [list(vc.index).index(g) for g in chosen]
    total = values.sum()
    h2 = values[index].sum() / total
    gradient = -values[index].sum() / total ** 2 * np.ones(len(values))
    gradient[index] += 1.0 / total
    covariance = variance_covariance(model)
    se = float(np.sqrt(gradient @ covariance @ gradient)) if covariance is not None else np.nan
    return float(h2), se


#: above this the normalised polynomials reach 1e15 at the ends and say nothing new
MAX_LEGENDRE_ORDER = 30


def legendre(x, order: int, lower: float | None = None, upper: float | None = None,
             prefix: str = "leg") -> pd.DataFrame:
    """Normalised Legendre covariables for random regression models.

    ``φ_j(x) = √((2j + 1)/2) P_j(t)`` with ``t = 2 (x − lower)/(upper − lower) − 1``
    (Kirkpatrick et al. 1990; Mrode 2014, section 9.2), for ``j = 0 … order``.

    Parameters
    ----------
    x : array-like or pandas.Series
        The time scale (days in milk, age).
    order : int
        The highest degree: columns ``leg0 … leg{order}``.
    lower, upper : float, optional
        The ends of the scale (default: the smallest and largest x). Values outside
        raise a ValueError: the polynomials are not meant to extrapolate.
    prefix : str
        Column name prefix.

    Returns
    -------
    pandas.DataFrame
        One column per degree, on the index of ``x`` when it is a Series.

    Examples
    --------
    >>> legendre([4, 157, 310], order=2).round(4).values.tolist()
    [[0.7071, -1.2247, 1.5811], [0.7071, 0.0, -0.7906], [0.7071, 1.2247, 1.5811]]
    """
    if (isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 0
            or order > MAX_LEGENDRE_ORDER):
        raise ValueError(f"legendre: order must be a whole number from 0 to "
                         f"{MAX_LEGENDRE_ORDER}, got {order!r}")
    index = x.index if isinstance(x, pd.Series) else None
    try:
        values = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("legendre: x must be numeric") from None
    if values.ndim != 1:
        raise ValueError(f"legendre: x must be one-dimensional (one value per record), got "
                         f"shape {values.shape}")
    for name, bound in (("lower", lower), ("upper", upper)):
        if bound is not None:
            try:
                if not np.isfinite(float(bound)):
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"legendre: {name} must be a finite number, got {bound!r}") \
                    from None
    if len(values) == 0 or not np.all(np.isfinite(values)):
        raise ValueError("legendre: x must be non-empty and finite (no NaN)")
    lower = float(values.min()) if lower is None else float(lower)
    upper = float(values.max()) if upper is None else float(upper)
    if not upper > lower:
        raise ValueError(f"legendre: needs upper > lower, got lower={lower}, upper={upper}")
    if values.min() < lower or values.max() > upper:
        raise ValueError(f"legendre: x runs from {values.min()} to {values.max()}, outside "
                         f"[{lower}, {upper}]")
    with np.errstate(over="ignore", invalid="ignore"):
        t = 2.0 * (values - lower) / (upper - lower) - 1.0
    if not np.all(np.isfinite(t)):
        raise ValueError("legendre: the scale overflows (x, lower, upper beyond 1e300)")
    t = np.clip(t, -1.0, 1.0)
    columns = {}
    for j in range(int(order) + 1):
        unit = np.zeros(j + 1)
        unit[j] = 1.0
        columns[f"{prefix}{j}"] = np.sqrt((2 * j + 1) / 2.0) * np.polynomial.legendre.legval(t, unit)
    return pd.DataFrame(columns, index=index)
