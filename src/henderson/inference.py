"""Inference on fitted models (features on top of the core). So far: likelihood-ratio
tests between nested models, as lme4's ``anova()``."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .bootstrap import variance_parameters
from .design import _model_matrix, r_factor_columns, spec_variables


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
    from scipy import stats

    if len(models) < 2:
        raise ValueError("anova needs at least two models")
    if not isinstance(refit, (bool, np.bool_)):
        raise TypeError(f"refit must be True or False, got {refit!r}")
    for i, m in enumerate(models):
        if not (hasattr(m, "design") and hasattr(m, "refit") and hasattr(m, "objective")):
            raise TypeError(f"anova: argument {i + 1} is a {type(m).__name__}, not a model "
                            "fitted by hd.lmm()")
    nobs = {m.nobs for m in models}
    if len(nobs) > 1:
        raise ValueError(f"models were fitted to different numbers of rows: {sorted(nobs)}")
    _check_same_response(models)
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
            difference = previous.objective - m.objective
            df = m.npar - previous.npar
            if difference < -1e-6 * max(1.0, abs(m.objective)):
                # a model with more parameters that fits worse does not contain the
                # smaller one (lme4 prints χ² = 0 and p = 1 without a word)
                more = "more" if df > 0 else "as many"
                warnings.warn(
                    f"{names[i]} has {more} parameters than {names[i - 1]} but a deviance "
                    f"{-difference:.4g} higher: the models are not nested (or a fit "
                    "stopped short), and the χ² test does not apply", UserWarning,
                    stacklevel=2)
            chisq = max(difference, 0.0)
            row.update({"Chisq": chisq, "Df": df,
                        "Pr(>Chisq)": float(stats.chi2.sf(chisq, df)) if df > 0 else np.nan})
        rows.append(row)
    return pd.DataFrame(rows, index=names)


def _check_same_response(models) -> None:
    """Likelihoods of different responses (or of the same name on other rows) are not
    comparable: a ValueError instead of a χ² of 0."""
    first = models[0]
    for i, m in enumerate(models[1:], start=2):
        if m.design.response_name != first.design.response_name:
            raise ValueError(f"anova: model {i} has response {m.design.response_name!r}, "
                             f"model 1 {first.design.response_name!r}; likelihoods of "
                             "different responses cannot be compared")
        if m.design.has_rows and first.design.has_rows and not np.array_equal(
                m.response.to_numpy(), first.response.to_numpy()):
            raise ValueError(f"anova: models 1 and {i} were fitted to different values of "
                             f"{first.design.response_name!r} (other rows or data)")


def _varpar_functions(model):
    """The REML/ML deviance and vcov(β̂) as functions of ``varpar = (θ, σ)``."""
    objective_stage = model.objective_function

    def deviance(varpar):
        evaluation = objective_stage.evaluate(varpar[:-1], fixed_inverse=False)
        return objective_stage.at_sigma(evaluation, varpar[-1] ** 2)

    def vcov(varpar):
        evaluation = objective_stage.evaluate(varpar[:-1], fixed_inverse=True)
        return varpar[-1] ** 2 * evaluation.fixed_inverse

    return deviance, vcov


def _hessian(func, x, step):
    n = len(x)
    hessian = np.empty((n, n))
    f0 = func(x)
    for i in range(n):
        ei = np.zeros(n)
        ei[i] = step[i]
        hessian[i, i] = (func(x + ei) - 2 * f0 + func(x - ei)) / step[i] ** 2
        for j in range(i):
            ej = np.zeros(n)
            ej[j] = step[j]
            value = (func(x + ei + ej) - func(x + ei - ej) - func(x - ei + ej)
                     + func(x - ei - ej)) / (4 * step[i] * step[j])
            hessian[i, j] = hessian[j, i] = value
    return hessian


def _satterthwaite_pieces(model):
    """``V = vcov(β̂)``, its Jacobian in ``varpar = (θ, σ)`` and ``A = 2 H⁻¹`` (cached)."""
    cached = model.cache.get("satterthwaite")
    if cached is not None:
        return cached
    deviance, vcov = _varpar_functions(model)
    varpar = np.append(model.theta, model.sigma)
    # steps well above the objective's rounding (~1e-12 relative), then one Richardson
    # extrapolation (as numDeriv, which lmerTest uses) to cancel the O(h²) error
    step = 1e-3 * np.maximum(np.abs(varpar), 0.1)
    hessian = (4 * _hessian(deviance, varpar, step / 2) - _hessian(deviance, varpar, step)) / 3
    try:
        A = 2.0 * np.linalg.inv(hessian)
    except np.linalg.LinAlgError:
        A = 2.0 * np.linalg.pinv(hessian)
    V = vcov(varpar)
    jacobian = []
    for i in range(len(varpar)):
        e = np.zeros(len(varpar))
        e[i] = step[i]
        coarse = (vcov(varpar + e) - vcov(varpar - e)) / (2 * step[i])
        fine = (vcov(varpar + e / 2) - vcov(varpar - e / 2)) / step[i]
        jacobian.append((4 * fine - coarse) / 3)
    model.objective_function.evaluate(model.theta)  # leave the factor at the optimum
    model.cache["satterthwaite"] = (V, np.array(jacobian), A)
    return model.cache["satterthwaite"]


def covariance_parameter_table(model) -> pd.DataFrame:
    """Each term's covariance parameters (its structure's SDs and correlations, lme4's
    names for ``us``) and σ, with standard errors from the deviance's curvature:
    ``Cov(θ, σ) = 2 H⁻¹`` (the Hessian lmerTest's Satterthwaite df use), carried to the
    reported parameters by the delta method. A parameter at its bound (a variance of
    0) has no SE (NaN); with known variances there is none either.

    Returns
    -------
    DataFrame indexed by parameter (``sd_(Intercept)|Subject``, ``rho|subj``,
    ``sigma``) with ``estimate`` and ``std_error``.
    """
    rows = variance_parameters(model.design, model.theta, model.sigma)
    names = [name for name, _, _ in rows]
    estimate = np.array([value for _, _, value in rows])
    se = np.full(len(rows), np.nan)
    if not model.known_variances:
        _, _, A = _satterthwaite_pieces(model)
        varpar = np.append(model.theta, model.sigma)
        step = 1e-4 * np.maximum(np.abs(varpar), 0.1)
        lower = np.append(model.design.theta_lower_bounds(), 0.0)

        def flat(v):
            return np.array([value for _, _, value in
                             variance_parameters(model.design, v[:-1], v[-1])])

        jacobian = np.empty((len(rows), len(varpar)))
        for i in range(len(varpar)):
            e = np.zeros(len(varpar))
            e[i] = step[i]
            jacobian[:, i] = (flat(varpar + e) - flat(varpar - e)) / (2 * step[i])
        with np.errstate(invalid="ignore"):
            se = np.sqrt(np.diag(jacobian @ A @ jacobian.T))
        on_bound = np.isfinite(lower) & (varpar <= lower + 1e-12)
        if on_bound.any():  # the parameters that move with a bound parameter have no SE
            se[np.any(jacobian[:, on_bound] != 0, axis=1)] = np.nan
    return pd.DataFrame({"estimate": estimate, "std_error": se}, index=names)


def satterthwaite(model, contrasts: np.ndarray | None = None) -> pd.DataFrame:
    """Satterthwaite degrees of freedom for fixed effects (or contrasts), as lmerTest.

    ``df = 2 (l'Vl)² / (g' A g)`` with ``V = vcov(β̂)`` as a function of
    ``varpar = (θ, σ)``, ``g`` its gradient (central differences) and ``A = 2 H⁻¹``,
    ``H`` the Hessian of the deviance in ``varpar`` at the optimum.

    Returns
    -------
    DataFrame with ``Estimate, Std. Error, df, t value, Pr(>|t|)`` per row of the
    contrasts (default: each fixed effect). With known variances (``fixed_variances``)
    nothing in vcov(β̂) is estimated: df is ∞ (z tests).
    """
    from scipy import stats

    p = model.design.n_fixed
    L = np.eye(p) if contrasts is None else _contrast_matrix(contrasts, model.design.fixed_names)
    estimates = L @ model.fixef.to_numpy()
    if model.known_variances:  # nothing estimated in V: z tests, df = ∞
        V = model.vcov.to_numpy()
        variances = np.einsum("ij,jk,ik->i", L, V, L)
        df = np.full(len(L), np.inf)
    else:
        V, jacobian, A = _satterthwaite_pieces(model)
        variances = np.einsum("ij,jk,ik->i", L, V, L)
        gradients = np.array([np.einsum("ij,jk,ik->i", L, J, L) for J in jacobian]).T
        df = 2.0 * variances ** 2 / np.einsum("ij,jk,ik->i", gradients, A, gradients)
    se = np.sqrt(variances)
    t = estimates / se
    index = model.design.fixed_names if contrasts is None else [f"L{i}" for i in range(len(L))]
    return pd.DataFrame({"Estimate": estimates, "Std. Error": se, "df": df, "t value": t,
                         "Pr(>|t|)": 2 * stats.t.sf(np.abs(t), df)}, index=index)


def _f_denominator_df(nu: np.ndarray, tol: float = 1e-8) -> float:
    """lmerTest's ``get_Fstat_ddf``: combine the df of q independent t statistics."""
    if len(nu) == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(np.mean(nu))
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2)))
    return 2 * E / (E - len(nu))


def _contrast_matrix(contrasts, fixed_names) -> np.ndarray:
    """L as a finite (rows x fixed effects) array; a DataFrame is aligned by its column
    names."""
    p = len(fixed_names)
    if isinstance(contrasts, pd.DataFrame):
        extra = [c for c in contrasts.columns if c not in fixed_names]
        if extra:
            raise ValueError(f"contrasts name columns that are not fixed effects: {extra}")
        contrasts = contrasts.reindex(columns=fixed_names, fill_value=0.0)
    try:
        L = np.atleast_2d(np.asarray(contrasts, dtype=float))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"contrasts L must be numbers, one column per fixed effect: {exc}") \
            from None
    if L.ndim != 2 or L.shape[1] != p or L.shape[0] == 0:
        raise ValueError(f"contrasts L must have {p} columns (the fixed effects "
                         f"{', '.join(fixed_names)}), got shape {L.shape}")
    if not np.all(np.isfinite(L)):
        raise ValueError("contrasts L hold NaN or infinite values")
    if not np.any(L):
        raise ValueError("contrasts L are all 0: nothing to test")
    return L


def f_test(model, contrasts) -> pd.Series:
    """F test of ``L β = 0`` with Satterthwaite denominator df (lmerTest's ``contestMD``).

    ``L V L'`` is diagonalised; each eigen-direction gives a t statistic with its own
    Satterthwaite df, and the F statistic's denominator df combines them.

    Returns
    -------
    Series with ``Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F)``; with known
    variances DenDF is ∞ (a Wald χ² test).
    """
    from scipy import stats

    L = _contrast_matrix(contrasts, model.design.fixed_names)
    beta = model.fixef.to_numpy()
    if model.known_variances:  # Wald χ²: nothing in vcov(β̂) is estimated
        V = model.vcov.to_numpy()
        estimate = L @ beta
        covariance = L @ V @ L.T
        q = int(np.linalg.matrix_rank(covariance))
        chisq = float(estimate @ np.linalg.pinv(covariance) @ estimate)
        F = chisq / q
        sigma2 = model.sigma ** 2
        return pd.Series({"Sum Sq": F * q * sigma2, "Mean Sq": F * sigma2, "NumDF": q,
                          "DenDF": np.inf, "F value": F,
                          "Pr(>F)": float(stats.chi2.sf(chisq, q))})
    V, jacobian, A = _satterthwaite_pieces(model)
    eigenvalues, vectors = np.linalg.eigh(L @ V @ L.T)
    keep = eigenvalues > 1e-8 * max(eigenvalues.max(), 1e-300)
    d, P = eigenvalues[keep][::-1], vectors[:, keep][:, ::-1]
    q = len(d)
    PtL = P.T @ L
    t2 = (PtL @ beta) ** 2 / d
    F = float(t2.sum() / q)
    gradients = np.array([[row @ J @ row for J in jacobian] for row in PtL])
    nu = 2 * d ** 2 / np.einsum("ij,jk,ik->i", gradients, A, gradients)
    ddf = _f_denominator_df(nu)
    sigma2 = model.sigma ** 2
    return pd.Series({"Sum Sq": F * q * sigma2, "Mean Sq": F * sigma2, "NumDF": q,
                      "DenDF": ddf, "F value": F, "Pr(>F)": float(stats.f.sf(F, q, ddf))})


def type3_anova(model) -> pd.DataFrame:
    """Type III F tests of the fixed-effect terms with Satterthwaite denominators, as
    lmerTest's ``anova(m)``.

    Each term's hypothesis is "its coefficients are 0" in the sum-to-zero coding of
    every categorical variable (where type III hypotheses are the natural ones),
    mapped to the fitted coding through ``X_sum = X M``: ``L = (M⁻¹)_term``.

    Returns
    -------
    DataFrame indexed by term with ``Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F)``.
    """
    import re

    import scipy.sparse as sp

    call = getattr(model, "call", None)
    design = model.design
    if call is None:
        raise ValueError("type III tests need the model's data: fit it with hd.lmm()")
    if sp.issparse(design.X) or design.dropped_fixed:
        raise ValueError("type III tests need a dense, full-rank X")
    frame = call["data"].loc[design.row_index]
    spec = design.formula.fixed
    variables = spec_variables(spec, frame.columns)
    frame = r_factor_columns(frame, variables)  # R's factor levels, as the fit had them
    # sum-to-zero coding of every factor: categorical columns and factor(...) calls
    spec = re.sub(r"(?<![\w.])((?:factor|as\.factor|as_factor)\([^()]*\))",
                  r"C(\1, contr.sum)", spec)
    for name in sorted(variables, key=len, reverse=True):
        if isinstance(frame[name].dtype, pd.CategoricalDtype):
            spec = re.sub(rf"(?<![\w.(]){re.escape(name)}(?![\w.(])",
                          f"C({name}, contr.sum)", spec)
    X_sum, _, summed_spec = _model_matrix(spec, frame)
    if X_sum.shape[1] != design.n_fixed:
        raise ValueError("sum-to-zero and fitted codings span different spaces")
    M = np.linalg.lstsq(design.X, X_sum, rcond=None)[0]
    M_inverse = np.linalg.inv(M)
    rows = {}
    for term, columns in summed_spec.term_indices.items():
        label = str(term)
        if label == "1":
            continue
        label = re.sub(r"C\((.+?), contr\.sum\)", r"\1", label).replace("`", "")
        rows[label] = f_test(model, M_inverse[columns])
    return pd.DataFrame(rows).T


#: Kenward-Roger works with dense n x n matrices: refuse beyond this many rows
KENWARD_ROGER_MAX_ROWS = 5000


def kenward_roger(model, contrasts=None) -> pd.DataFrame:
    """Kenward-Roger adjusted covariance and degrees of freedom (as pbkrtest) for each
    row of ``contrasts`` (default: each fixed effect), REML fits, dense algebra.

    ``V = Σ_r σ_r G_r`` in the linear variance-covariance parametrisation (one G_r per
    variance or covariance of every term, and the residual), the expected information
    of the σ_r from REML, and Kenward & Roger's (1997) small-sample corrections.

    Returns
    -------
    DataFrame with ``Estimate, Std. Error (adjusted), df, t value, Pr(>|t|)``.
    """
    from scipy import stats

    if not model.reml:
        raise ValueError("Kenward-Roger needs a REML fit")
    design = model.design
    n = design.n_obs
    if n > KENWARD_ROGER_MAX_ROWS:
        raise ValueError(f"Kenward-Roger here is dense: at most {KENWARD_ROGER_MAX_ROWS} rows")
    X = np.asarray(design.X.todense() if hasattr(design.X, "todense") else design.X)
    Gs = []
    for term in design.terms:
        Zt = term.z_matrix().toarray()
        k = term.n_coefs
        for a in range(k):
            for b in range(a + 1):
                E = np.zeros((k, k))
                E[a, b] = E[b, a] = 1.0
                block = np.kron(np.eye(term.n_levels), E)
                if term.level_precision is not None:
                    block = np.kron(np.linalg.inv(term.level_precision.toarray()), E)
                Gs.append(Zt @ block @ Zt.T)
    Gs.append(np.diag(1.0 / design.weights))
    V = model.Sigma.toarray()
    Vi = np.linalg.inv(V)
    Phi = np.linalg.inv(X.T @ Vi @ X)
    P_full = Vi - Vi @ X @ Phi @ X.T @ Vi
    ViX = Vi @ X
    P = [-(ViX.T @ G @ ViX) for G in Gs]
    PG = [P_full @ G for G in Gs]
    r = len(Gs)
    info = np.empty((r, r))
    Q = {}
    for i in range(r):
        for j in range(i, r):
            info[i, j] = info[j, i] = 0.5 * np.sum(PG[i] * PG[j].T)
            Q[i, j] = ViX.T @ Gs[i] @ Vi @ Gs[j] @ ViX
            Q[j, i] = ViX.T @ Gs[j] @ Vi @ Gs[i] @ ViX
    W = np.linalg.inv(info)
    Lambda = np.zeros_like(Phi)
    for i in range(r):
        for j in range(r):
            Lambda += W[i, j] * Phi @ (Q[i, j] - P[i] @ Phi @ P[j]) @ Phi
    Phi_A = Phi + 2 * Lambda
    p = design.n_fixed
    L = np.eye(p) if contrasts is None else _contrast_matrix(contrasts, design.fixed_names)
    beta = model.fixef.to_numpy()
    rows = []
    for row in L:
        l = row[:, None]
        ell = 1
        Theta = l @ np.linalg.inv(l.T @ Phi @ l) @ l.T
        A1 = A2 = 0.0
        for i in range(r):
            Ti = Theta @ Phi @ P[i] @ Phi
            for j in range(r):
                Tj = Theta @ Phi @ P[j] @ Phi
                A1 += W[i, j] * np.trace(Ti) * np.trace(Tj)
                A2 += W[i, j] * np.trace(Ti @ Tj)
        B = (A1 + 6 * A2) / (2 * ell)
        g = ((ell + 1) * A1 - (ell + 4) * A2) / ((ell + 2) * A2)
        denom = 3 * ell + 2 * (1 - g)
        c1, c2, c3 = g / denom, (ell - g) / denom, (ell + 2 - g) / denom
        E_star = 1 / (1 - A2 / ell)
        V_star = 2 / ell * (1 + c1 * B) / ((1 - c2 * B) ** 2 * (1 - c3 * B))
        rho = V_star / (2 * E_star ** 2)
        df = 4 + (ell + 2) / (ell * rho - 1)
        estimate = float(row @ beta)
        se = float(np.sqrt(row @ Phi_A @ row))
        t = estimate / se
        rows.append((estimate, se, df, t, 2 * stats.t.sf(abs(t), df)))
    index = design.fixed_names if contrasts is None else [f"L{i}" for i in range(len(L))]
    return pd.DataFrame(rows, index=index,
                        columns=["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"])
