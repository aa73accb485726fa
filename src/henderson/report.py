"""What fitted and saved models print and share: lme4's names of the terms, the
VarCorr table, ``summary()`` and ``print(m)`` as lme4 prints them (R's number formatting
from :mod:`henderson.rprint`), BLUP contributions to predictions, and per-term tables
that also answer to the term as the formula wrote it.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from .design import Design, level_labels
from .errors import FormulaError
from .rprint import (SIGNIF_LEGEND, abbreviate, coefficient_lines, format_numbers,
                     matrix_lines, named_vector_lines, round_half_even, zapsmall)


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
    names, coefs, others, values, sds = zip(*rows)
    return pd.DataFrame({"grp": list(names),   # var1/var2: None (R's NA) in every model
                         "var1": pd.Series(coefs, dtype=object),
                         "var2": pd.Series(others, dtype=object),
                         "vcov": np.array(values, dtype=float),
                         "sdcor": np.array(sds, dtype=float)})


class StatsmodelsNames:
    """statsmodels' names for the fixed-effect results, shared by fitted and saved
    models (both have ``fixef``, ``vcov`` and ``loglik``)."""

    @property
    def params(self) -> pd.Series:
        """The fixed effects (statsmodels' ``params``; its MixedLM appends the variance
        parameters there, henderson keeps those in ``varcorr``, ``theta`` and
        ``covariance_parameter_table``, so ``params`` lines up with ``bse``)."""
        return self.fixef

    @property
    def fe_params(self) -> pd.Series:
        """The fixed effects (statsmodels' ``fe_params``)."""
        return self.fixef

    @property
    def bse(self) -> pd.Series:
        """Standard errors of the fixed effects (statsmodels' ``bse``).

        Examples
        --------
        >>> import henderson as hd
        >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
        >>> m.bse.round(3).to_dict()
        {'(Intercept)': 6.825, 'Days': 1.546}
        """
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.fixef.index,
                         name="bse")

    @property
    def tvalues(self) -> pd.Series:
        """Estimate / SE of every fixed effect (statsmodels' ``tvalues``)."""
        return (self.fixef / self.bse).rename("tvalues")

    @property
    def llf(self) -> float:
        """The log-likelihood, restricted under REML: ``loglik`` (statsmodels' name)."""
        return self.loglik


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


class Summary:
    """What ``summary()`` returns: prints as lme4's (and lmerTest's) ``summary()``,
    shows as HTML tables in a notebook, and keeps its tables as DataFrames.

    ``str(s)`` / ``print(s)`` / ``repr(s)`` give the text; ``s.as_text()`` and
    ``s.as_html()`` the two renderings (statsmodels' names); ``s.tables`` the numbers
    behind them (``"random_effects"``, ``"fixed_effects"``, ``"residuals"``,
    ``"correlation"`` when shown).

    Examples
    --------
    >>> import henderson as hd
    >>> s = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy")).summary()
    >>> print(str(s).splitlines()[4])
    REML criterion at convergence: 1743.6
    >>> sorted(s.tables)
    ['correlation', 'fixed_effects', 'random_effects', 'residuals']
    >>> s._repr_html_().count("<table>")
    2
    """

    def __init__(self, blocks: list, tables: dict):
        self.blocks = blocks          # ("text", [lines]) or ("table", lines, html)
        self.tables = tables

    def as_text(self) -> str:
        lines: list[str] = []
        for block in self.blocks:
            lines.extend(block[1])
        return "\n".join(lines)

    def as_html(self) -> str:
        parts = []
        for block in self.blocks:
            if block[0] == "table":
                parts.append(block[2])
            elif block[1]:
                parts.append("<pre style=\"margin:0\">" + _escape("\n".join(block[1]))
                             + "</pre>")
        return "<div class=\"henderson-summary\">" + "".join(parts) + "</div>"

    def __str__(self) -> str:
        return self.as_text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.as_html()

    def __contains__(self, text: str) -> bool:
        return text in self.as_text()

    def splitlines(self) -> list[str]:
        return self.as_text().splitlines()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _html_table(row_names, col_names, cells, caption: str = "", text_columns=(),
                note: str = "") -> str:
    """An HTML table of formatted cells: numbers right-aligned in monospace, the
    ``text_columns`` (names, groups) left-aligned; no row-name column when
    ``row_names`` is None; ``note`` (the significance legend) under the table."""
    def cell(j, value):
        align = "left" if j in text_columns else "right"
        return (f"<td style=\"text-align:{align};font-family:monospace\">"
                f"{_escape(value.strip())}</td>")
    names = [] if row_names is None else [""]
    head = "".join(f"<th>{_escape(c)}</th>" for c in names + list(col_names))
    rows = []
    for i, row in enumerate(cells):
        label = "" if row_names is None else (
            "<th style=\"text-align:left\">" + _escape(row_names[i]) + "</th>")
        rows.append("<tr>" + label + "".join(cell(j, v) for j, v in enumerate(row)) + "</tr>")
    title = f"<caption style=\"text-align:left\">{_escape(caption)}</caption>" if caption else ""
    foot = f"<p style=\"font-size:smaller\">{_escape(note)}</p>" if note else ""
    return (f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
            f"</table>{foot}")


def method_title(reml: bool, tests: str | None) -> list[str]:
    """lme4's first line (wrapped at 80 columns as ``.prt.methTit`` does)."""
    title = f"Linear mixed model fit by {'REML' if reml else 'maximum likelihood'}"
    if tests:
        title += f". t-tests use {tests}"
    if len(title) + 5 + len("henderson") > 80:
        return textwrap.wrap(title + " ['henderson']", width=78, subsequent_indent="  ")
    return [f"{title} ['henderson']"]


def call_lines(formula: str, data_name: str | None, weights: str | None = None,
               offset: str | None = None) -> list[str]:
    """``Formula:``, ``Data:``, ``Weights:``, ``Offset:`` lines (lme4's ``.prt.call``)."""
    lines = [f"Formula: {formula}"]
    if data_name:
        lines.append(f"   Data: {data_name}")
    if weights:
        lines.append(f"Weights: {weights}")
    if offset:
        lines.append(f" Offset: {offset}")
    return lines


def criterion_lines(reml: bool, objective: float, aic: float, bic: float, loglik: float,
                    df_resid: int, places: int) -> list[str]:
    """``REML criterion at convergence: ...`` or the AIC/BIC/logLik/deviance/df.resid
    table (lme4's ``.prt.aictab``), rounded to ``places`` (1 in summary, 4 in print)."""
    if reml:
        value = format_numbers([round_half_even([objective], places)[0]], 7)[0].strip()
        return [f"REML criterion at convergence: {value}"]
    rounded = round_half_even([aic, bic, loglik, objective, df_resid], places)
    texts = format_numbers(rounded, 7)
    texts[-1] = format_numbers([rounded[-1]], 7)[0]
    return named_vector_lines(texts, ["AIC", "BIC", "logLik", "deviance", "df.resid"])


def varcorr_lines(names, coef_names, covariances, sigma, residuals=None,
                  digits: int = 4, variance: bool = True):
    """lme4's ``formatVC`` + ``print``: the Random effects table (Variance and
    Std.Dev. columns formatted together over all terms, correlations to 2 places).
    Returns the lines and the cells (for HTML)."""
    sds, variances, groups, coefs, corr_rows = [], [], [], [], []
    maxlen = max([len(c) for c in coef_names] + [1])
    for name, cnames, cov in zip(names, coef_names, covariances):
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        for a, coef in enumerate(cnames):
            groups.append(name if a == 0 else "")
            coefs.append(coef)
            sds.append(sd[a])
            variances.append(cov[a, a])
        if maxlen > 1:
            k = len(cnames)
            denom = np.outer(sd, sd)
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = np.where(denom > 0, cov / np.where(denom > 0, denom, 1), np.nan)
            np.fill_diagonal(corr, 1.0)
            texts = np.array(format_numbers(round_half_even(corr, 2).ravel(), 7, nsmall=2),
                             dtype=object).reshape(k, k)
            for a in range(k):
                corr_rows.append([texts[a, b] if b < a else "" for b in range(maxlen - 1)])
    residual_labels = list(residuals) if residuals else [""]
    residual_vars = list(residuals.values()) if residuals else [sigma ** 2]
    for i, (label, var) in enumerate(zip(residual_labels, residual_vars)):
        groups.append("Residual" if i == 0 else "")
        coefs.append(label)
        sds.append(np.sqrt(var))
        variances.append(var)
        if maxlen > 1:
            corr_rows.append([""] * (maxlen - 1))
    columns = ["Groups", "Name"] + (["Variance"] if variance else []) + ["Std.Dev."]
    cells = [list(row) for row in zip(groups, coefs)]
    if variance:
        for row, text in zip(cells, format_numbers(variances, digits)):
            row.append(text)
    for row, text in zip(cells, format_numbers(sds, digits)):
        row.append(text)
    if maxlen > 1:
        columns += ["Corr"] + [""] * (maxlen - 2)
        for row, extra in zip(cells, corr_rows):
            row.extend(extra)
    lines = ["Random effects:"] + matrix_lines(cells, [""] * len(cells), columns, right=False)
    return lines, columns, cells


def design_groups(design) -> list[tuple[str, int]]:
    """(grouping factor, number of levels), once each, in the order of the terms."""
    return list(dict.fromkeys((t.group, t.n_levels) for t in design.terms))


def groups_line(nobs: int, groups) -> str:
    """lme4's ``Number of obs: n, groups:  g, k; ...`` line."""
    return (f"Number of obs: {nobs}, groups:  "
            + "; ".join(f"{g}, {n}" for g, n in groups))


#: lme4 1.1-31's ``getOption("lme4.summary.cor.max")``
CORRELATION_MAX = 12


def correlation_lines(vcov: pd.DataFrame, show: bool | None = None
                      ) -> tuple[list[str], pd.DataFrame | None]:
    """``Correlation of Fixed Effects:`` as lme4 prints it: by default for 2 to 12
    coefficients, and for more a note that it is not shown (lme4's message)."""
    p = vcov.shape[0]
    if show is None:
        show = p <= CORRELATION_MAX
        if not show:
            return (["", f"Correlation matrix not shown by default, as p = {p} > "
                     f"{CORRELATION_MAX}.", "Use m.summary(correlation=True) or m.vcov if "
                     "you need it"], None)
    if not show or p < 2:
        return [], None
    v = vcov.to_numpy()
    sd = np.sqrt(np.diag(v))
    corr = v / np.outer(sd, sd)
    names = list(vcov.index)
    texts = np.array(format_numbers(round_half_even(corr, 3).ravel(), 7, nsmall=3),
                     dtype=object).reshape(p, p)
    rows = abbreviate(names, 11)[1:]
    cols = abbreviate(names, 6)[:-1]
    cells = [[texts[i, j] if j < i else "" for j in range(p - 1)] for i in range(1, p)]
    lines = ["", "Correlation of Fixed Effects:"] + matrix_lines(cells, rows, cols, right=False)
    return lines, pd.DataFrame(corr, index=names, columns=names)


def fixed_effects_print_lines(fixef: pd.Series, digits: int = 4) -> list[str]:
    """``Fixed Effects:`` of lme4's ``print(m)``: the estimates under their names."""
    if len(fixef) == 0:
        return ["No fixed effect coefficients"]
    return ["Fixed Effects:"] + named_vector_lines(
        format_numbers(fixef.to_numpy(), digits), list(fixef.index), gap=2)


def _data_name(model) -> str | None:
    return getattr(model, "data_name", None)


def _weights_name(model) -> str | None:
    """The ``Weights:`` line: the column's name, as lme4 prints the expression."""
    if not model.design.weighted:
        return None
    given = getattr(model, "call", {}).get("weights")
    return given if isinstance(given, str) else "given as an array"


def _scaled_residual_lines(model) -> tuple[list[str], pd.Series | None]:
    if not model.design.has_rows:
        return [], None
    residuals = model.residuals.to_numpy() / np.sqrt(model.R.diagonal())
    q = zapsmall(np.quantile(residuals, [0, 0.25, 0.5, 0.75, 1]), 5)
    names = ["Min", "1Q", "Median", "3Q", "Max"]
    return (["Scaled residuals: "] + named_vector_lines(format_numbers(q, 4), names) + [""],
            pd.Series(q, index=names))


def summary_text(model, timings: bool = False, ddf: str = "Satterthwaite",
                 correlation: bool | None = None) -> Summary:
    """The fit as lme4's ``summary()`` prints it (with lmerTest's df and p): what
    :meth:`~henderson.results.LinearMixedModel.summary` returns."""
    if ddf not in ("Satterthwaite", "Kenward-Roger", "KR"):
        raise ValueError(f"ddf must be 'Satterthwaite' or 'Kenward-Roger', got {ddf!r}")
    design = model.design
    cheap = (not model.known_variances and design.n_fixed <= 50
             and design.n_random <= 100_000)
    if ddf in ("Kenward-Roger", "KR"):
        tests, table = "Kenward-Roger's method", model.coefficients(ddf="Kenward-Roger")
    elif model.known_variances:
        tests, table = None, model.coef_table
    elif cheap:
        tests, table = "Satterthwaite's method", model.coef_table
    else:
        tests, table = None, model.coefficient_table()
    head = method_title(model.reml, tests)
    head += call_lines(design.formula.text, _data_name(model), weights=_weights_name(model))
    head += [""] + criterion_lines(model.reml, model.objective, model.aic, model.bic,
                                   model.loglik, model.nobs - model.npar, 1) + [""]
    blocks: list = [("text", head)]
    tables: dict = {}
    residual_lines, quantiles = _scaled_residual_lines(model)
    if quantiles is not None:
        blocks.append(("text", residual_lines))
        tables["residuals"] = quantiles
    re_lines, columns, cells = varcorr_lines(
        group_names(design), [t.coef_names for t in design.terms],
        list(model.covariance_matrices().values()), model.sigma, model.residual_groups())
    blocks.append(("table", re_lines, _html_table(None, columns, cells, "Random effects",
                                                   text_columns=(0, 1))))
    tables["random_effects"] = model.varcorr
    more = structure_lines(model.covariance_parameters)
    if design.residual_model is not None:
        more.append(dispersion_line(design.residual_model.formula, model.dispersion))
    more.append(groups_line(model.nobs, design_groups(design)))
    blocks.append(("text", more))
    if len(table):
        fixed = coefficient_lines(table.to_numpy(), list(table.index), list(table.columns))
        html = _html_table(list(table.index), list(table.columns) + [""],
                           _coefficient_cells(fixed, table), "Fixed effects",
                           note=SIGNIF_LEGEND if SIGNIF_LEGEND in fixed else "")
        blocks.append(("table", ["", "Fixed effects:"] + fixed, html))
        tables["fixed_effects"] = table
        corr_lines, corr = correlation_lines(model.vcov, correlation)
        blocks.append(("text", corr_lines))
        if corr is not None:
            tables["correlation"] = corr
    notes = []
    if design.dropped_fixed:
        notes.append("fixed-effect columns dropped (rank deficient): "
                     + ", ".join(design.dropped_fixed))
    if model.singular:
        notes.append(SINGULAR_MESSAGE)
    if not model.converged:
        notes.append(f"optimizer did not converge: {model.optimizer_result.message}")
    if timings:
        how = ("block elimination of the largest factor (dense Schur complement)"
               if model.mme.ordering == "schur" else
               f"CHOLMOD, {model.mme.ordering} ordering")
        method = model.optimizer_result.method if model.optimizer_result else "none (known variances)"
        result = model.optimizer_result
        search = getattr(result, "optimizer_evaluations", None) if result else None
        if search is None or search >= model.n_evaluations:
            counts = f"{model.n_evaluations} ({method})"
        else:
            counts = (f"{search} ({method}) + {model.n_evaluations - search} in the "
                      "convergence check")
        notes += ["", f"Evaluations: {counts}; factorisation: {how}",
                  "Timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in model.timings.items())]
    if notes:
        blocks.append(("text", [""] + notes if notes[0] else notes))
    return Summary(blocks, tables)


def _coefficient_cells(lines: list[str], table: pd.DataFrame) -> list[list[str]]:
    """The formatted cells of printCoefmat's lines (for the HTML table)."""
    width = max(len(str(r)) for r in table.index)
    header = lines[0]
    bounds, end = [], width
    for name in list(table.columns):
        end = header.index(name, end) + len(name)
        bounds.append(end)
    cells = []
    for line in lines[1:1 + len(table)]:
        start, row = width, []
        for stop in bounds:
            row.append(line[start:stop])
            start = stop
        row.append(line[start:].strip())
        cells.append(row)
    return cells


#: what summary() and the fit-time warning say about a fit on the boundary
SINGULAR_MESSAGE = "boundary (singular) fit: see help(hd.LinearMixedModel.singular)"


def print_text(model) -> str:
    """``repr(m)``: lme4's ``print(m)`` — the criterion, random-effect SDs and the
    fixed-effect estimates, without tests."""
    design = model.design
    lines = method_title(model.reml, None)
    lines += call_lines(design.formula.text, _data_name(model), weights=_weights_name(model))
    lines += criterion_lines(model.reml, model.objective, model.aic, model.bic,
                             model.loglik, model.nobs - model.npar, 4)
    lines += varcorr_lines(
        group_names(design), [t.coef_names for t in design.terms],
        list(model.covariance_matrices().values()), model.sigma, model.residual_groups(),
        variance=False)[0]
    lines.append(groups_line(model.nobs, design_groups(design)))
    lines += fixed_effects_print_lines(model.fixef)
    if model.singular:
        lines.append(SINGULAR_MESSAGE)
    return "\n".join(lines)
