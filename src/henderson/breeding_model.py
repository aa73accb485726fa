"""Fitting and results of the breeding models of :mod:`henderson.multivariate`:
multi-trait, maternal (``covary``), random-regression and unknown-parent-group models.

:func:`fit_breeding_model` runs the pipeline (design → equations → AI-REML or known
variances) and returns a :class:`BreedingModel`, whose accessors carry the names of
:class:`~henderson.results.LinearMixedModel` where they mean the same thing
(``fixef``, ``ranef``, ``prediction_error_variances``, ``breeding_values``,
``heritability``, ``objective``, ``summary``).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

from .errors import ConvergenceWarning, DataError, RankDeficiencyWarning
from .multivariate import (MultivariateREML, build_multivariate_design, fit_ai_reml,
                           start_matrices, _vech_pairs)


class Covariances(dict):
    """(Co)variance matrices by effect, with ``"residual"``: a covaried effect is found
    by its tuple in either order, and one member of it (``"animal"``) gives that
    member's own block."""

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __getitem__(self, key):
        if isinstance(key, list):
            key = tuple(key)
        if isinstance(key, str) and not dict.__contains__(self, key):
            parts = _key_parts(key)
            key = parts if len(parts) > 1 else key     # "animal,dam", "dam:animal"
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        if isinstance(key, tuple):
            for k in self.keys():
                if isinstance(k, tuple) and set(k) == set(key) and len(k) == len(key):
                    frame = dict.__getitem__(self, k)
                    if list(k) == list(key):
                        return frame
                    return _reorder_members(frame, k, key)
        if isinstance(key, str):
            for k in self.keys():
                if isinstance(k, tuple) and key in k:
                    frame = dict.__getitem__(self, k)
                    rows = [i for i, name in enumerate(frame.index)
                            if name == key or str(name).startswith(key + ":")]
                    block = frame.iloc[rows, rows]
                    if len(rows) == 1:
                        block = block.set_axis([key], axis=0).set_axis([key], axis=1)
                    return block
        raise KeyError(f"{key!r}: covariances are given for "
                       f"{', '.join(map(repr, self.keys()))}")


def _reorder_members(frame, have, want):
    names = list(frame.index)
    order = []
    for member in want:
        order += [i for i, n in enumerate(names) if n == member or str(n).startswith(member + ":")]
    return frame.iloc[order, order]


def _matrix_from(value, k: int, what: str) -> np.ndarray:
    try:
        m = np.atleast_2d(np.asarray(value, dtype=float))
    except (TypeError, ValueError):
        raise ValueError(f"fixed_variances[{what!r}] must be a number or a {k} x {k} "
                         f"matrix, got {value!r}") from None
    if m.shape != (k, k):
        raise ValueError(f"fixed_variances[{what!r}] must be {k} x {k}, got shape {m.shape}")
    if not np.all(np.isfinite(m)) or not np.allclose(m, m.T, rtol=1e-10, atol=0):
        raise ValueError(f"fixed_variances[{what!r}] must be finite and symmetric")
    if np.linalg.eigvalsh(m).min() <= 0:
        raise ValueError(f"fixed_variances[{what!r}] must be positive definite")
    return m


def _key_parts(key) -> tuple:
    if isinstance(key, (tuple, list)):
        return tuple(key)
    for sep in (",", ":", "+", "&", " "):
        if sep in str(key):
            return tuple(p.strip() for p in str(key).split(sep) if p.strip())
    return (str(key),)


def _arranged(value, key, members: tuple, components: list, what: str) -> np.ndarray:
    """A given (co)variance matrix in the effect's component order: a labelled
    DataFrame by its labels, a covaried pair given as ``("dam", "animal")`` with its
    members' blocks swapped into the formula's order."""
    k = len(components)
    if isinstance(value, pd.DataFrame):
        labels = [str(v) for v in value.index]
        if [str(c) for c in value.columns] != labels:
            raise ValueError(f"fixed_variances[{what!r}]: a DataFrame needs the same labels "
                             "on rows and columns, in the same order")
        for names in (list(components), list(members)):
            if sorted(labels) == sorted(map(str, names)) and len(labels) == k:
                order = [labels.index(str(n)) for n in names]
                return _matrix_from(value.to_numpy(dtype=float)[np.ix_(order, order)], k, what)
        raise ValueError(f"fixed_variances[{what!r}] is labelled {labels}; expected "
                         f"{list(components)}")
    matrix = _matrix_from(value, k, what)
    parts = _key_parts(key)
    if len(members) > 1 and len(parts) == len(members) and list(parts) != list(members):
        block = k // len(members)
        order = np.concatenate([parts.index(m) * block + np.arange(block) for m in members])
        matrix = matrix[np.ix_(order, order)]
    return matrix


def _key_variants(key) -> set:
    """The spellings under which a key is looked up: itself, its parts in order and as
    a set (a covaried pair in either order)."""
    parts = _key_parts(key)
    if isinstance(key, (tuple, list)):
        return {parts, frozenset(parts)}
    return {parts, frozenset(parts), str(key)} if len(parts) > 1 else {str(key)}


def known_matrices(design, fixed_variances: dict) -> list[np.ndarray]:
    """The G0s and R0 from ``fixed_variances`` keyed by term, covaried tuple (or
    ``"animal,dam"``) and ``"residual"``."""
    if not isinstance(fixed_variances, dict):
        raise TypeError("fixed_variances must be a dict of (co)variances by term, with "
                        f"'residual', got {type(fixed_variances).__name__}")
    given = dict(fixed_variances)
    lookup = {}
    for key in given:
        for variant in _key_variants(key):
            lookup[variant] = key
    used = set()
    out = []
    for effect in design.effects:
        want = effect.key
        key = None
        for variant in _key_variants(want):
            if variant in lookup:
                key = lookup[variant]
                break
        scalar_pair = (key is not None and isinstance(want, tuple)
                       and np.size(given[key]) == 1)
        if (key is None or scalar_pair) and isinstance(want, tuple):
            # members' own variances and their covariance (single trait, one coefficient)
            singles = [lookup.get(m) for m in want]
            whole = [k for k in singles if k is not None and np.size(given[k]) == effect.k ** 2
                     and effect.k > 1]
            if key is None and len(whole) == 1 and sum(k is not None for k in singles) == 1:
                # the covaried block given under one member's name
                used.add(whole[0])
                out.append(_matrix_from(given[whole[0]], effect.k, str(whole[0])))
                continue
            if all(s is not None for s in singles) and effect.k == len(want):
                cov = np.diag([float(given[s]) for s in singles])
                for i, a in enumerate(want):
                    for j, b in enumerate(want[i + 1:], i + 1):
                        pair = lookup.get((a, b)) or lookup.get((b, a))
                        if pair is None:
                            raise ValueError(f"fixed_variances has no covariance for "
                                             f"{(a, b)!r}")
                        cov[i, j] = cov[j, i] = float(given[pair])
                        used.add(pair)
                used.update(singles)
                out.append(_matrix_from(cov, effect.k, str(want)))
                continue
        if key is None:
            raise ValueError(f"fixed_variances has no (co)variance for {want!r}")
        used.add(key)
        out.append(_arranged(given[key], key, effect.members, effect.components, str(key)))
    residual = lookup.get("residual") or lookup.get("Residual")
    if residual is None:
        raise ValueError("fixed_variances needs 'residual'")
    used.add(residual)
    out.append(_arranged(given[residual], "residual", ("residual",), design.responses,
                         "residual"))
    unknown = [k for k in given if k not in used]
    if unknown:
        raise ValueError(f"fixed_variances names unknown terms: {', '.join(map(repr, unknown))}")
    return out


def fit_breeding_model(formula: str, data: pd.DataFrame, relationships=None, covary=None,
                       fixed_variances=None, reml: bool = True, missing: str = "raise",
                       verbose=False, start=None) -> "BreedingModel":
    """Fit a multi-trait / maternal / random-regression / group model (see
    :func:`henderson.lmm`, which calls this for such models)."""
    if not reml:
        raise ValueError("multi-trait, maternal and group models are fitted by REML "
                         "(reml=True) or at known variances")
    t0 = time.perf_counter()
    design = build_multivariate_design(formula, data, relationships, covary, missing)
    if design.dropped_fixed:
        warnings.warn("fixed-effect model matrix is rank deficient so dropping "
                      f"{len(design.dropped_fixed)} column(s): "
                      + ", ".join(design.dropped_fixed[:10]), RankDeficiencyWarning,
                      stacklevel=3)
    t1 = time.perf_counter()
    reml_fn = MultivariateREML(design)
    t2 = time.perf_counter()
    result = None
    if fixed_variances is not None:
        matrices = known_matrices(design, fixed_variances)
        reml_fn.params.set_scales(matrices)
        theta = reml_fn.params.to_theta(matrices)
        state = reml_fn.state(theta, derivatives=False, matrices=matrices)
        if not np.isfinite(state.objective):
            warnings.warn("−2 log L cannot be computed at these (co)variances (a variance "
                          "ratio beyond 1e12 makes C numerically singular); the solutions "
                          "may still be usable", RuntimeWarning, stacklevel=3)
    else:
        first = start_matrices(design) if start is None else known_matrices(design, start)
        result = fit_ai_reml(reml_fn, first, verbose=verbose)
        state = result.state
        params = reml_fn.params
        residual_floor = params.at_floor(result.theta) & params.is_residual
        # at σ → 0 a bounded likelihood levels off (∂(−2ℓ)/∂log σ ∝ σ²) but one without
        # a maximum keeps falling (∂(−2ℓ)/∂log σ → 2 per degree of freedom it gains)
        unbounded = residual_floor & (state.gradient > 0.5)
        _check_identified(design, params.matrices(result.theta), unbounded)
        if residual_floor.any():
            warnings.warn("a residual variance (of a trait, or of a trait given the others) "
                          "is at its boundary, 0: the random effects explain the records "
                          "exactly at the REML estimate", ConvergenceWarning, stacklevel=3)
        if not result.converged:
            warnings.warn(f"AI-REML did not converge: {result.message}", ConvergenceWarning,
                          stacklevel=3)
    t3 = time.perf_counter()
    model = BreedingModel(design, reml_fn, state, result)
    if fixed_variances is not None:
        model.matrices = matrices   # exactly as given (not through their Cholesky factors)
    model.timings = {"design": t1 - t0, "equations": t2 - t1, "fit": t3 - t2}
    model.call = dict(formula=formula, relationships=relationships, covary=covary,
                      fixed_variances=fixed_variances)
    return model


#: (co)variances this far from the phenotypic variance (above, or below for the
#: residual) mean the likelihood has no interior maximum
DEGENERATE_RATIO = 1e6


def _check_identified(design, matrices, residual_at_floor=None) -> None:
    """A DataError when AI-REML ran off to a degenerate point: a residual variance
    that vanished (an exact fit, of a trait or of one trait from another) or a variance
    without bound (too few records)."""
    *G0s, R0 = matrices
    scale = np.array([np.var(design.y[design.long_trait == t])
                      for t in range(design.n_traits)])
    worst = None
    # (a residual variance cannot fall below its floor: see Parameters; one at the
    # floor where −2ℓ still falls comes in as residual_at_floor)
    d = np.sqrt(np.diag(R0))
    if residual_at_floor is not None and residual_at_floor.any():
        worst = ("a residual variance (of a trait, or of a trait given the others) went "
                 "to 0: the data fit it exactly (a constant or collinear trait?)")
    elif design.n_traits > 1 and np.linalg.eigvalsh(R0 / np.outer(d, d)).min() < 1e-9:
        worst = ("the residual covariance matrix became singular (residual correlations "
                 "of ±1: an exact fit of one trait from another)")
    for effect, G0 in zip(design.effects, G0s):
        for c in range(effect.k):
            if G0[c, c] > DEGENERATE_RATIO * scale.max():
                worst = (f"the variance of {effect.components[c]!r} in "
                         f"{effect.key!r} grew to {G0[c, c]:.3g} (phenotypic variances "
                         f"{', '.join(f'{v:.3g}' for v in scale)})")
    if worst is not None:
        raise DataError(
            f"REML has no maximum inside the parameter space: {worst}. With "
            f"{design.n_long} trait values for {sum(len(p) for p in _pairs(matrices))} "
            "(co)variances the data do not identify them; fit fewer (co)variances, give "
            "more records, or give fixed_variances")


def _pairs(matrices):
    return [_vech_pairs(len(m)) for m in matrices]


class BreedingModel:
    """A fitted multi-trait, maternal, random-regression or unknown-parent-group model.

    Attributes
    ----------
    covariances : dict
        (Co)variance matrices as DataFrames: one per effect (``"animal"``, ``"pe"``,
        ``("animal", "dam")`` for covaried terms) and ``"residual"`` (traits x traits).
    covariance_standard_errors : dict
        Their SEs (inverse average information; NaN at known variances).
    fixef : pandas.Series
        Fixed effects, named ``trait:name`` in multi-trait models.
    objective : float
        −2 log restricted likelihood (lme4's REML criterion for one trait).

    Examples
    --------
    >>> import henderson as hd, pandas as pd
    >>> ped = hd.Pedigree(["1", "2", "3", "4"], ["0", "0", "1", "1"], ["0", "0", "2", "2"])
    >>> d = pd.DataFrame({"animal": ["1", "2", "3", "4"], "a": [1.0, 2.0, 3.0, 5.0],
    ...                   "b": [2.0, float("nan"), 1.0, 4.0]})
    >>> m = hd.lmm("cbind(a, b) ~ 1 + (1 | animal)", d, relationships={"animal": ped},
    ...            fixed_variances={"animal": [[1, 0.5], [0.5, 2]], "residual": [[1, 0.2], [0.2, 1]]})
    >>> m.breeding_values().shape   # 4 animals x 2 traits; trait, ebv, pev, reliability, F
    (8, 5)
    >>> m.covariances["residual"].to_numpy().tolist()
    [[1.0, 0.2], [0.2, 1.0]]
    """

    def __init__(self, design, reml_fn: MultivariateREML, state, result):
        self.design = design
        self.reml_function = reml_fn
        self.state = state
        self.optimizer_result = result
        self.matrices = reml_fn.params.matrices(state.theta)
        self.fixed_variances = result is None
        self.timings = {}
        self._inverse = state.inverse_on_pattern
        self._cov_vech = None
        if result is not None:
            H = state.hessian_vech
            try:
                self._cov_vech = 2.0 * np.linalg.inv(H)
            except np.linalg.LinAlgError:
                self._cov_vech = np.full(H.shape, np.nan)

    # ------------------------------------------------------------------ basics
    @property
    def objective(self) -> float:
        return self.state.objective

    @property
    def loglik(self) -> float:
        return -0.5 * self.state.objective

    @property
    def converged(self) -> bool:
        return True if self.optimizer_result is None else self.optimizer_result.converged

    @property
    def reml(self) -> bool:
        return True

    @property
    def responses(self) -> list[str]:
        return list(self.design.responses)

    @property
    def nobs(self) -> int:
        return self.design.n_long

    @property
    def fixef(self) -> pd.Series:
        q = self._n_random_kept
        return pd.Series(self.state.solution[q:] + self._shift, index=self.design.fixed_names,
                         name="fixef")

    @property
    def _shift(self) -> np.ndarray:
        shift = self.design.fixed_shift
        return np.zeros(self.design.n_fixed) if shift is None else shift

    @property
    def _n_random_kept(self) -> int:
        return self.design.n_unknowns - self.design.n_fixed

    def _inverse_values(self):
        if self._inverse is None:
            self.reml_function.factor_at(self.matrices)
            self._inverse = self.reml_function.eq.selected_inverse_on_pattern()
        return self._inverse

    @property
    def fixed_standard_errors(self) -> pd.Series:
        q = self._n_random_kept
        idx = np.arange(q, self.design.n_unknowns)
        diag = self.reml_function.eq.inverse_diagonal(self._inverse_values(), idx)
        return pd.Series(np.sqrt(diag), index=self.design.fixed_names, name="std_error")

    def coefficient_table(self) -> pd.DataFrame:
        import scipy.stats

        est, se = self.fixef, self.fixed_standard_errors
        z = est / se
        return pd.DataFrame({"estimate": est, "std_error": se, "z": z,
                             "p": 2 * scipy.stats.norm.sf(np.abs(z))})

    def _wide(self, values: np.ndarray, name: str):
        d = self.design
        wide = np.full((d.n_records, d.n_traits), np.nan)
        wide[d.long_record, d.long_trait] = values
        if d.n_traits == 1:
            return pd.Series(wide[:, 0], index=d.record_index, name=name)
        return pd.DataFrame(wide, index=d.record_index, columns=d.responses)

    @property
    def population_fitted(self):
        """``X b̂`` for every record (NaN for a trait it lacks): a Series for one
        trait, a DataFrame by trait for several."""
        q = self._n_random_kept
        T = self.design.T
        return self._wide(T[:, q:] @ (self.state.solution[q:] + self._shift),
                          "population_fitted")

    @property
    def fitted(self):
        """``X b̂ + Z û`` (with groups, ``x'b̂ + a*``), laid out as
        :attr:`population_fitted`."""
        q = self._n_random_kept
        return self._wide(self.design.T @ self.state.solution
                          + self.design.T[:, q:] @ self._shift, "fitted")

    @property
    def residuals(self):
        return self._wide(self.state.residuals, "residuals")

    # ------------------------------------------------------------------ effects
    def _animal_levels(self, effect) -> pd.Index:
        return effect.levels[:effect.rank]

    @property
    def ranef(self) -> dict:
        """BLUPs by term (levels x components); a covaried effect gives each member its
        own table (``ranef["animal"]``, ``ranef["dam"]``), groups are in
        :attr:`group_effects`."""
        out = {}
        for e, effect in enumerate(self.design.effects):
            U = self.reml_function.effect_solutions(self.state.solution, e)[:effect.rank]
            out.update(self._by_member(effect, U))
        return out

    def _by_member(self, effect, values: np.ndarray) -> dict:
        """Levels x components of an effect as one table per member (term)."""
        frame = pd.DataFrame(values, index=self._animal_levels(effect),
                             columns=effect.components)
        out = {}
        for s, member in enumerate(effect.members):
            cols = [c for c in range(effect.k) if effect.component_member[c] == s]
            part = frame.iloc[:, cols]
            if len(effect.members) > 1:
                part = part.set_axis([_strip_member(effect.components[c], member)
                                      for c in cols], axis=1)
            out[member] = part
        return out

    @property
    def group_effects(self) -> pd.DataFrame | None:
        """Solutions of the unknown-parent groups (0 for a group set to 0 because it
        is confounded with the fixed effects)."""
        frames = []
        for e, effect in enumerate(self.design.effects):
            if effect.n_groups:
                U = self.reml_function.effect_solutions(self.state.solution, e)[effect.rank:]
                frames.append(pd.DataFrame(U, index=pd.Index(effect.levels[effect.rank:],
                                                             name="group"),
                                           columns=effect.components))
        return pd.concat(frames) if frames else None

    def _pev_blocks(self, e) -> np.ndarray:
        effect = self.design.effects[e]
        index = self.reml_function.random_index[e][:effect.rank * effect.k]
        eq = self.reml_function.eq
        diag = np.full(len(index), np.nan)
        ok = index >= 0
        diag[ok] = eq.inverse_diagonal(self._inverse_values(), index[ok])
        pev = diag.reshape(effect.rank, effect.k)
        if effect.n_groups:
            pev = self._pev_without_groups(e, pev)
        return pev

    def _pev_without_groups(self, e, pev_total) -> np.ndarray:
        """With unknown-parent groups, ``Var(a − â)`` for ``â = â* − Q ĝ``: the
        animal's deviation from its groups' mean, free of the group constraint (the
        C⁻¹ element of a* also carries the groups' estimation error). From the
        columns of C⁻¹ of the group unknowns (one solve each)."""
        effect = self.design.effects[e]
        index = self.reml_function.random_index[e]
        n, k = effect.rank, effect.k
        group_index = index[n * k:].reshape(effect.n_groups, k)
        eq = self.reml_function.eq
        self.reml_function.factor_at(self.matrices)
        kept = [(g, c) for g in range(effect.n_groups) for c in range(k)
                if group_index[g, c] >= 0]
        unit = np.zeros((self.design.n_unknowns, len(kept)))
        for j, (g, c) in enumerate(kept):
            unit[group_index[g, c], j] = 1.0
        columns = eq.solve(unit)                       # C⁻¹[:, group unknowns]
        Q = effect.group_contributions
        out = pev_total.copy()
        for c in range(k):
            js = [j for j, (g, cc) in enumerate(kept) if cc == c]
            if not js:
                continue
            groups = [kept[j][0] for j in js]
            Qc = Q[:, groups]                                           # n x m
            animal_rows = index[np.arange(n) * k + c]
            cross = columns[animal_rows][:, js]                         # C⁻¹[a*_i, g]
            gg = columns[[group_index[g, c] for g in groups]][:, js]    # C⁻¹[g, g']
            out[:, c] = (pev_total[:, c] - 2.0 * np.sum(Qc * cross, axis=1)
                         + np.einsum("ig,gh,ih->i", Qc, gg, Qc))
        return out

    @property
    def prediction_error_variances(self) -> dict:
        """``Var(u − û)`` by term, exact (the diagonal of C⁻¹ from its selected
        inverse), in the layout of :attr:`ranef`; with unknown-parent groups that of
        the deviation from the groups' mean, ``a = a* − Qg``."""
        out = {}
        for e, effect in enumerate(self.design.effects):
            out.update(self._by_member(effect, self._pev_blocks(e)))
        return out

    def _effect_of(self, group):
        for e, effect in enumerate(self.design.effects):
            if group in effect.members or group == effect.key:
                return e, effect
        names = [m for eff in self.design.effects for m in eff.members]
        raise ValueError(f"{group!r} is not a random term; choose from "
                         f"{', '.join(map(repr, names))}")

    def _default_group(self):
        for effect in self.design.effects:
            if effect.level_variance is not None:
                return effect.members[0]
        return self.design.effects[0].members[0]

    def breeding_values(self, group: str | None = None) -> pd.DataFrame:
        """EBVs in long form: index animal; columns trait, ebv, pev, reliability (and
        coefficient for random regressions, inbreeding for a pedigree).

        ``reliability = 1 − PEV / ((1 + F_i) σ²_g)`` with σ²_g the component's
        genetic variance.
        """
        group = self._default_group() if group is None else group
        e, effect = self._effect_of(group)
        s = list(effect.members).index(group) if group in effect.members else 0
        U = self.reml_function.effect_solutions(self.state.solution, e)[:effect.rank]
        pev = self._pev_blocks(e)
        G0 = self.matrices[e]
        levels = self._animal_levels(effect)
        diag = effect.level_variance if effect.level_variance is not None else np.ones(effect.rank)
        frames = []
        has_coef = len(set(effect.component_coef)) > 1
        for c in range(effect.k):
            if effect.component_member[c] != s:
                continue
            part = {"trait": self.design.responses[effect.component_trait[c]]}
            if has_coef:
                part["coefficient"] = effect.component_coef[c]
            part["ebv"] = U[:, c]
            part["pev"] = pev[:, c]
            with np.errstate(divide="ignore", invalid="ignore"):
                # PEV ≤ the prior variance: a difference below 0 is rounding
                part["reliability"] = np.clip(
                    1.0 - pev[:, c] / (diag[:effect.rank] * G0[c, c]), 0.0, 1.0)
            if effect.level_variance is not None:
                part["inbreeding"] = diag[:effect.rank] - 1.0
            frames.append(pd.DataFrame(part, index=levels))
        out = pd.concat(frames)
        out.index.name = group
        return out

    # ------------------------------------------------------------------ (co)variances
    def _keys(self):
        return [effect.key for effect in self.design.effects] + ["residual"]

    def _labels(self):
        return [effect.components for effect in self.design.effects] + [self.design.responses]

    @property
    def covariances(self) -> Covariances:
        out = Covariances()
        for key, labels, m in zip(self._keys(), self._labels(), self.matrices):
            out[key] = pd.DataFrame(m, index=labels, columns=labels)
        return out

    @property
    def covariance_standard_errors(self) -> Covariances:
        out = Covariances()
        params = self.reml_function.params
        for i, (key, labels, m) in enumerate(zip(self._keys(), self._labels(), self.matrices)):
            se = np.full(m.shape, np.nan)
            if self._cov_vech is not None:
                for j, (a, b) in enumerate(params.pairs[i]):
                    index = params.slices[i].start + j
                    se[a, b] = se[b, a] = _root(self._cov_vech[index, index])
            out[key] = pd.DataFrame(se, index=labels, columns=labels)
        return out

    @property
    def variance_components(self) -> pd.DataFrame:
        """Every (co)variance with its SE, one row each."""
        rows = []
        params = self.reml_function.params
        for i, (key, labels, m) in enumerate(zip(self._keys(), self._labels(), self.matrices)):
            for j, (a, b) in enumerate(params.pairs[i]):
                index = params.slices[i].start + j
                se = (_root(self._cov_vech[index, index])
                      if self._cov_vech is not None else np.nan)
                rows.append({"effect": key if isinstance(key, str) else ",".join(key),
                             "row": labels[a], "column": labels[b],
                             "estimate": m[a, b], "std_error": se})
        return pd.DataFrame(rows)

    def _vech_index(self, i, a, b):
        params = self.reml_function.params
        a, b = max(a, b), min(a, b)
        return params.slices[i].start + params.pairs[i].index((a, b))

    def _ratio_se(self, numerator, denominator) -> float:
        """SE of Σn/Σd (lists of (matrix, a, b, weight)) by the delta method."""
        if self._cov_vech is None:
            return np.nan
        num = sum(w * self.matrices[i][a, b] for i, a, b, w in numerator)
        den = sum(w * self.matrices[i][a, b] for i, a, b, w in denominator)
        grad = np.zeros(len(self._cov_vech))
        for i, a, b, w in numerator:
            grad[self._vech_index(i, a, b)] += w / den
        for i, a, b, w in denominator:
            grad[self._vech_index(i, a, b)] -= w * num / den ** 2
        return _root(grad @ self._cov_vech @ grad)

    def _phenotypic_terms(self, trait: int) -> list:
        """Var(y) of a record of ``trait``: every component's variance plus, for a
        covaried pair on one pedigree (an animal and its dam), twice ½·cov (Willham
        1972). A random regression anywhere, or a covaried pair of other factors, has
        no single phenotypic variance: refused."""
        terms = []
        for i, effect in enumerate(self.design.effects):
            if len(set(effect.component_coef)) > 1:
                raise ValueError("the phenotypic variance of a model with a random "
                                 "regression depends on the covariable; compute ratios "
                                 "from m.covariances at the points you need")
            if len(effect.members) > 1 and effect.level_variance is None:
                raise ValueError(f"covaried terms {effect.members} are not on a pedigree: "
                                 "the covariance of a record's effects is not known here; "
                                 "compute ratios from m.covariances")
            cols = [c for c in range(effect.k) if effect.component_trait[c] == trait]
            for c in cols:
                terms.append((i, c, c, 1.0))
            for x in cols:
                for y in cols:
                    if x < y and effect.component_member[x] != effect.component_member[y]:
                        terms.append((i, y, x, 1.0))  # 2 x ½ cov
        terms.append((len(self.design.effects), trait, trait, 1.0))
        return terms

    def heritability(self, group: str | None = None):
        """``h² = σ²_g / σ²_p`` per trait with its SE (delta method on the inverse AI
        matrix); σ²_p adds every variance component and, for covaried members (direct
        and maternal), their covariance (Willham 1972). One trait: ``(h2, se)``;
        several: a DataFrame by trait."""
        group = self._default_group() if group is None else group
        e, effect = self._effect_of(group)
        s = list(effect.members).index(group) if group in effect.members else 0
        if len(set(effect.component_coef)) > 1:
            raise ValueError("heritability of a random regression depends on the covariable; "
                             "compute it from m.covariances at the points you need")
        rows = {}
        for c in range(effect.k):
            if effect.component_member[c] != s:
                continue
            t = effect.component_trait[c]
            num = [(e, c, c, 1.0)]
            den = self._phenotypic_terms(t)
            value = self.matrices[e][c, c] / sum(w * self.matrices[i][a, b] for i, a, b, w in den)
            rows[self.design.responses[t]] = (value, self._ratio_se(num, den))
        if len(rows) == 1:
            return next(iter(rows.values()))
        return pd.DataFrame(rows, index=["estimate", "std_error"]).T

    def genetic_correlation(self, group: str | None = None):
        """Correlations between an effect's components with SEs (delta method): for
        two components ``(r, se)``; for more, a DataFrame with one row per pair."""
        group = self._default_group() if group is None else group
        e, effect = self._effect_of(group)
        if effect.k < 2:
            raise ValueError(f"{group!r} has one component: no correlation")
        G0 = self.matrices[e]
        rows = []
        for a in range(effect.k):
            for b in range(a + 1, effect.k):
                r = G0[a, b] / np.sqrt(G0[a, a] * G0[b, b])
                se = np.nan
                if self._cov_vech is not None:
                    grad = np.zeros(len(self._cov_vech))
                    grad[self._vech_index(e, b, a)] += 1.0 / np.sqrt(G0[a, a] * G0[b, b])
                    grad[self._vech_index(e, a, a)] -= 0.5 * r / G0[a, a]
                    grad[self._vech_index(e, b, b)] -= 0.5 * r / G0[b, b]
                    se = _root(grad @ self._cov_vech @ grad)
                rows.append({"first": effect.components[a], "second": effect.components[b],
                             "estimate": r, "std_error": se})
        if len(rows) == 1:
            return rows[0]["estimate"], rows[0]["std_error"]
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ printing
    def summary(self) -> str:
        d = self.design
        how = ("BLUP at known (co)variances" if self.fixed_variances else
               f"AI-REML, {self.optimizer_result.iterations} iterations"
               + ("" if self.converged else " (NOT converged)"))
        lines = [f"Breeding model fit by {how}",
                 f"Formula: {self.call.get('formula', '')}" if hasattr(self, "call") else "",
                 f"Records: {d.n_records}; trait values: {d.n_long}; traits: "
                 f"{', '.join(d.responses)}",
                 f"-2 log restricted likelihood: {self.objective:.4f}", ""]
        for key, frame in self.covariances.items():
            name = key if isinstance(key, str) else " + ".join(key)
            lines.append(f"(Co)variances: {name}")
            lines.append(frame.to_string(float_format=lambda v: f"{v:.6g}"))
            if not self.fixed_variances:
                se = self.covariance_standard_errors[key]
                lines.append("  standard errors:")
                lines.append(se.to_string(float_format=lambda v: f"{v:.4g}"))
            lines.append("")
        groups = self.group_effects
        if groups is not None:
            lines.append("Unknown-parent groups (fixed, QP transformation):")
            lines.append(groups.to_string(float_format=lambda v: f"{v:.6g}"))
        if d.dropped_groups:
            lines.append("Unknown-parent groups set to 0 (confounded with fixed effects): "
                         + ", ".join(d.dropped_groups))
        if d.empty_groups:
            lines.append("Unknown-parent groups set to 0 (no descendant has a record): "
                         + ", ".join(d.empty_groups))
        if groups is not None:
            lines.append("")
        lines.append("Fixed effects:")
        lines.append(self.coefficient_table().to_string(float_format=lambda v: f"{v:.6g}"))
        return "\n".join(line for line in lines if line is not None)

    def __repr__(self) -> str:
        return self.summary()


def _root(variance) -> float:
    """A standard error from a sampling variance: NaN (not 0) when the inverse AI
    matrix gives a variance that is not positive (a parameter on its boundary)."""
    variance = float(variance)
    return float(np.sqrt(variance)) if variance > 0 else np.nan


def _strip_member(name: str, member: str) -> str:
    if name == member:
        return member
    prefix = member + ":"
    return name[len(prefix):] if name.startswith(prefix) else name
