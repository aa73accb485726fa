"""Diagnostic plots (matplotlib is an optional dependency: ``pip install henderson[plot]``).

* :func:`plot_residuals` — residuals against fitted values and a normal QQ plot;
* :func:`plot_ranef` — caterpillar plot of the BLUPs with ±z·(conditional SD) bars.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


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
    """Caterpillar plot: BLUPs sorted, with ``±z`` conditional-SD intervals."""
    plt = _pyplot()
    group = group or next(iter(model.ranef))
    if group not in model.ranef:
        raise ValueError(f"plot_ranef: {group!r} is not a grouping factor of the model; "
                         f"choose from {', '.join(map(repr, model.ranef))}")
    values, sds = model.ranef[group], model.ranef_sd[group]
    z = stats.norm.ppf(0.5 + level / 2)
    k = values.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k + 1, 0.22 * len(values) + 1.2),
                             squeeze=False)
    order = np.argsort(values.iloc[:, 0].to_numpy())
    labels = values.index.astype(str)[order]
    for c, ax in enumerate(axes[0]):
        v, s = values.iloc[order, c].to_numpy(), sds.iloc[order, c].to_numpy()
        ax.errorbar(v, np.arange(len(v)), xerr=z * s, fmt="o", ms=3, capsize=2)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(np.arange(len(v)))
        ax.set_yticklabels(labels if c == 0 else [])
        ax.set_title(values.columns[c])
    fig.suptitle(f"{group}: BLUPs ± {z:.2f} conditional SD")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
