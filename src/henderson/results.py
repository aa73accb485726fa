"""Stage 6 of the pipeline: the fitted model.

Everything a user reads off a fit: θ, σ, fixed effects and their covariance, variance
components as lme4's ``VarCorr``, BLUPs with conditional SDs, logLik/AIC/BIC, fitted
values and residuals, a printed summary, and the matrices of the model ``X``, ``Z``,
``G``, ``R`` and ``Σ = Z G Z' + R``.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd
import scipy.sparse as sp


from . import breeding, plots
from .blockdiag import outermost_grouping
from .bootstrap import bootstrap, parameter_vector, simulate
from .design import (Design, check_new_levels, lme4_column_name, materialize, predicted_offset,
                     spec_variables)
from .inference import (covariance_parameter_table, f_test, kenward_roger, satterthwaite,
                        type3_anova)
from .mme import MixedModelEquations
from .objective import Objective
from .persist import save_model
from .threads import fit_threads
from .profile import profile_confint
from .report import (StatsmodelsNames, Summary, TermTable, _normal_term,
                    blup_contribution, check_newdata, group_names, print_text,
                    summary_text, varcorr_table)

SINGULAR_TOLERANCE = 1e-4


class LinearMixedModel(StatsmodelsNames):
    """A fitted linear mixed model (returned by :func:`henderson.lmm`).

    Attributes
    ----------
    objective : float
        REML criterion (REML fits) or deviance (ML fits), on lme4's scale.
    theta : ndarray
        Relative covariance parameters in lme4's order.
    sigma : float
        Residual standard deviation.
    fixef : pandas.Series
    vcov : pandas.DataFrame
    varcorr : pandas.DataFrame
        Columns ``grp, var1, var2, vcov, sdcor`` as lme4's ``as.data.frame(VarCorr(m))``.
    ranef, ranef_sd : dict of str -> pandas.DataFrame
        BLUPs and their conditional SDs, levels x coefficients, per grouping factor.
    timings : dict
        Seconds spent in each stage.

    Examples
    --------
    >>> import henderson as hd
    >>> m = hd.lmm("height ~ moisture + (1 | pot)", hd.datasets.load("plants"))
    >>> m.Sigma.shape
    (10, 10)
    >>> print(m.ranef["pot"].round(3))        # doctest: +NORMALIZE_WHITESPACE
         (Intercept)
    pot
    p11        1.027
    p12       -1.027
    p21        0.333
    p22       -0.333
    """

    #: above this many fixed effects, ``vcov`` holds only its diagonal (from the
    #: selected inverse) instead of p solves with the factor
    FULL_VCOV_LIMIT = 2000

    def __init__(self, design: Design, mme: MixedModelEquations, objective: Objective,
                 theta: np.ndarray, optimizer_result=None, fixed_sigma: float | None = None):
        self.mme = mme
        self.reml = objective.reml
        self.optimizer_result = optimizer_result
        self.timings = dict(mme.timings)
        full_vcov = design.n_fixed <= self.FULL_VCOV_LIMIT
        params = np.asarray(theta, dtype=float)
        evaluation = objective.evaluate(params, fixed_inverse=full_vcov)
        self.theta = params[:design.n_theta]
        #: γ of the residual model (log-ratios of residual variances); empty without one
        self.dispersion_parameters = params[design.n_theta:]
        if design.residual_model is not None and design.has_rows:
            # R, Σ, fitted values, Kenward-Roger, simulation: the estimated weights
            design = dataclasses.replace(
                design, prior_weights=design.weighted,
                weights=design.residual_model.weights(design.weights,
                                                      self.dispersion_parameters))
        self.design = design
        self.known_variances = fixed_sigma is not None
        if self.known_variances:
            self.sigma = float(fixed_sigma)
            self.objective = objective.at_sigma(evaluation, self.sigma ** 2)
        else:
            self.objective = evaluation.objective
            self.sigma = objective.sigma(evaluation)
        self.n_evaluations = objective.n_evaluations
        self._evaluation = evaluation
        #: the objective stage (θ → criterion) this fit was made with
        self.objective_function = objective
        #: results of features that cost a pass over the equations, kept for this fit
        self.cache: dict = {}
        self._full_selected_inverse = None
        q = design.n_random
        sigma2 = self.sigma ** 2
        self.fixef = pd.Series(evaluation.solution[q:] + mme.xp.shift, index=design.fixed_names,
                               name="estimate")
        if full_vcov:
            vcov = sigma2 * evaluation.fixed_inverse
        else:
            vcov = np.full((design.n_fixed, design.n_fixed), np.nan)
            idx = q + np.arange(design.n_fixed)
            np.fill_diagonal(vcov, sigma2 * mme.inverse_entries(
                self._selected_inverse(), idx, idx))
        # no copy (pandas 3 copies arrays by default): 17,500 fixed effects are 2.4 GB
        self.vcov = pd.DataFrame(vcov, index=design.fixed_names, columns=design.fixed_names,
                                 copy=False)
        #: Λ_t of every term at θ̂ (σ² Λ_t Λ_t' is the term's covariance)
        self.relative_factors = mme.relative_factors(self.theta)
        self._spherical = evaluation.solution[:q]
        #: b, the BLUPs in Z's column order (term by term, level by level)
        self.random_effects_vector = self._spherical_to_random_effects()
        self._ranef_sd = None

    # the tables are made on first use (a loop of thousands of small fits reads few):
    # their DataFrames were ~0.6 ms of a ~15 ms fit
    @functools.cached_property
    def ranef(self) -> dict[str, pd.DataFrame]:
        """The BLUPs (conditional modes) by grouping factor: levels x coefficients."""
        offsets = self.design.column_offsets()
        return self._tables([
            self.random_effects_vector[offsets[t]:offsets[t + 1]].reshape(term.n_levels,
                                                                          term.n_coefs)
            for t, term in enumerate(self.design.terms)])

    @functools.cached_property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``VarCorr`` table: each term's variances, SDs and correlations, and
        the residual's."""
        return self._varcorr_table()

    # ------------------------------------------------------------ scalars
    @property
    def nobs(self) -> int:
        return self.design.n_obs

    @property
    def npar(self) -> int:
        """Number of parameters: fixed effects, θ and σ (none of θ, σ when known)."""
        if self.known_variances:
            return self.design.n_fixed
        return self.design.n_fixed + self.design.n_theta + self.design.n_dispersion + 1

    @property
    def loglik(self) -> float:
        return -0.5 * self.objective

    @property
    def aic(self) -> float:
        return self.objective + 2 * self.npar

    @property
    def bic(self) -> float:
        return self.objective + self.npar * np.log(self.nobs)

    @property
    def deviance(self) -> float:
        return self.objective

    # ------------------------------------- statsmodels' names (and StatsmodelsNames)
    @property
    def pvalues(self) -> pd.Series:
        """Two-sided p-values of the fixed effects with Satterthwaite df (the summary's
        ``Pr(>|t|)``; statsmodels' MixedLM uses z tests, which are anti-conservative
        with few groups).

        Examples
        --------
        >>> import henderson as hd
        >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
        >>> m.bse.round(3).to_dict(), float(m.pvalues["Days"]) < 1e-5
        ({'(Intercept)': 6.825, 'Days': 1.546}, True)
        """
        return self.coef_table["Pr(>|t|)"].rename("pvalues")

    @property
    def fittedvalues(self) -> pd.Series:
        """``X β̂ + Z b̂``: :attr:`fitted` (statsmodels' name)."""
        return self.fitted

    @property
    def resid(self) -> pd.Series:
        """Response minus fitted values: :attr:`residuals` (statsmodels' name)."""
        return self.residuals

    @property
    def singular(self) -> bool:
        """True when a variance (a diagonal element of some Λ_t, an SD of a structure)
        is estimated ~0 (lme4's ``isSingular``): a variance component at 0 or a
        correlation at ±1. The fit is valid, but the data do not support the random
        terms as written: a term may be dropped, a correlated term made independent
        (``||``) or a slope removed, and likelihood-ratio tests on the boundary are
        conservative. :func:`henderson.lmm` warns (``SingularFitWarning``) when it
        estimates such a fit; docs/convergence.md says more."""
        on_bound = np.isfinite(self.design.theta_lower_bounds())
        return bool(np.any(self.theta[on_bound] < SINGULAR_TOLERANCE))

    @property
    def covariance_parameter_table(self) -> pd.DataFrame:
        """Every covariance parameter (the terms' SDs and correlations, σ) with its
        standard error (:func:`~henderson.inference.covariance_parameter_table`)."""
        return covariance_parameter_table(self)

    @property
    def covariance_parameters(self) -> dict[str, dict]:
        """Each term's covariance structure and its own parameters, by VarCorr name:
        ``{"structure": "ar1", "sd": ..., "rho": ...}`` (``us``: ``sd`` and the
        ``corr`` matrix; ``diag``: ``sd``; ``cs``: ``sd`` per coefficient and ``rho``;
        ``toep``: ``sd`` per coefficient and ``rho`` by lag)."""
        out = TermTable()
        for name, term, sl in zip(group_names(self.design), self.design.terms,
                                  self.design.theta_slices()):
            out[name] = {"structure": term.structure.name,
                         **term.structure.parameters(self.theta[sl], self.sigma)}
            out.aliases[_normal_term(term.label)] = name
        return out

    @property
    def covariances(self) -> dict[str, pd.DataFrame]:
        """The random terms' covariance matrices (coefficients x coefficients) and
        ``"residual"`` (σ², 1 x 1), by term name: the layout of
        :attr:`BreedingModel.covariances`."""
        out = {}
        for name, term, matrix in zip(group_names(self.design), self.design.terms,
                                      self.covariance_matrices().values()):
            out[name] = pd.DataFrame(matrix, index=term.coef_names, columns=term.coef_names)
        out["residual"] = pd.DataFrame([[self.sigma ** 2]], index=[self.design.response_name],
                                       columns=[self.design.response_name])
        return out

    @property
    def converged(self) -> bool:
        return bool(self.optimizer_result is None or self.optimizer_result.converged)

    # ------------------------------------------------------------ random effects
    def _spherical_to_random_effects(self) -> np.ndarray:
        parts = []
        offsets = self.design.column_offsets()
        for t, lam in enumerate(self.relative_factors):
            k = lam.shape[0]
            u = self._spherical[offsets[t]:offsets[t + 1]].reshape(-1, k)
            parts.append((u @ lam.T).ravel())  # b_l = Λ u_l
        return np.concatenate(parts)

    def _selected_inverse(self):
        """C⁻¹ on the pattern of L (computed once, on first use)."""
        if self._full_selected_inverse is None:
            # under a fit's thread rule (one BLAS thread on a busy machine): outside it,
            # the PEVs' dpotri on two BLAS threads beside a busy process took 40-75 s
            # instead of 3.5 s at 200,000 animals
            with fit_threads():
                self._full_selected_inverse = self.mme.selected_inverse()
        return self._full_selected_inverse

    def _level_blocks(self, selected) -> list[np.ndarray]:
        """σ² Λ_t M_ll Λ_t' for every level l of every term, M a selected inverse."""
        mme, design = self.mme, self.design
        offsets = design.column_offsets()
        out = []
        for t, term in enumerate(design.terms):
            k, nl = term.n_coefs, term.n_levels
            rows, cols = term.level_block_indices(offsets[t])
            blocks = mme.inverse_entries(selected, rows.ravel(), cols.ravel()).reshape(nl, k, k)
            lam = self.relative_factors[t]
            out.append(self.sigma ** 2 * np.einsum("ab,lbc,dc->lad", lam, blocks, lam))
        return out

    def _compute_conditional_variances(self) -> list[np.ndarray]:
        """σ² Λ_t (C_zz⁻¹)_ll Λ_t' per level: lme4's ``condVar`` (given β̂)."""
        with fit_threads():
            selected = self.mme.selected_inverse(random_block_only=True)
        return self._level_blocks(selected)

    @property
    def prediction_error_variances(self) -> dict[str, pd.DataFrame]:
        """PEV of every BLUP, ``Var(b − b̂)`` from the full ``C⁻¹`` (accounting for
        the estimation of β), exact, by selected inversion; levels x coefficients."""
        blocks = self._level_blocks(self._selected_inverse())
        return self._tables([np.diagonal(b, axis1=1, axis2=2) for b in blocks])

    def breeding_values(self, group: str | None = None) -> pd.DataFrame:
        """BLUPs of a one-coefficient term with PEV and reliability
        (:func:`henderson.breeding.breeding_values`)."""
        return breeding.breeding_values(self, group)

    @property
    def variance_components(self) -> pd.DataFrame:
        """Variances with standard errors from the average-information matrix (AI-REML
        fits of one-coefficient terms); NaN SEs otherwise."""
        return breeding.variance_components(self)

    def heritability(self, group=None) -> tuple[float, float]:
        """``h² = σ²_group / (Σ σ²_t + σ²_e)`` and its SE (delta method on AI⁻¹);
        ``group`` may list several terms (e.g. ``["id.1", "id.2"]`` for several GRMs on
        one factor), whose variances are summed."""
        return breeding.heritability(self, group)

    @property
    def ranef_sd(self) -> dict[str, pd.DataFrame]:
        """Conditional SDs of the BLUPs, as lme4's ``condVar`` (computed on first use:
        a selected inverse of C_zz)."""
        return self._tables(self.conditional_sds_by_term())

    def conditional_sds_by_term(self) -> list[np.ndarray]:
        """Per term (in Z's order), the (levels x k) conditional SDs behind
        ``ranef_sd`` (computed once)."""
        if self._ranef_sd is None:
            variances = self._compute_conditional_variances()
            self._ranef_sd = [np.sqrt(np.maximum(np.diagonal(v, axis1=1, axis2=2), 0.0))
                              for v in variances]
        return self._ranef_sd

    def save(self, path, conditional_sd: bool = True):
        """Write the fit to ``path`` (an ``.npz`` archive, no pickle) for
        :func:`henderson.load`; the loaded model predicts as this one.

        Parameters
        ----------
        path : str or Path
        conditional_sd : bool
            Store the BLUPs' conditional SDs too (one selected inverse, if not yet
            computed).
        """
        return save_model(self, path, conditional_sd=conditional_sd)

    def _tables(self, per_term: list[np.ndarray]) -> dict[str, pd.DataFrame]:
        """Per-term (levels x k) arrays as DataFrames merged by grouping factor."""
        frames: dict[str, list[pd.DataFrame]] = {}
        for term, values in zip(self.design.terms, per_term):
            frames.setdefault(term.group, []).append(pd.DataFrame(
                values, index=pd.Index(term.levels, name=term.group), columns=term.coef_names))
        return {g: f[0] if len(f) == 1 else pd.concat(f, axis=1) for g, f in frames.items()}

    # ------------------------------------------------------------ variance components
    def _varcorr_table(self) -> pd.DataFrame:
        return varcorr_table(group_names(self.design),
                             [t.coef_names for t in self.design.terms],
                             list(self.covariance_matrices().values()), self.sigma,
                             self.residual_groups())

    def residual_groups(self) -> dict | None:
        """Residual variance by group of the residual model (None without one, or for
        a continuous dispformula, whose variances differ by row)."""
        model = self.design.residual_model
        if model is None or model.labels is None:
            return None
        variances = self.sigma ** 2 * np.exp(model.patterns @ self.dispersion_parameters)
        return dict(zip(model.labels, variances))

    @property
    def dispersion(self) -> pd.Series:
        """Coefficients of ``log σ²`` in the ``dispformula`` (glmmTMB's dispersion
        coefficients: the reference's log variance, then log-ratios); without one,
        the intercept alone, ``log σ²`` (glmmTMB's ``dispformula = ~1``)."""
        model = self.design.residual_model
        if model is None:
            return pd.Series({"(Intercept)": 2.0 * np.log(self.sigma)}, name="log variance")
        return pd.Series(model.coefficients(self.dispersion_parameters, self.sigma),
                         index=model.names, name="log variance")

    @property
    def residual_variances(self) -> pd.Series:
        """Residual variance by group of the ``dispformula`` (one, σ², without)."""
        rows = self.residual_groups()
        if rows is None:
            if self.design.residual_model is not None:
                raise ValueError("a continuous dispformula gives each row its own "
                                 "residual variance: see m.R")
            return pd.Series({"Residual": self.sigma ** 2}, name="variance")
        return pd.Series(rows, name="variance")

    def covariance_matrices(self) -> dict[str, np.ndarray]:
        """The k x k covariance matrix σ² Λ_t Λ_t' of every term, by VarCorr name."""
        return {name: self.sigma ** 2 * lam @ lam.T
                for name, lam in zip(group_names(self.design), self.relative_factors)}

    # ------------------------------------------------------------ predictions
    @property
    def population_fitted(self) -> pd.Series:
        """``X β̂`` (+ offset): the fitted values without the BLUPs."""
        self.design.require_rows("fitted values")
        values = np.asarray(self.design.X @ self.fixef.to_numpy()).ravel()
        if self.design.offset is not None:
            values = values + self.design.offset
        return pd.Series(values, index=self.design.row_index, name="fitted")

    @property
    def fitted(self) -> pd.Series:
        """``X β̂ + Z b̂`` (+ offset), row by row."""
        values = self.population_fitted.to_numpy() + self.Z @ self.random_effects_vector
        return pd.Series(values, index=self.design.row_index, name="fitted")

    @property
    def response(self) -> pd.Series:
        """The response of every row (with the offset: ``y`` as the formula names it)."""
        self.design.require_rows("the response")
        values = self.design.y if self.design.offset is None \
            else self.design.y + self.design.offset
        return pd.Series(values, index=self.design.row_index, name=self.design.response_name)

    @property
    def residuals(self) -> pd.Series:
        return pd.Series(self.response.to_numpy() - self.fitted.to_numpy(),
                         index=self.design.row_index, name="residuals")

    def refit(self, **changes) -> "LinearMixedModel":
        """Fit the same model again with some arguments of :func:`henderson.lmm`
        changed, e.g. ``m.refit(reml=False)`` (``hd.lmm`` leaves its call and itself on
        the model: this module does not import the fitting stage back)."""
        call, fit = getattr(self, "call", None), getattr(self, "fit_function", None)
        if call is None or fit is None:
            raise ValueError("this model was not fitted by hd.lmm(); refit needs its call")
        refitted = fit(**{**call, **changes})
        if "data" not in changes:
            refitted.data_name = getattr(self, "data_name", None)
        return refitted

    def predict(self, newdata: pd.DataFrame | None = None, re: bool = True,
                allow_new_levels: bool = False, offset=None) -> np.ndarray:
        """Predictions ``X β̂ (+ Z b̂) (+ offset)``, as lme4's ``predict``.

        Parameters
        ----------
        newdata : DataFrame, optional
            Needs the columns of the fixed part and offsets (and, with ``re=True``, of
            the random terms and grouping factors); a missing column is a
            ``FormulaError``, a level of a fixed-effect factor the fit did not see a
            ``DataError``. Without newdata: the fitted values.
        re : bool
            Add the BLUPs.
        allow_new_levels : bool
            A level of a grouping factor not seen in the fit is a ``DataError`` (lme4's
            default); with True it contributes 0, the population prediction.
            Levels match as R labels them: 308, 308.0 and "308" are one level.
        offset : str or array, optional
            The ``offset=`` of the fit for these rows (a column name or an array),
            when the fit had one; the formula's ``offset(...)`` terms are evaluated on
            newdata.

        Examples
        --------
        >>> import henderson as hd, pandas as pd
        >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
        >>> new = pd.DataFrame({"Days": [0, 10], "Subject": [308, "999"]})
        >>> m.predict(new, allow_new_levels=True).round(2).tolist()
        [253.66, 356.08]
        """
        if not isinstance(re, (bool, np.bool_)):
            raise TypeError(f"re must be True or False, got {re!r}")
        if not isinstance(allow_new_levels, (bool, np.bool_)):
            raise TypeError(f"allow_new_levels must be True or False, got {allow_new_levels!r}")
        if newdata is None:
            return (self.fitted if re else self.population_fitted).to_numpy()
        if not isinstance(newdata, pd.DataFrame):
            raise TypeError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        design = self.design
        needed = set(spec_variables(design.formula.fixed, newdata.columns, missing=True))
        if re:
            for term in design.terms:
                needed |= set(spec_variables(term.covariates, newdata.columns, missing=True))
                needed |= set(term.factors)
        check_newdata(newdata, needed)
        X = materialize(design.fixed_spec, newdata)
        names = [lme4_column_name(c) for c in X.columns] if hasattr(X, "columns") else None
        X = pd.DataFrame(np.asarray(X.todense() if hasattr(X, "todense") else X),
                         columns=names)[design.fixed_names].to_numpy(dtype=float)
        prediction = X @ self.fixef.to_numpy()
        prediction += predicted_offset(design.formula.offsets, design.offset_argument,
                                       newdata, offset)
        if not re:
            return prediction
        offsets = design.column_offsets()
        for t, term in enumerate(design.terms):
            if not allow_new_levels:
                check_new_levels(newdata, term.factors, term.levels)
            z = np.asarray(materialize(term.z_spec, newdata), dtype=float)
            b = self.random_effects_vector[offsets[t]:offsets[t + 1]].reshape(term.n_levels, term.n_coefs)
            prediction += blup_contribution(newdata, term.factors, term.levels, z, b)
        return prediction

    # ------------------------------------------------------------ matrices of the model
    @property
    def X(self) -> np.ndarray:
        self.design.require_rows("X")
        return self.design.X

    @property
    def Z(self) -> sp.csc_matrix:
        self.design.require_rows("Z")
        return self.design.Z

    @property
    def G(self) -> sp.csc_matrix:
        """Covariance of the random effects, ``σ² ⊕_t (K_t ⊗ Σ_t)`` (q x q, sparse)."""
        blocks = []
        for term, lam in zip(self.design.terms, self.relative_factors):
            sigma_t = self.sigma ** 2 * lam @ lam.T
            if term.level_precision is None:
                level_cov = sp.identity(term.n_levels, format="csc")
            else:
                level_cov = sp.csc_matrix(np.linalg.inv(term.level_precision.toarray()))
            blocks.append(sp.kron(level_cov, sp.csc_matrix(sigma_t), format="csc"))
        return sp.block_diag(blocks, format="csc")

    @property
    def R(self) -> sp.csc_matrix:
        """Residual covariance ``σ² W⁻¹`` (n x n, diagonal)."""
        self.design.require_rows("R")
        return sp.diags(self.sigma ** 2 / self.design.weights, format="csc")

    @property
    def Sigma(self) -> sp.csc_matrix:
        """Marginal covariance of y, ``Σ = Z G Z' + R`` (n x n, sparse)."""
        Z = self.Z
        return (Z @ self.G @ Z.T + self.R).tocsc()

    def sigma_blocks(self) -> dict[str, np.ndarray]:
        """The diagonal blocks ``Σ_g`` of Σ, one per level of the outermost grouping
        factor (Σ is block diagonal when every random term nests in it).

        Examples
        --------
        >>> import henderson as hd
        >>> m = hd.lmm("height ~ moisture + (1 | pot)", hd.datasets.load("plants"))
        >>> [b.shape for b in m.sigma_blocks().values()]
        [(3, 3), (2, 2), (3, 3), (2, 2)]
        """
        self.design.require_rows("sigma_blocks()")
        outer = self.design.terms[outermost_grouping(self.design)]
        sigma = self.Sigma.tocsr()
        blocks = {}
        for code, label in enumerate(outer.levels):
            rows = np.flatnonzero(outer.level_codes == code)
            blocks[str(label)] = sigma[rows][:, rows].toarray()
        return blocks

    # ------------------------------------------------------------ printing
    @property
    def coef_table(self) -> pd.DataFrame:
        """Fixed effects with Satterthwaite df and p-values, as lmerTest's summary (z
        tests, df = ∞, with known variances)."""
        return satterthwaite(self)

    def coefficients(self, ddf: str = "Satterthwaite") -> pd.DataFrame:
        """Fixed effects with df and p-values: ``ddf="Satterthwaite"`` (lmerTest,
        ``coef_table``) or ``"Kenward-Roger"`` (pbkrtest; adjusted SEs; dense, REML
        fits up to 5,000 rows)."""
        if ddf == "Satterthwaite":
            return self.coef_table
        if ddf in ("Kenward-Roger", "KR"):
            self.design.require_rows("Kenward-Roger df")
            return kenward_roger(self)
        raise ValueError("ddf must be 'Satterthwaite' or 'Kenward-Roger'")

    def plot_residuals(self, path=None):
        """Residuals vs fitted and a normal QQ plot (matplotlib)."""
        return plots.plot_residuals(self, path)

    def plot_ranef(self, group: str | None = None, path=None):
        """Caterpillar plot of a grouping factor's BLUPs with conditional-SD bars."""
        return plots.plot_ranef(self, group, path=path)

    plot = plot_residuals

    def simulate(self, n: int = 1, seed=None) -> np.ndarray:
        """Responses simulated from the fitted model, shape (n_obs, n)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"simulate: n must be a positive integer, got {n!r}")
        self.design.require_rows("simulate()")
        return simulate(self, n, seed)

    def confint(self, method: str = "wald", level: float = 0.95, n_boot: int = 200,
                seed=None, n_jobs: int = 1) -> pd.DataFrame:
        """Confidence intervals for lme4's ``confint`` parameters (SDs, correlations,
        σ, fixed effects).

        Parameters
        ----------
        method : {"wald", "profile", "bootstrap"}
            ``"wald"`` (the default here; lme4's default is ``"profile"``): estimate ±
            z·SE for the fixed effects, immediate at any size; NaN for the variance
            parameters, as lme4's ``confint(method = "Wald")`` gives NA (a symmetric
            interval around an SD is a poor one). ``"profile"``: profile-likelihood
            intervals on the ML deviance for every parameter, as lme4's default; about
            ten refits per parameter. ``"bootstrap"``: percentile intervals from
            ``n_boot`` parametric-bootstrap refits that reuse the symbolic
            factorisation.
        level : float
            Coverage, 0.95 by default.

        Examples
        --------
        >>> import henderson as hd
        >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
        >>> m.confint().loc["Days"].round(2).tolist()
        [7.44, 13.5]
        """
        from scipy import stats

        if method not in ("wald", "bootstrap", "profile"):
            raise ValueError(f"method must be 'wald', 'bootstrap' or 'profile', got {method!r}")
        if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) \
                or not 0 < level < 1:
            raise ValueError(f"level must be a number between 0 and 1, got {level!r}")
        if method == "bootstrap" and (isinstance(n_boot, bool) or not isinstance(
                n_boot, (int, np.integer)) or n_boot < 2):
            raise ValueError(f"n_boot must be an integer of at least 2, got {n_boot!r}")
        if method != "wald":
            if self.known_variances:
                raise ValueError(f"confint(method={method!r}) estimates the variances, "
                                 "which this model was given (fixed_variances): use "
                                 "method='wald'")
            self.design.require_rows(f"confint(method={method!r})")
        estimates = parameter_vector(self)
        alpha = (1 - level) / 2
        if method == "wald":
            lower = pd.Series(np.nan, index=estimates.index)
            upper = lower.copy()
            se = np.sqrt(np.diag(self.vcov.to_numpy()))
            z = stats.norm.ppf(1 - alpha)
            names = self.design.fixed_names
            lower[names] = self.fixef.to_numpy() - z * se
            upper[names] = self.fixef.to_numpy() + z * se
        elif method == "bootstrap":
            replicates = bootstrap(self, n_boot, seed, n_jobs=n_jobs)
            lower = replicates.quantile(alpha)
            upper = replicates.quantile(1 - alpha)
        elif method == "profile":
            return profile_confint(self, level)
        else:
            raise ValueError("method must be 'wald', 'bootstrap' or 'profile'")
        return pd.DataFrame({f"{100 * alpha:.1f} %": lower,
                             f"{100 * (1 - alpha):.1f} %": upper})

    def anova(self) -> pd.DataFrame:
        """Type III F tests of the fixed-effect terms, Satterthwaite denominators
        (lmerTest's ``anova()``)."""
        self.design.require_rows("anova()")
        return type3_anova(self)

    def test(self, contrasts) -> pd.Series:
        """F test of ``L β = 0`` with Satterthwaite denominator df, as lmerTest's
        ``contest()``; ``contrasts`` is L (rows over the fixed effects)."""
        return f_test(self, contrasts)

    def coefficient_table(self) -> pd.DataFrame:
        se = np.sqrt(np.diag(self.vcov.to_numpy()))
        return pd.DataFrame({"Estimate": self.fixef.to_numpy(), "Std. Error": se,
                             "t value": self.fixef.to_numpy() / se},
                            index=self.design.fixed_names)

    def summary(self, timings: bool = False, ddf: str = "Satterthwaite",
                correlation: bool | None = None) -> Summary:
        """The fit as lme4's ``summary()`` prints it, with lmerTest's df and p-values.

        Parameters
        ----------
        timings : bool
            Append the seconds spent in each stage and the number of evaluations.
        ddf : {"Satterthwaite", "Kenward-Roger"}
            Degrees of freedom of the coefficient table (Satterthwaite is printed for
            models up to 50 fixed effects and 100,000 random effects; Kenward-Roger on
            request, dense, up to 5,000 rows).
        correlation : bool, optional
            Show the correlation of the fixed effects; by default, as lme4, for 2 to
            12 coefficients.

        Returns
        -------
        henderson.report.Summary
            Prints as lme4's text (R's number formatting: estimates to lme4's digits,
            p-values below 2.2e-16 as ``< 2e-16``), shows as HTML tables in a notebook,
            and keeps the tables as DataFrames in ``.tables``.

        Examples
        --------
        >>> import henderson as hd
        >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
        >>> print(str(m.summary()).split("Fixed effects:")[1].splitlines()[2])
        (Intercept)  251.405      6.825  17.000  36.838  < 2e-16 ***
        """
        return summary_text(self, timings=timings, ddf=ddf, correlation=correlation)

    def __repr__(self) -> str:
        return print_text(self)

    def _repr_html_(self) -> str:
        return self.summary().as_html()
