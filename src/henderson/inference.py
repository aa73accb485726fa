"""Inference on fitted models (features on top of the core). So far: likelihood-ratio
tests between nested models, as lme4's ``anova()``."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def anova(*models, refit: bool = True) -> pd.DataFrame:
    """Likelihood-ratio tests between nested models, as lme4's ``anova(m0, m1, ...)``.

    REML fits are refitted by maximum likelihood first (``refit=True``, lme4's
    default), since REML criteria of models with different fixed effects are not
    comparable. Models are ordered by their number of parameters.

    Returns
    -------
    DataFrame with ``npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq)``.

    Examples
    --------
    >>> import henderson as hd
    >>> d = hd.datasets.load("sleepstudy")
    >>> m0 = hd.lmm("Reaction ~ Days + (1 | Subject)", d)
    >>> m1 = hd.lmm("Reaction ~ Days + (Days | Subject)", d)
    >>> round(float(hd.anova(m0, m1)["Chisq"].iloc[1]), 3)
    42.139
    """
    if len(models) < 2:
        raise ValueError("anova needs at least two models")
    nobs = {m.nobs for m in models}
    if len(nobs) > 1:
        raise ValueError(f"models were fitted to different numbers of rows: {sorted(nobs)}")
    fitted = [m.refit(reml=False) if (refit and m.reml) else m for m in models]
    order = np.argsort([m.npar for m in fitted], kind="stable")
    fitted = [fitted[i] for i in order]
    names = [f"model{i}" for i in order]
    rows = []
    for i, m in enumerate(fitted):
        row = {"npar": m.npar, "AIC": m.aic, "BIC": m.bic, "logLik": m.loglik,
               "deviance": m.objective, "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan}
        if i > 0:
            previous = fitted[i - 1]
            chisq = max(previous.objective - m.objective, 0.0)
            df = m.npar - previous.npar
            row.update({"Chisq": chisq, "Df": df,
                        "Pr(>Chisq)": float(stats.chi2.sf(chisq, df)) if df > 0 else np.nan})
        rows.append(row)
    return pd.DataFrame(rows, index=names)
