"""What fitted and saved models print and share: lme4's names of the terms, the
VarCorr table, the "Random effects:" lines of ``summary()``, BLUP contributions to
predictions, and per-term tables that also answer to the term as the formula wrote it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .design import Design, level_labels
from .errors import FormulaError


def group_names(design: Design) -> list[str]:
    """lme4's names for terms in VarCorr: a repeated group gets ``.1``, ``.2``..."""
    seen: dict[str, int] = {}
    names = []
    for term in design.terms:
        count = seen.get(term.group, 0)
        names.append(term.group if count == 0 else f"{term.group}.{count}")
        seen[term.group] = count + 1
    return names


def check_newdata(newdata: pd.DataFrame, needed) -> None:
    """A :class:`FormulaError` naming the columns prediction needs and newdata lacks."""
    absent = sorted(c for c in needed if c not in newdata.columns)
    if absent:
        raise FormulaError(f"newdata lacks column(s) {', '.join(map(repr, absent))}")


def blup_contribution(newdata: pd.DataFrame, factors, levels: pd.Index, z: np.ndarray,
                      b: np.ndarray) -> np.ndarray:
    """``z_i · b[level_i]`` for every row of newdata; 0 for a level not seen in the
    fit (the population prediction, as lme4's ``allow.new.levels=TRUE``)."""
    codes = pd.Index(levels.astype(str)).get_indexer(level_labels(newdata, factors))
    out = np.zeros(len(newdata))
    seen = codes >= 0
    out[seen] = np.einsum("ik,ik->i", z[seen], b[codes[seen]])
    return out


def varcorr_table(names: list[str], coef_names: list[list[str]],
                  covariances: list[np.ndarray], sigma: float,
                  residuals: dict | None = None) -> pd.DataFrame:
    """lme4's ``as.data.frame(VarCorr(m))``: variances and SDs, then covariances and
    correlations, term by term, and the residual (one row per group of a residual
    model, ``residuals``: label -> variance, as glmmTMB's)."""
    rows = []
    for name, coefs, cov in zip(names, coef_names, covariances):
        sd = np.sqrt(np.diag(cov))
        rows += [(name, coef, None, cov[a, a], sd[a]) for a, coef in enumerate(coefs)]
        for a in range(len(coefs)):
            for b in range(a + 1, len(coefs)):
                denom = sd[a] * sd[b]
                corr = cov[b, a] / denom if denom > 0 else np.nan
                rows.append((name, coefs[a], coefs[b], cov[b, a], corr))
    if residuals:
        rows += [("Residual", label, None, variance, np.sqrt(variance))
                 for label, variance in residuals.items()]
    else:
        rows.append(("Residual", None, None, sigma ** 2, sigma))
    return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])


def random_effects_lines(names: list[str], coef_names: list[list[str]],
                         covariances: list[np.ndarray], sigma: float,
                         residuals: dict | None = None) -> list[str]:
    """The "Random effects:" table of ``summary()``, as lme4 prints it."""
    lines = ["Random effects:"]
    header = f" {'Groups':<12} {'Name':<14} {'Variance':>10} {'Std.Dev.':>10}"
    if any(len(c) > 1 for c in coef_names):
        header += " Corr"
    lines.append(header)
    for name, coefs, cov in zip(names, coef_names, covariances):
        sd = np.sqrt(np.diag(cov))
        for a, coef in enumerate(coefs):
            group = name if a == 0 else ""
            line = f" {group:<12} {coef:<14} {cov[a, a]:10.4g} {sd[a]:10.4g}"
            if a > 0:
                corr = [cov[a, b] / (sd[a] * sd[b]) if sd[a] * sd[b] > 0 else np.nan
                        for b in range(a)]
                line += " " + " ".join(f"{c:5.2f}" for c in corr)
            lines.append(line)
    if residuals:
        for i, (label, variance) in enumerate(residuals.items()):
            lines.append(f" {'Residual' if i == 0 else '':<12} {label:<14} {variance:10.4g} "
                         f"{np.sqrt(variance):10.4g}")
    else:
        lines.append(f" {'Residual':<12} {'':<14} {sigma ** 2:10.4g} {sigma:10.4g}")
    return lines


def _normal_term(text: str) -> str:
    return "".join(text.split())


class TermTable(dict):
    """Per-term results by VarCorr name (``"subj"``, ``"g.1"``); a term may also be
    looked up as the formula wrote it (``"ar1(0 + timef | subj)"``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases: dict[str, str] = {}

    def __missing__(self, key):
        name = self.aliases.get(_normal_term(str(key)))
        if name is None:
            raise KeyError(f"{key!r}: no such term; the terms are "
                           f"{', '.join(map(repr, self))}")
        return self[name]

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or _normal_term(str(key)) in self.aliases

    def get(self, key, default=None):
        return self[key] if key in self else default


def structure_lines(covariance_parameters: dict) -> list[str]:
    """One line per structured (not ``us``) term of ``summary()``: its SDs and ρ."""
    lines = []
    for name, p in covariance_parameters.items():
        if p["structure"] == "us":
            continue
        rho = p.get("rho")
        rho_text = "" if rho is None else (
            f", rho {rho:.4g}" if np.isscalar(rho) else
            ", rho by lag " + " ".join(f"{r:.3g}" for r in rho))
        lines.append(f" {name}: {p['structure']}, sd "
                     + " ".join(f"{v:.4g}" for v in np.atleast_1d(p["sd"])) + rho_text)
    return lines


def dispersion_line(formula: str, dispersion: pd.Series) -> str:
    """The ``summary()`` line of a dispformula's coefficients."""
    return (f" Dispersion model {formula}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in dispersion.items()) + " (log variance)")


def summary_text(model, timings: bool = False, ddf: str = "Satterthwaite") -> str:
    """The fit as lme4's ``summary()`` prints it (with lmerTest's df and p): what
    :meth:`~henderson.results.LinearMixedModel.summary` returns."""
    if ddf not in ("Satterthwaite", "Kenward-Roger", "KR"):
        raise ValueError(f"ddf must be 'Satterthwaite' or 'Kenward-Roger', got {ddf!r}")
    lines = [
        f"Linear mixed model fit by {'REML' if model.reml else 'maximum likelihood'} "
        "['henderson']",
        f"Formula: {model.design.formula.text}",
    ]
    if model.design.weighted:
        lines.append("Prior weights: yes")
    label = "REML criterion at convergence" if model.reml else "deviance"
    lines.append("")
    lines.append(f"{'AIC':>10} {'BIC':>10} {'logLik':>10} {label if not model.reml else 'REML crit':>10}")
    lines.append(f"{model.aic:10.1f} {model.bic:10.1f} {model.loglik:10.1f} {model.objective:10.1f}")
    lines.append("")
    lines.extend(random_effects_lines(
        group_names(model.design), [t.coef_names for t in model.design.terms],
        list(model.covariance_matrices().values()), model.sigma, model.residual_groups()))
    lines.extend(structure_lines(model.covariance_parameters))
    if model.design.residual_model is not None:
        lines.append(dispersion_line(model.design.residual_model.formula, model.dispersion))
    groups = dict.fromkeys((t.group, t.n_levels) for t in model.design.terms)
    lines.append(f"Number of obs: {model.nobs}, groups:  "
                 + "; ".join(f"{g}, {n}" for g, n in groups))
    lines.append("")
    cheap = (not model.known_variances and model.design.n_fixed <= 50
             and model.design.n_random <= 100_000)
    if ddf in ("Kenward-Roger", "KR"):
        lines.append("Fixed effects (Kenward-Roger df and adjusted SEs, as pbkrtest):")
        table = model.coefficients(ddf="Kenward-Roger")
    elif cheap:
        lines.append("Fixed effects (Satterthwaite df, as lmerTest):")
        table = model.coef_table
    else:
        lines.append("Fixed effects:")
        table = model.coefficient_table()
    lines.append(table.to_string(float_format=lambda v: f"{v:.4g}"))
    if model.design.dropped_fixed:
        lines.append("fixed-effect columns dropped (rank deficient): "
                     + ", ".join(model.design.dropped_fixed))
    if model.singular:
        lines.append("")
        lines.append("boundary (singular) fit: a variance is estimated as 0 (see theta)")
    if not model.converged:
        lines.append(f"optimizer did not converge: {model.optimizer_result.message}")
    if timings:
        lines.append("")
        how = ("block elimination of the largest factor (dense Schur complement)"
               if model.mme.ordering == "schur" else
               f"CHOLMOD, {model.mme.ordering} ordering")
        method = model.optimizer_result.method if model.optimizer_result else "none (known variances)"
        lines.append(f"Evaluations: {model.n_evaluations} ({method}); factorisation: {how}")
        lines.append("Timings (s): " + ", ".join(
            f"{k} {v:.3f}" for k, v in model.timings.items()))
    return "\n".join(lines)
