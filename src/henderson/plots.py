"""Diagnostic plots (matplotlib is an optional dependency: ``pip install henderson[plot]``).

* :func:`plot_residuals` — residuals against fitted values and a normal QQ plot;
* :func:`plot_ranef` — caterpillar plot of the BLUPs with ±z·(conditional SD) bars;
* :func:`manhattan` and :func:`qq` — a GWAS scan's p-values by position and against the
  uniform.
"""
from __future__ import annotations

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    return plt


def plot_residuals(model, path=None):
    """Residuals vs fitted values and a normal QQ plot; returns the figure."""
    from scipy import stats

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    fitted, residuals = model.fitted.to_numpy(), model.residuals.to_numpy()
    axes[0].scatter(fitted, residuals, s=8, alpha=0.7)
    axes[0].axhline(0, color="grey", lw=1)
    axes[0].set(xlabel="fitted", ylabel="residual", title="Residuals vs fitted")
    theoretical = stats.norm.ppf((np.arange(1, len(residuals) + 1) - 0.5) / len(residuals))
    axes[1].scatter(theoretical, np.sort(residuals) / model.sigma, s=8, alpha=0.7)
    axes[1].plot(theoretical, theoretical, color="grey", lw=1)
    axes[1].set(xlabel="normal quantile", ylabel="residual / σ", title="Normal QQ")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_ranef(model, group: str | None = None, level: float = 0.95, path=None):
    """Caterpillar plots: every grouping factor's BLUPs sorted, with ``±z``
    conditional-SD intervals (lme4's ``dotplot(ranef(m, condVar = TRUE))``), one row of
    panels per grouping factor (one column per coefficient); ``group`` draws one.

    Examples
    --------
    >>> import henderson as hd
    >>> m = hd.lmm("diameter ~ 1 + (1 | plate) + (1 | sample)", hd.datasets.load("penicillin"))
    >>> fig = m.plot_ranef()
    >>> [ax.get_title() for ax in fig.axes]
    ['plate: (Intercept)', 'sample: (Intercept)']
    """
    from scipy import stats

    plt = _pyplot()
    if group is not None and group not in model.ranef:
        raise ValueError(f"plot_ranef: {group!r} is not a grouping factor of the model; "
                         f"choose from {', '.join(map(repr, model.ranef))}")
    groups = [group] if group is not None else list(model.ranef)
    z = stats.norm.ppf(0.5 + level / 2)
    width = max(model.ranef[g].shape[1] for g in groups)
    # a row per level up to 60 levels; a factor with more gets a fixed height and no
    # level labels (InstEval's 2,972 students made a figure 900 inches tall)
    heights = [min(0.22 * len(model.ranef[g]), 0.22 * 60) + 0.9 for g in groups]
    fig, axes = plt.subplots(len(groups), width, squeeze=False,
                             figsize=(3.2 * width + 1, sum(heights) + 0.4),
                             gridspec_kw={"height_ratios": heights})
    for row, name in enumerate(groups):
        values, sds = model.ranef[name], model.ranef_sd[name]
        order = np.argsort(values.iloc[:, 0].to_numpy())
        labels = values.index.astype(str)[order]
        for c, ax in enumerate(axes[row]):
            if c >= values.shape[1]:
                ax.set_visible(False)
                continue
            v, s = values.iloc[order, c].to_numpy(), sds.iloc[order, c].to_numpy()
            ax.errorbar(v, np.arange(len(v)), xerr=z * s, fmt="o", ms=3, capsize=2)
            ax.axvline(0, color="grey", lw=1)
            if len(v) <= 60:
                ax.set_yticks(np.arange(len(v)))
                ax.set_yticklabels(labels if c == 0 else [], fontsize=7 if len(v) > 40 else None)
            else:
                ax.set_yticks([])
                ax.set_ylabel(f"{len(v):,} levels, sorted" if c == 0 else "")
            ax.set_title(f"{name}: {values.columns[c]}")
    fig.suptitle(f"BLUPs ± {z:.2f} conditional SD")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _neg_log10_p(scan):
    """−log10 p, from the statistic where p underflows to 0."""
    from scipy import stats

    p = scan["pvalue"].to_numpy(dtype=float)
    values = -np.log10(np.where(p > 0, p, np.nan))
    if (p == 0).any():
        stat = scan["stat"].to_numpy(dtype=float)
        values = np.where(p == 0, -stats.chi2.logsf(stat, 1) / np.log(10), values)
    return values


def manhattan(scan, threshold: float = 5e-8, path=None, title: str | None = None):
    """Manhattan plot of a :func:`henderson.gwas` result: −log10 p by position,
    chromosomes side by side in alternating colours, a line at ``threshold``.

    Returns the figure (saved to ``path`` when given).
    """
    plt = _pyplot()
    frame = scan.assign(neglog10p=_neg_log10_p(scan)).dropna(subset=["neglog10p"])
    chromosomes = list(dict.fromkeys(frame["chrom"].astype(str)))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    offset, ticks = 0.0, []
    for i, chromosome in enumerate(chromosomes):
        part = frame[frame["chrom"].astype(str) == chromosome]
        position = part["pos"].to_numpy(dtype=float)
        x = offset + position - position.min()
        ax.scatter(x, part["neglog10p"], s=4, color=("#1f4e79", "#7aa6c2")[i % 2],
                   rasterized=True)
        ticks.append(offset + (x.max() - offset) / 2 if len(x) else offset)
        offset = (x.max() if len(x) else offset) + max(np.ptp(position) * 0.02, 1.0)
    if threshold:
        ax.axhline(-np.log10(threshold), color="#c0392b", lw=1, ls="--")
    ax.set_xticks(ticks, chromosomes)
    ax.set(xlabel="chromosome", ylabel=r"$-\log_{10} p$", title=title or "")
    ax.margins(x=0.01)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def qq(scan, path=None, title: str | None = None):
    """QQ plot of a scan's p-values against the uniform, with the genomic inflation
    factor λ (median χ² / 0.455) in the title. Returns the figure."""
    from scipy import stats

    plt = _pyplot()
    observed = np.sort(_neg_log10_p(scan)[np.isfinite(_neg_log10_p(scan))])[::-1]
    n = len(observed)
    expected = -np.log10((np.arange(1, n + 1) - 0.5) / n)
    p = scan["pvalue"].dropna().to_numpy(dtype=float)
    inflation = float(np.median(stats.chi2.isf(np.clip(p, 1e-300, 1), 1)) / stats.chi2.ppf(0.5, 1))
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.scatter(expected, observed, s=5, color="#1f4e79", rasterized=True)
    top = max(expected.max(initial=1), 1)
    ax.plot([0, top], [0, top], color="grey", lw=1)
    ax.set(xlabel=r"expected $-\log_{10} p$", ylabel=r"observed $-\log_{10} p$",
           title=title or f"λ = {inflation:.3f}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
