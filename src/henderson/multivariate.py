"""Breeding models with general (co)variance matrices: several traits, correlated
effects (direct and maternal), random regressions and unknown-parent groups.

The model, with records i and traits t (a record may lack some traits),

    y = X b + Z u + e,   Var(u) = ⊕_e G0_e ⊗ K_e,   Var(e) = ⊕_i R0[P_i, P_i],

where each *effect* e is one grouping factor's levels (animals: K = A from a pedigree;
an i.i.d. factor: K = I) with k_e correlated components: the traits of a multi-trait
model, the random-regression coefficients, and the members of ``covary`` (direct and
maternal genetic effects share the animals' levels). P_i is the set of traits record i
has: each missing pattern has its own residual inverse ``W_P = R0[P, P]⁻¹`` (no
imputation), as BLUPF90 and WOMBAT do.

Henderson's equations are built in the original (not relative) form

    C = [X'WX  X'WZ; Z'WX  Z'WZ + G⁻¹],   G⁻¹ = ⊕ G0_e⁻¹ ⊗ K_e⁻¹,

ordered animal-major (the k_e components of a level together), so that CHOLMOD sees
K's pattern with a dense k_e x k_e block per entry; the fill-reducing ordering is
computed on the level graph (k_e times smaller). ``W`` and ``G0⁻¹`` enter C linearly:
C's values are a weighted sum of cross-product matrices computed once
(:class:`GeneralEquations`), so a new (G0, R0) costs a weighted sum and a numeric
factorisation.

REML: ``−2ℓ = (N − p) log 2π + log|C| + log|R| + log|G| + y'Py`` with
``y'Py = y'Wy − ŝ'r`` (ŝ the solutions, r the right-hand side). Average-information
REML (Johnson & Thompson 1995; Gilmour, Thompson & Cullis 1995) works on the Cholesky
factors of every G0 and R0 (log diagonals), so that every step is positive definite;
the score is exact (traces from the selected inverse of C), the AI matrix from one
solve per parameter; a step that does not lower −2ℓ is retried with Levenberg damping,
and an EM-REML step of the G0s is the last resort; log diagonals have a floor (section
9 of docs/DESIGN.md). SEs come from the inverse AI matrix.

Unknown-parent groups enter by Quaas's QP transformation: the animal effect's levels are
the animals then the groups, with ``K⁻¹ = A*⁻¹``; groups are fixed effects (counted in p,
their log-determinant not in log|G|), and a group confounded with the fixed effects is
set to 0.
"""
from __future__ import annotations

import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import kernels
from .errors import DataError, FormulaError
from .linalg import cholmod_analyze, cholmod_lower_factor, cholmod_refactor, independent_columns

#: −2ℓ changes below this (and a Newton decrement below it) end AI-REML
AI_TOLERANCE = 1e-8
AI_MAX_ITERATIONS = 60
#: the longest AI step in the Cholesky parameters (log standard deviations)
MAX_STEP = 3.0   # (a trust region: no factor moves by more than e^3 in one iteration)
#: the smallest log diagonal of a scaled Cholesky factor (a conditional standard
#: deviation 1e-3 of its scale; see Parameters)
LOG_FLOOR = float(np.log(1e-3))
_CBIND = re.compile(r"^\s*cbind\s*\((.*)\)\s*$", re.S)
_DUMMY_RESPONSE = "__henderson_response__"


# --------------------------------------------------------------------------- formula
def split_responses(formula: str) -> tuple[list[str], str]:
    """The responses of ``"cbind(y1, y2) ~ rhs"`` (or ``"y ~ rhs"``) and the rhs."""
    if not isinstance(formula, str) or formula.count("~") != 1:
        raise FormulaError(f"formula must have the form 'y ~ terms', got {formula!r}")
    left, rhs = (part.strip() for part in formula.split("~"))
    match = _CBIND.match(left)
    names = [n.strip().strip("`") for n in match.group(1).split(",")] if match else [left]
    if any(not n for n in names):
        raise FormulaError(f"formula {formula!r}: cbind(...) has an empty response")
    if len(set(names)) < len(names):
        raise FormulaError(f"formula {formula!r}: cbind(...) repeats a response")
    return names, rhs


def is_multivariate_formula(formula) -> bool:
    return isinstance(formula, str) and "~" in formula and bool(
        _CBIND.match(formula.split("~")[0]))


# --------------------------------------------------------------------------- effects
@dataclass
class Effect:
    """One random effect: a grouping factor's levels with k correlated components."""

    key: object                 # "animal", or ("animal", "dam") for covaried terms
    members: tuple              # the terms' names
    levels: pd.Index            # level labels (unknown-parent groups last)
    precision: sp.csc_matrix    # K⁻¹ over the levels (A*⁻¹ with groups)
    logdet: float               # log|K| over the random levels
    rank: int                   # random levels (levels minus groups)
    components: list            # component names
    component_member: np.ndarray  # member index of each component
    component_trait: np.ndarray   # trait index of each component
    component_coef: list          # coefficient name of each component
    level_variance: np.ndarray | None = None   # diag(K) (1 + F) for reliabilities
    n_groups: int = 0
    group_contributions: np.ndarray | None = None  # Q (animals x groups)
    offset: int = 0

    @property
    def k(self) -> int:
        return len(self.components)

    @property
    def n_levels(self) -> int:
        return len(self.levels)


@dataclass
class MultivariateDesign:
    """Everything the equations need: the long rows (one per observed record x trait,
    record-major), their model matrix ``T = [Z X]``, the residual patterns and the
    effects."""

    responses: list
    y: np.ndarray                  # long response
    long_record: np.ndarray
    long_trait: np.ndarray
    T: sp.csr_matrix               # long rows x unknowns (random first, then fixed)
    n_random: int
    fixed_names: list
    fixed_trait: np.ndarray
    effects: list
    patterns: list                 # (traits tuple, long-row index array n_p x |P|)
    n_records: int
    record_index: pd.Index
    dropped_fixed: list = field(default_factory=list)
    dropped_groups: list = field(default_factory=list)
    #: groups with no recorded descendant (set to 0: nothing estimates them)
    empty_groups: list = field(default_factory=list)
    kept_unknowns: np.ndarray | None = None   # over the full index (random + fixed)
    #: column of T of every unknown in the full numbering (−1: a group set to 0)
    kept_position: np.ndarray | None = None
    #: b₀ subtracted from y (y − X b₀; see _shift_response): add it to the fixed effects
    fixed_shift: np.ndarray | None = None

    @property
    def n_fixed(self) -> int:
        return len(self.fixed_names)

    @property
    def n_unknowns(self) -> int:
        return self.T.shape[1]

    @property
    def n_long(self) -> int:
        return len(self.y)

    @property
    def n_traits(self) -> int:
        return len(self.responses)


def _pedigree_of(known):
    from .pedigree import Pedigree

    return known if isinstance(known, Pedigree) else None


def _same_relationship(a, b) -> bool:
    if a.level_precision is None or b.level_precision is None:
        return a.level_precision is None and b.level_precision is None
    if a.level_precision is b.level_precision:
        return True
    if a.level_precision.shape != b.level_precision.shape:
        return False
    return (abs(a.level_precision - b.level_precision) > 0).nnz == 0


def build_multivariate_design(formula: str, data: pd.DataFrame, relationships=None,
                              covary=None, missing: str = "raise") -> MultivariateDesign:
    """The :class:`MultivariateDesign` of a formula (``cbind(...)`` for several traits)."""
    from .design import build_design
    from .pedigree import _unknown_labels
    from .report import group_names

    if not isinstance(data, pd.DataFrame):
        raise TypeError("multi-trait, maternal and unknown-parent-group models are fitted "
                        f"from a pandas DataFrame, got {type(data).__name__}")
    responses, rhs = split_responses(formula)
    absent = [r for r in responses if r not in data.columns]
    if absent:
        raise FormulaError(f"response column(s) {', '.join(map(repr, absent))} not found "
                           f"(available: {', '.join(map(str, data.columns[:20]))})")
    for r in responses:
        if not pd.api.types.is_numeric_dtype(data[r]) or pd.api.types.is_bool_dtype(data[r]):
            raise DataError(f"response {r!r} must be numeric, got dtype {data[r].dtype}")
    if re.search(r"(^|[^\w.])offset\s*\(", rhs):
        raise FormulaError("offset() is not available in multi-trait, maternal, group and "
                           "random-regression models; subtract it from the responses")
    from .formula import parse_formula
    from .pedigree import _id_text

    relationships = dict(relationships or {})
    frame = data.copy()
    frame[_DUMMY_RESPONSE] = np.arange(len(frame), dtype=float)
    bars = parse_formula(f"{_DUMMY_RESPONSE} ~ {rhs}").bars
    # Records without a level: the first term on a pedigree is the records' own animal
    # and must be known (as in every model); a later term on the same pedigree (the
    # dam of a maternal model, a sire) may be unknown: missing or an unknown-parent
    # code means that the record has no such effect. Such records get a valid level
    # whose column of Z is then left empty.
    no_level: dict[str, np.ndarray] = {}
    text_of: dict[str, pd.Series] = {}
    strict_pedigrees = set()
    for bar in bars:
        group, known = bar.group, relationships.get(bar.group)
        ped = _pedigree_of(known)
        if ped is None or len(bar.factors) != 1 or group not in frame.columns:
            continue
        text, missing_id = _id_text(frame[group], group)
        text = pd.Series(np.asarray(text, dtype=object), index=frame.index)
        text[missing_id] = np.nan
        text_of[group] = text
        if id(ped) not in strict_pedigrees:
            strict_pedigrees.add(id(ped))
            unknown_own = text.isna() | pd.Series(
                _unknown_labels(text.fillna("").astype(str), ped.unknown_codes),
                index=frame.index)
            if unknown_own.any() and missing == "raise":
                raise DataError(
                    f"{int(unknown_own.sum())} record(s) have an unknown {group!r} (first at "
                    f"row {int(np.flatnonzero(unknown_own.to_numpy())[0])}). The first term "
                    f"on a pedigree, here (1 | {group}), is taken as the records' own "
                    "animal, which must be known; write the animal's term first (a later "
                    "term such as the dam may be unknown), or pass missing='drop'")
            frame[group] = text          # ids compared as the pedigree compares them
            continue
        unknown = text.isna() | pd.Series(
            _unknown_labels(text.fillna("").astype(str), ped.unknown_codes), index=frame.index)
        unknown |= text.isin(set(ped.groups))
        unknown &= ~text.fillna("").isin(set(ped.ids))
        frame[group] = text.where(~unknown, ped.ids[0]) if unknown.any() else text
        if unknown.any():
            no_level[group] = unknown.to_numpy()
    # an ordinary grouping factor that copies such a column (the dam's permanent
    # environment pe, a copy of dam) has no level where that column has none; other
    # missing levels follow `missing` (an error, or the row dropped)
    for bar in bars:
        if len(bar.factors) != 1 or bar.group in text_of or bar.group not in frame.columns:
            continue
        column = frame[bar.group]
        as_text, missing_id = _id_text(column, bar.group)
        as_text = pd.Series(np.asarray(as_text, dtype=object), index=frame.index)
        absent = np.zeros(len(frame), dtype=bool)   # otherwise `missing` decides
        for linked, mask in list(no_level.items()):
            if linked not in text_of:      # an ordinary factor already handled
                continue
            original = text_of[linked]
            same = (as_text == original.fillna("")) | (missing_id & original.isna().to_numpy())
            if same.all():
                absent |= mask
        if absent.any() and not absent.all():
            no_level[bar.group] = absent
            keep = column[~absent].iloc[0]
            frame[bar.group] = column.where(~absent, keep) if not isinstance(
                column.dtype, pd.CategoricalDtype) else column.fillna(keep).where(~absent, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-trait aliasing is reported below
        design = build_design(f"{_DUMMY_RESPONSE} ~ {rhs}", frame, missing=missing,
                              relationships=relationships)
    positions = np.asarray(design.y, dtype=np.int64)   # rows of data kept
    y_wide = data[responses].to_numpy(dtype=float)[positions]
    if not is_multivariate_formula(formula):
        # one response (covary, groups, random regression): `missing` decides, as in
        # every model; NaN means a missing trait only under cbind(...)
        bad = ~np.isfinite(y_wide[:, 0])
        if bad.any() and missing == "raise":
            raise DataError(f"{int(bad.sum())} row(s) have missing or infinite values in "
                            f"{responses[0]!r} (first at row {int(positions[bad][0])}); clean "
                            "them or pass missing='drop'")
        y_wide[bad, 0] = np.nan
    elif np.isinf(y_wide).any():
        if missing == "raise":
            raise DataError("a response has an infinite value; clean it, or pass "
                            "missing='drop' to treat it as a missing trait")
        y_wide[np.isinf(y_wide)] = np.nan
    observed = np.isfinite(y_wide)
    has_any = observed.any(axis=1)
    if not has_any.any():
        raise DataError("no record has any of the responses")
    records = np.flatnonzero(has_any)
    y_wide, observed = y_wide[records], observed[records]
    n_records, n_traits = observed.shape
    for t, r in enumerate(responses):
        if observed[:, t].sum() < 2:
            raise DataError(f"response {r!r} has fewer than 2 observed values")
        values = y_wide[observed[:, t], t]
        if np.all(values == values[0]):
            raise DataError(f"response {r!r} is constant ({values[0]:g} in every record): "
                            "it has no variance to split")
    long_record, long_trait = np.nonzero(observed)          # record-major
    long_index = np.full(observed.shape, -1, dtype=np.int64)
    long_index[long_record, long_trait] = np.arange(len(long_record))
    y_long = y_wide[long_record, long_trait]

    # ---- effects
    names = group_names(design)
    term_of = dict(zip(names, design.terms))
    if covary is not None and (isinstance(covary, str) or any(isinstance(c, str) for c in covary)):
        raise ValueError("covary takes a list of tuples of term names, e.g. "
                         f"[('animal', 'dam')], got {covary!r}")
    covary = [tuple(c) for c in (covary or [])]
    merged: dict[str, tuple] = {}
    covary = [tuple(sorted(pair, key=lambda g: names.index(g) if g in names else -1))
              for pair in covary]   # members in the formula's order, whatever the tuple's
    for pair in covary:
        if len(pair) < 2 or not all(isinstance(g, str) for g in pair):
            raise ValueError(f"covary takes tuples of two or more term names, got {pair!r}")
        for g in pair:
            if g not in term_of:
                raise FormulaError(f"covary names {g!r}, which is not a random term of the "
                                   f"formula (terms: {', '.join(names)})")
            if g in merged:
                raise ValueError(f"covary lists {g!r} twice")
            merged[g] = pair
        first = term_of[pair[0]]
        for g in pair[1:]:
            other = term_of[g]
            if not _same_relationship(first, other):
                raise DataError(f"covary {pair}: {g!r} and {pair[0]!r} must have the same "
                                "relationship matrix (the same pedigree), or none")
            if not other.levels.equals(first.levels):
                raise DataError(f"covary {pair}: {g!r} and {pair[0]!r} must have the same "
                                "levels (give both the same pedigree in relationships)")
    effects: list[Effect] = []
    done = set()
    for name in names:
        if name in done:
            continue
        members = merged.get(name, (name,))
        done.update(members)
        terms = [term_of[m] for m in members]
        for m, term in zip(members, terms):
            if term.structure.name not in ("us",):
                raise FormulaError(f"{term.label}: the {term.structure.name} structure is not "
                                   "available in multi-trait, maternal or group models")
        comp_names, comp_member, comp_trait, comp_coef = [], [], [], []
        for s, (m, term) in enumerate(zip(members, terms)):
            for t in range(n_traits):
                for coef in term.coef_names:
                    parts = ([m] if len(members) > 1 else []) + \
                        ([responses[t]] if n_traits > 1 else []) + \
                        ([coef] if len(term.coef_names) > 1 else [])
                    comp_names.append(":".join(parts) or responses[0])
                    comp_member.append(s)
                    comp_trait.append(t)
                    comp_coef.append(coef)
        first = terms[0]
        known = relationships.get(first.group)
        ped = _pedigree_of(known)
        levels, precision = first.levels, first.level_precision
        logdet, rank, n_groups, q = first.logdet_level_covariance, len(first.levels), 0, None
        if precision is None:
            precision = sp.identity(len(levels), format="csc")
        if ped is not None and ped.n_groups:
            n_groups = ped.n_groups
            levels = pd.Index(list(ped.ids) + list(ped.groups), name=first.group)
            precision = ped.group_inverse()
            q = ped.group_contributions()
        effects.append(Effect(
            key=members[0] if len(members) == 1 else tuple(members), members=tuple(members),
            levels=levels, precision=sp.csc_matrix(precision), logdet=float(logdet),
            rank=rank, components=comp_names, component_member=np.array(comp_member),
            component_trait=np.array(comp_trait), component_coef=comp_coef,
            level_variance=first.level_variance, n_groups=n_groups, group_contributions=q))
    offset = 0
    for effect in effects:
        effect.offset = offset
        offset += effect.n_levels * effect.k
    n_random = offset

    # ---- the long model matrix: random columns
    rows, cols, vals = [], [], []
    for effect in effects:
        for c in range(effect.k):
            term = term_of[effect.members[effect.component_member[c]]]
            t = effect.component_trait[c]
            j = term.coef_names.index(effect.component_coef[c])
            codes = term.level_codes[records]
            value = term.z[records, j]
            blank = no_level.get(term.group)
            has = observed[:, t].copy()
            if blank is not None:
                has &= ~blank[positions][records]
            r = np.flatnonzero(has)
            rows.append(long_index[r, t])
            cols.append(effect.offset + codes[r] * effect.k + c)
            vals.append(value[r])
    # ---- fixed columns per trait, aliased ones dropped trait by trait
    X = design.X
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    fixed_names, fixed_trait, dropped = [], [], []
    for t, response in enumerate(responses):
        r = np.flatnonzero(observed[:, t])
        Xt = X[records[r]]
        gram = (Xt.T @ Xt) if sp.issparse(Xt) else Xt.T @ Xt
        keep = independent_columns(gram)
        label = (lambda nm: f"{response}:{nm}") if n_traits > 1 else (lambda nm: nm)
        dropped += [label(design.fixed_names[j]) for j in range(Xt.shape[1]) if j not in set(keep)]
        Xk = Xt[:, keep]
        Xk = sp.coo_matrix(Xk)
        rows.append(long_index[r[Xk.row], t])
        cols.append(n_random + len(fixed_names) + Xk.col)
        vals.append(Xk.data)
        fixed_names += [label(design.fixed_names[j]) for j in keep]
        fixed_trait += [t] * len(keep)
    dropped = list(design.dropped_fixed) + dropped
    n_unknowns = n_random + len(fixed_names)
    T = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(len(y_long), n_unknowns))
    T.sum_duplicates()
    # ---- residual patterns
    pattern_code = observed.astype(np.int64) @ (1 << np.arange(n_traits))
    patterns = []
    for code in np.unique(pattern_code):
        traits = tuple(int(t) for t in range(n_traits) if code >> t & 1)
        recs = np.flatnonzero(pattern_code == code)
        patterns.append((traits, long_index[np.ix_(recs, list(traits))]))
    mdesign = MultivariateDesign(
        responses=responses, y=y_long, long_record=long_record, long_trait=long_trait, T=T,
        n_random=n_random, fixed_names=fixed_names, fixed_trait=np.array(fixed_trait),
        effects=effects, patterns=patterns, n_records=n_records,
        record_index=design.row_index[records], dropped_fixed=dropped)
    _drop_confounded_groups(mdesign)
    _shift_response(mdesign)
    _check_collinear_traits(mdesign)
    return mdesign


def _check_collinear_traits(design: MultivariateDesign) -> None:
    """A DataError when the traits, after their fixed effects, are linearly dependent
    on the records that have them all (``y3 = 2 y1 + 1``): R0 would be singular and
    −2ℓ unbounded below."""
    if design.n_traits < 2:
        return
    full = [index for traits, index in design.patterns if len(traits) == design.n_traits]
    if not full or len(full[0]) <= design.n_traits:
        return
    E = design.y[full[0]]
    scale = np.sqrt(np.sum(E ** 2, axis=0))
    if np.any(scale == 0):
        return
    R = (E / scale).T @ (E / scale)
    eigenvalues, vectors = np.linalg.eigh(R)
    if eigenvalues[0] < 1e-10:
        weights = vectors[:, 0]
        involved = [design.responses[t] for t in np.flatnonzero(np.abs(weights) > 1e-3)]
        raise DataError(f"traits {', '.join(map(repr, involved))} are linearly dependent "
                        "after their fixed effects (one is an exact combination of the "
                        "others): their residual covariance would be singular; drop one")


def _independent_after(residual: np.ndarray, norms: np.ndarray, tol: float = 1e-7) -> list:
    """Columns kept, in order, of a Gram matrix of residuals (after X): a column goes
    when its residual on X and the kept earlier columns is below ``tol²`` of its own
    squared norm (as :func:`~henderson.linalg.independent_columns`)."""
    kept: list[int] = []
    for j in range(len(norms)):
        if not norms[j] > 0:
            continue
        r = residual[j, j]
        if kept:
            block = residual[np.ix_(kept, kept)]
            v = residual[kept, j]
            r -= float(v @ np.linalg.solve(block, v))
        if r > tol * tol * norms[j]:
            kept.append(j)
    return kept


def _shift_response(design: MultivariateDesign) -> None:
    """Subtract each trait's least-squares fixed-effect fit, ``y − X b₀``: REML depends
    on y only through its contrasts free of X, and y'Py of a response far from 0 (a
    trait in the hundreds of millions) would cancel away its digits. The fixed-effect
    solutions are reported plus ``b₀``."""
    q = design.n_unknowns - design.n_fixed
    Xf = design.T[:, q:].tocsc()
    gram = (Xf.T @ Xf).tocsc()
    gram = sp.tril(gram + sp.identity(gram.shape[0]) * 1e-12 * gram.diagonal().max(),
                   format="csc")
    factor = cholmod_analyze(gram, ordering="amd")
    cholmod_refactor(factor, gram)
    shift = factor(np.asarray(Xf.T @ design.y).ravel())
    for _ in range(2):   # iterative refinement: the shift need not be exact, only near
        shift += factor(np.asarray(Xf.T @ (design.y - Xf @ shift)).ravel())
    design.fixed_shift = shift
    design.y = design.y - Xf @ shift


def kept_columns(design: MultivariateDesign, full: np.ndarray) -> np.ndarray:
    """Columns of T (−1 for a dropped group) of unknowns in the full numbering."""
    return full if design.kept_position is None else design.kept_position[full]


def _drop_confounded_groups(design: MultivariateDesign) -> None:
    """Set to 0 the unknown-parent groups confounded with the fixed effects (their
    columns of Z Q are, after projection on X, below 1e-7 of their norm), dropping
    their unknowns from the equations."""
    keep = np.ones(design.n_unknowns, dtype=bool)
    T = design.T
    for effect in design.effects:
        if not effect.n_groups:
            continue
        n_animals = effect.rank
        group_cols = []
        blocks = []
        for g in range(effect.n_groups):
            for c in range(effect.k):
                # the column of Z Q for (group g, component c)
                animal_cols = effect.offset + np.arange(n_animals) * effect.k + c
                weights = np.zeros(design.n_unknowns)
                weights[animal_cols] = effect.group_contributions[:, g]
                blocks.append(T @ weights)
                group_cols.append(effect.offset + (n_animals + g) * effect.k + c)
        ZQ = np.column_stack(blocks)
        Xf = T[:, design.n_random:].tocsc()
        # Z Q after its projection on X (X'X sparse: thousands of herd-year-seasons)
        gram = (Xf.T @ Xf).tocsc()
        ridge = 1e-12 * max(float(gram.diagonal().max()), 1e-300)
        gram = sp.tril(gram + sp.identity(gram.shape[0], format="csc") * ridge, format="csc")
        factor = cholmod_analyze(gram, ordering="amd")
        cholmod_refactor(factor, gram)
        # the residuals themselves (not ZQ'ZQ − B'(X'X)⁻¹B, whose cancellation exceeds
        # the test's 1e-14), by least squares with two steps of iterative refinement
        coef = factor(np.asarray(Xf.T @ ZQ))
        for _ in range(2):
            coef += factor(np.asarray(Xf.T @ (ZQ - Xf @ coef)))
        projected = ZQ - Xf @ coef
        kept = set(_independent_after(projected.T @ projected, np.einsum("ij,ij->j", ZQ, ZQ),
                                      tol=1e-6))
        for j, col in enumerate(group_cols):
            if j not in kept:
                keep[col] = False
                g, c = divmod(j, effect.k)
                name = f"{effect.levels[n_animals + g]}"
                name = name if effect.k == 1 else f"{effect.components[c]}:{name}"
                if not np.any(ZQ[:, j]):
                    design.empty_groups.append(name)
                else:
                    design.dropped_groups.append(name)
    if not keep.all():
        design.T = design.T[:, np.flatnonzero(keep)].tocsr()
        design.kept_unknowns = keep
        design.kept_position = np.full(len(keep), -1, dtype=np.int64)
        design.kept_position[keep] = np.arange(keep.sum())


# --------------------------------------------------------------------------- equations
@dataclass
class _Part:
    """One cross-product matrix of C (lower triangle, in factor order) and where its
    entries go in C's values."""

    kind: str        # "data" or "g"
    which: int       # pattern or effect
    a: int
    b: int
    positions: np.ndarray
    values: np.ndarray
    weights: np.ndarray   # 2 off the diagonal, 1 on it (for full-matrix traces)


class GeneralEquations:
    """C(G0s, R0) as a weighted sum of cross-products, its CHOLMOD factor, solutions,
    log-determinants and the selected inverse."""

    def __init__(self, design: MultivariateDesign):
        self.design = design
        n = design.n_unknowns
        self.n = n
        self.keep = design.kept_unknowns
        self.order = self._fill_reducing_order()
        self.position = np.empty(n, dtype=np.int64)
        self.position[self.order] = np.arange(n)
        parts = []
        T = design.T.tocsc()
        y = design.y
        self.rhs_parts, self.yy_parts = {}, {}
        for p, (traits, index) in enumerate(design.patterns):
            for ia in range(len(traits)):
                Ta = T[index[:, ia]]
                for ib in range(len(traits)):
                    self.rhs_parts[p, ia, ib] = np.asarray(Ta.T @ y[index[:, ib]]).ravel()
                    self.yy_parts[p, ia, ib] = float(y[index[:, ia]] @ y[index[:, ib]])
                    if ib < ia:
                        continue
                    M = (Ta.T @ T[index[:, ib]]).tocsc()
                    if ib != ia:
                        M = M + M.T
                    parts.append(self._part("data", p, ia, ib, sp.coo_matrix(M)))
        for e, effect in enumerate(design.effects):
            K = sp.coo_matrix(effect.precision)
            for a in range(effect.k):
                for b in range(a, effect.k):
                    pairs = [(a, b)] if a == b else [(a, b), (b, a)]
                    rows = np.concatenate([effect.offset + K.row * effect.k + i for i, _ in pairs])
                    cols = np.concatenate([effect.offset + K.col * effect.k + j for _, j in pairs])
                    vals = np.concatenate([K.data for _ in pairs])
                    rows, cols, vals = self._kept(rows, cols, vals)
                    parts.append(self._part("g", e, a, b, sp.coo_matrix((vals, (rows, cols)),
                                                                         shape=(n, n))))
        # C's pattern: the union of the parts' patterns (sparse additions, merges in
        # C++); where each part's entries go: add the part, its entries numbered from
        # 1, to the union of ones (same pattern, canonical order): entry j lands as j + 2
        union = None
        for part in parts:
            rows, cols = part.positions
            ones = sp.csc_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
            union = ones if union is None else union + ones
        union.sort_indices()
        union.data[:] = 1.0
        for part in parts:
            rows, cols = part.positions
            tagged = union + sp.csc_matrix(
                (np.arange(1, len(rows) + 1, dtype=np.float64), (rows, cols)), shape=(n, n))
            if tagged.nnz != union.nnz or not tagged.has_sorted_indices:
                tagged.sort_indices()
            slots = np.flatnonzero(tagged.data >= 2.0)
            position = np.empty(len(rows), dtype=np.int64)
            position[(tagged.data[slots] - 2.0).astype(np.int64)] = slots
            part.positions = position
        self.pattern_rows = union.indices.astype(np.int64)
        self.pattern_cols = np.repeat(np.arange(n, dtype=np.int64), np.diff(union.indptr))
        self.matrix = sp.csc_matrix((np.zeros(union.nnz), union.indices, union.indptr),
                                    shape=(n, n))
        self.parts = parts
        self.matrix.data[self.matrix.indptr[:-1]] = 1.0  # the diagonal (any SPD values)
        self.factor = cholmod_analyze(self.matrix, ordering="natural")
        self.factor_perm = np.asarray(self.factor.P(), dtype=np.int64)

    # -- set-up helpers
    def _kept(self, rows, cols, vals):
        if self.keep is None:
            return rows, cols, vals
        r, c = kept_columns(self.design, rows), kept_columns(self.design, cols)
        ok = (r >= 0) & (c >= 0)
        return r[ok], c[ok], vals[ok]

    def _part(self, kind, which, a, b, coo) -> _Part:
        coo.sum_duplicates()
        r, c = self.position[coo.row], self.position[coo.col]
        lower = r >= c
        r, c, v = r[lower], c[lower], coo.data[lower]
        weights = np.where(r == c, 1.0, 2.0)
        # (rows, cols) until the pattern of C is known, then positions in its values
        return _Part(kind, which, a, b, (r, c), v, weights)

    def _fill_reducing_order(self) -> np.ndarray:
        """AMD on the graph of levels (each effect's k components are one node),
        expanded so that a level's components stay together."""
        design = self.design
        full_n = len(self.keep) if self.keep is not None else self.n
        node = np.empty(full_n, dtype=np.int64)
        start = 0
        for effect in design.effects:
            size = effect.n_levels * effect.k
            node[effect.offset:effect.offset + size] = start + np.arange(size) // effect.k
            start += effect.n_levels
        node[design.n_random:] = start + np.arange(full_n - design.n_random)
        n_nodes = start + full_n - design.n_random
        if self.keep is not None:
            node = node[self.keep]
        T = design.T.tocoo()
        Tn = sp.csr_matrix((np.ones(T.nnz), (T.row, node[T.col])),
                           shape=(T.shape[0], n_nodes))
        graph = (Tn.T @ Tn).tocsc()
        start = 0
        for effect in design.effects:
            K = sp.coo_matrix(effect.precision)
            graph = graph + sp.csc_matrix((np.ones(K.nnz), (start + K.row, start + K.col)),
                                          shape=(n_nodes, n_nodes))
            start += effect.n_levels
        graph = sp.tril(graph + sp.identity(n_nodes) * n_nodes, format="csc")
        graph.data[:] = 1.0
        graph = graph + sp.identity(n_nodes, format="csc") * n_nodes
        analysis = cholmod_analyze(graph.tocsc(), ordering="amd")
        node_order = np.asarray(analysis.P(), dtype=np.int64)
        rank = np.empty(n_nodes, dtype=np.int64)
        rank[node_order] = np.arange(n_nodes)
        return np.lexsort((np.arange(self.n), rank[node]))

    # -- numeric
    def fill(self, residual_inverses: list[np.ndarray], g_inverses: list[np.ndarray]) -> None:
        data = self.matrix.data
        data[:] = 0.0
        for part in self.parts:
            coef = (residual_inverses[part.which][part.a, part.b] if part.kind == "data"
                    else g_inverses[part.which][part.a, part.b])
            if coef != 0.0:
                data[part.positions] += coef * part.values

    def factorize(self) -> None:
        cholmod_refactor(self.factor, self.matrix)

    def rhs(self, residual_inverses) -> np.ndarray:
        out = np.zeros(self.n)
        for (p, a, b), vector in self.rhs_parts.items():
            out += residual_inverses[p][a, b] * vector
        return out

    def yy(self, residual_inverses) -> float:
        return float(sum(residual_inverses[p][a, b] * v for (p, a, b), v in self.yy_parts.items()))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``C x = rhs`` in the original order (vector or matrix)."""
        solution = self.factor(rhs[self.order])
        out = np.empty_like(solution)
        out[self.order] = solution
        return out

    def logdet(self) -> float:
        return float(self.factor.logdet())

    def selected_inverse_on_pattern(self) -> np.ndarray:
        """C⁻¹ on C's own pattern (aligned with ``matrix.data``): Takahashi's
        recurrences on the supernodal factor."""
        lower = cholmod_lower_factor(self.factor)
        values = kernels.selected_inverse_supernodal(
            lower.indptr.astype(np.int64), lower.indices.astype(np.int64), lower.data)
        where = np.empty(self.n, dtype=np.int64)
        where[self.factor_perm] = np.arange(self.n)
        return kernels.lookup_symmetric(lower.indptr.astype(np.int64),
                                        lower.indices.astype(np.int64), values,
                                        where[self.pattern_rows], where[self.pattern_cols])

    def inverse_diagonal(self, inverse_on_pattern: np.ndarray, unknowns: np.ndarray) -> np.ndarray:
        """C⁻¹'s diagonal at unknowns (original order) from the pattern's values."""
        p = self.position[unknowns]
        return inverse_on_pattern[self.matrix.indptr[p]]   # the diagonal leads each column


# --------------------------------------------------------------------------- parameters
def _vech_pairs(k: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(k) for b in range(a + 1)]


class Parameters:
    """The (co)variance matrices and their Cholesky parametrisation: first every
    effect's G0, then R0, each ``V = S L L' S`` with S a fixed diagonal of scales (the
    start's standard deviations, so that θ has no units: milk in kg or in g gives the
    same iterations) and L lower triangular with log diagonal.

    The log diagonals are kept at or above ``LOG_FLOOR``: a conditional variance below
    1e-6 of its scale is a variance at its boundary (0), and closer to it ``log|G0|``
    and ``log|C|`` cancel catastrophically (``G0⁻¹`` swamps C).
    """

    def __init__(self, sizes: list[int], n_genetic: int | None = None):
        self.sizes = sizes
        self.pairs = [_vech_pairs(k) for k in sizes]
        self.slices, start = [], 0
        for pairs in self.pairs:
            self.slices.append(slice(start, start + len(pairs)))
            start += len(pairs)
        self.n = start
        self.scales = [np.ones(k) for k in sizes]
        self.is_diagonal = np.array([a == b for pairs in self.pairs for a, b in pairs])
        self.lower = np.where(self.is_diagonal, LOG_FLOOR, -np.inf)
        # which θ belong to the residual matrix (the last)
        self.is_residual = np.zeros(self.n, dtype=bool)
        self.is_residual[self.slices[-1]] = True

    def set_scales(self, matrices: list[np.ndarray]) -> None:
        self.scales = [np.sqrt(np.diag(m)) for m in matrices]

    def to_theta(self, matrices: list[np.ndarray]) -> np.ndarray:
        out = []
        for m, scale in zip(matrices, self.scales):
            L = np.linalg.cholesky(m / np.outer(scale, scale))
            out += [np.log(L[a, a]) if a == b else L[a, b] for a, b in _vech_pairs(len(m))]
        return np.array(out)

    def factors(self, theta: np.ndarray) -> list[np.ndarray]:
        """The scaled factors L (``V = S L L' S``)."""
        out = []
        for k, pairs, sl in zip(self.sizes, self.pairs, self.slices):
            L = np.zeros((k, k))
            for (a, b), value in zip(pairs, theta[sl]):
                L[a, b] = np.exp(value) if a == b else value
            out.append(L)
        return out

    def matrices(self, theta: np.ndarray) -> list[np.ndarray]:
        return [np.outer(s, s) * (L @ L.T) for L, s in zip(self.factors(theta), self.scales)]

    def chain(self, theta: np.ndarray, gradients: list[np.ndarray]) -> np.ndarray:
        """∂f/∂θ from each matrix's symmetric gradient Γ = ∂f/∂V:
        ``∂f/∂L = 2 S Γ S L``, times ``L_aa`` on the log diagonal."""
        out = []
        for L, gamma, pairs, s in zip(self.factors(theta), gradients, self.pairs, self.scales):
            dL = 2.0 * (np.outer(s, s) * gamma) @ L
            out += [dL[a, b] * (L[a, a] if a == b else 1.0) for a, b in pairs]
        return np.array(out)

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        """∂ vech(V) / ∂θ, block diagonal over the matrices."""
        J = np.zeros((self.n, self.n))
        for L, pairs, sl, s in zip(self.factors(theta), self.pairs, self.slices, self.scales):
            for col, (c, d) in enumerate(pairs):
                dL = np.zeros_like(L)
                dL[c, d] = L[c, c] if c == d else 1.0
                dV = np.outer(s, s) * (dL @ L.T + L @ dL.T)
                J[sl.start:sl.stop, sl.start + col] = [dV[a, b] for a, b in pairs]
        return J

    def at_floor(self, theta: np.ndarray) -> np.ndarray:
        return self.is_diagonal & (theta <= LOG_FLOOR + 1e-9)


# --------------------------------------------------------------------------- REML
@dataclass
class REMLState:
    theta: np.ndarray
    objective: float
    solution: np.ndarray
    residuals: np.ndarray = None
    gradient: np.ndarray = None     # ∂(−2ℓ)/∂θ
    hessian: np.ndarray = None      # AI approximation of ∂²(−2ℓ)/∂θ² (2 AI)
    hessian_vech: np.ndarray = None  # the same in the (co)variances
    inverse_on_pattern: np.ndarray = None
    em_matrices: list = None


class MultivariateREML:
    """−2 log restricted likelihood of a :class:`MultivariateDesign`, its exact score
    and average information."""

    def __init__(self, design: MultivariateDesign, equations: GeneralEquations | None = None):
        self.design = design
        self.eq = equations or GeneralEquations(design)
        self.params = Parameters([e.k for e in design.effects] + [design.n_traits])
        self.n_fixed_like = design.n_fixed + sum(e.n_groups * e.k for e in design.effects) \
            - len(design.dropped_groups) - len(design.empty_groups)
        self.dof = design.n_long - self.n_fixed_like
        self.n_evaluations = 0
        self.random_index = [self._effect_unknowns(e) for e in design.effects]

    def _effect_unknowns(self, effect: Effect) -> np.ndarray:
        """Positions (in the equations) of an effect's unknowns, level-major, −1 for
        unknowns dropped (confounded groups)."""
        return kept_columns(self.design, effect.offset + np.arange(effect.n_levels * effect.k))

    def residual_inverses(self, R0: np.ndarray) -> tuple[list[np.ndarray], float]:
        out, logdet = [], 0.0
        for traits, index in self.design.patterns:
            block = R0[np.ix_(traits, traits)]
            sign, value = np.linalg.slogdet(block)
            if sign <= 0:
                raise np.linalg.LinAlgError("residual covariance not positive definite")
            out.append(np.linalg.inv(block))
            logdet += len(index) * value
        return out, logdet

    def evaluate(self, matrices: list[np.ndarray]) -> tuple[float, np.ndarray]:
        """−2ℓ and the solutions at the (co)variance matrices (G0s then R0)."""
        design, eq = self.design, self.eq
        *G0s, R0 = matrices
        W, logdet_R = self.residual_inverses(R0)
        g_inv, logdet_G = [], 0.0
        for effect, G0 in zip(design.effects, G0s):
            sign, value = np.linalg.slogdet(G0)
            if sign <= 0:
                raise np.linalg.LinAlgError("G0 not positive definite")
            g_inv.append(np.linalg.inv(G0))
            logdet_G += effect.rank * value + effect.k * effect.logdet
        eq.fill(W, g_inv)
        self.factored_at = None
        eq.factorize()
        self.factored_at = [np.array(m, dtype=float) for m in matrices]
        rhs = eq.rhs(W)
        solution = eq.solve(rhs)
        ypy = eq.yy(W) - float(solution @ rhs)
        self.n_evaluations += 1
        value = (self.dof * np.log(2 * np.pi) + eq.logdet() + logdet_R + logdet_G + ypy)
        return float(value), solution

    def objective(self, theta: np.ndarray) -> float:
        from sksparse.cholmod import CholmodError

        try:
            return self.evaluate(self.params.matrices(theta))[0]
        except (np.linalg.LinAlgError, CholmodError):  # C not positive definite there
            return np.inf

    def factor_at(self, matrices: list[np.ndarray]) -> None:
        """Make the equations' factor that of these (co)variance matrices (a trial
        step of AI-REML may have left another in place)."""
        held = getattr(self, "factored_at", None)
        if held is None or len(held) != len(matrices) or not all(
                np.array_equal(a, b) for a, b in zip(held, matrices)):
            self.evaluate(matrices)

    def effect_solutions(self, solution: np.ndarray, e: int) -> np.ndarray:
        """Levels x components of effect e (0 for dropped groups)."""
        effect = self.design.effects[e]
        index = self.random_index[e]
        values = np.where(index >= 0, solution[np.maximum(index, 0)], 0.0)
        return values.reshape(effect.n_levels, effect.k)

    def state(self, theta: np.ndarray, derivatives: bool = True,
              matrices: list | None = None) -> REMLState:
        """−2ℓ at θ (or at the given matrices, whose θ it is), and with
        ``derivatives`` its exact gradient and the AI matrix."""
        if matrices is None:
            matrices = self.params.matrices(theta)
        value, solution = self.evaluate(matrices)
        st = REMLState(theta=np.array(theta), objective=value, solution=solution)
        st.residuals = self.design.y - self.design.T @ solution
        if derivatives:
            self._derivatives(st, matrices)
        return st

    def _derivatives(self, st: REMLState, matrices) -> None:
        design, eq = self.design, self.eq
        *G0s, R0 = matrices
        W, _ = self.residual_inverses(R0)
        inverse = eq.selected_inverse_on_pattern()
        st.inverse_on_pattern = inverse
        traces = {}
        for part in eq.parts:
            traces[part.kind, part.which, part.a, part.b] = float(
                np.sum(part.weights * part.values * inverse[part.positions]))
        gammas, em = [], []
        u_hat = []
        for e, (effect, G0) in enumerate(zip(design.effects, G0s)):
            k = effect.k
            trace = np.zeros((k, k))
            for a in range(k):
                for b in range(a, k):
                    t = traces["g", e, a, b]
                    trace[a, b] = trace[b, a] = t if a == b else t / 2.0
            U = self.effect_solutions(st.solution, e)
            quad = U.T @ (effect.precision @ U)
            Gi = np.linalg.inv(G0)
            gammas.append(effect.rank * Gi - Gi @ (trace + quad) @ Gi)
            em.append((trace + quad) / effect.rank)
            u_hat.append(self._genetic_deviations(effect, U))
        gamma_R = np.zeros_like(R0)
        residual_blocks = []
        for p, ((traits, index), Wp) in enumerate(zip(design.patterns, W)):
            m = len(traits)
            trace = np.zeros((m, m))
            for a in range(m):
                for b in range(a, m):
                    t = traces["data", p, a, b]
                    trace[a, b] = trace[b, a] = t if a == b else t / 2.0
            E = st.residuals[index]
            residual_blocks.append(E)
            block = len(index) * Wp - Wp @ (trace + E.T @ E) @ Wp
            gamma_R[np.ix_(traits, traits)] += block
        gammas.append(gamma_R)
        st.gradient = self.params.chain(st.theta, gammas)
        st.em_matrices = em
        # average information: working variates f_k = ∂V/∂φ_k P y, one per (co)variance
        F = []
        for e, (effect, G0) in enumerate(zip(design.effects, G0s)):
            Gi = np.linalg.inv(G0)
            for a, b in _vech_pairs(effect.k):
                D = np.zeros((effect.k, effect.k))
                D[a, b] = D[b, a] = 1.0
                V = u_hat[e] @ Gi @ D                      # levels x k
                full = np.zeros(design.n_unknowns)
                index = self.random_index[e]
                ok = index >= 0
                full[index[ok]] = V.ravel()[ok]
                F.append(design.T @ full)
        for a, b in _vech_pairs(design.n_traits):
            D = np.zeros((design.n_traits, design.n_traits))
            D[a, b] = D[b, a] = 1.0
            f = np.zeros(design.n_long)
            for (traits, index), Wp, E in zip(design.patterns, W, residual_blocks):
                Dp = D[np.ix_(traits, traits)]
                f[index] = E @ Wp @ Dp
            F.append(f)
        F = np.column_stack(F)
        WF = np.empty_like(F)
        for (traits, index), Wp in zip(design.patterns, W):
            # rows of one pattern: (n_p x |P|) blocks times W_P, for every column of F
            block = F[index]                               # n_p x |P| x m
            WF[index] = np.einsum("ipm,pq->iqm", block, Wp)
        B = design.T.T @ WF
        H = F.T @ WF - B.T @ eq.solve(B)
        H = (H + H.T) / 2.0
        st.hessian_vech = H
        J = self.params.jacobian(st.theta)
        st.hessian = J.T @ H @ J

    def _genetic_deviations(self, effect: Effect, U: np.ndarray) -> np.ndarray:
        """The random part of an effect's solutions: with groups, ``a = a* − Q ĝ`` on
        the animals (the groups' own rows 0)."""
        if not effect.n_groups:
            return U
        out = np.zeros_like(U)
        n = effect.rank
        out[:n] = U[:n] - effect.group_contributions @ U[n:]
        return out


@dataclass
class AIResult:
    theta: np.ndarray
    objective: float
    converged: bool
    iterations: int
    history: list
    message: str
    state: REMLState


def fit_ai_reml(reml: MultivariateREML, start: list[np.ndarray], verbose=False,
                max_iterations: int = AI_MAX_ITERATIONS) -> AIResult:
    """Average-information REML from the start matrices (see the module docstring)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _fit_ai_reml(reml, start, verbose, max_iterations)


def _fit_ai_reml(reml, start, verbose, max_iterations) -> AIResult:
    params = reml.params
    params.set_scales(start)
    theta = np.maximum(params.to_theta(start), params.lower)
    t0 = time.perf_counter()
    run = _ai_iterations(reml, theta, verbose, max_iterations, t0)
    # a covariance matrix left near singular (or a stalled run) may sit beside a lower
    # optimum on the boundary where the whole matrix is 0 (a random regression whose
    # animal variance vanishes): −2ℓ there is evaluated, and AI-REML restarted from it
    # when it is lower
    tried = set()
    while True:
        theta, st = run[0], run[1]
        candidates = []
        for i, sl in enumerate(params.slices[:-1]):
            matrix = params.matrices(theta)[i]
            d = np.sqrt(np.diag(matrix))
            near = np.linalg.eigvalsh(matrix / np.outer(d, d)).min() < 1e-4
            if i in tried or not (near or not run[2]):
                continue
            candidate = theta.copy()
            candidate[sl] = np.where(params.is_diagonal[sl], LOG_FLOOR, 0.0)
            candidates.append((i, candidate))
        improved = False
        for i, candidate in candidates:
            tried.add(i)
            if not np.isfinite(reml.objective(candidate)):
                continue
            if verbose:
                print(f"AI-REML: restarting with covariance matrix {i + 1} at 0",
                      file=sys.stderr)
            restarted = _ai_iterations(reml, candidate, verbose, max_iterations, t0)
            if restarted[1].objective < st.objective - 1e-9 * max(1.0, abs(st.objective)):
                run = (restarted[0], restarted[1], restarted[2], restarted[3],
                       run[4] + restarted[4])
                improved = True
                break
        if not improved:
            # the state of the run kept (the equations now hold a restart's last values)
            if candidates:
                run = (run[0], reml.state(run[0]), run[2], run[3], run[4])
            break
    theta, st, converged, message, history = run
    return AIResult(theta, st.objective, converged, len(history) - 1, history, message, st)


def _ai_iterations(reml, theta, verbose, max_iterations, t0):
    """AI-REML iterations from θ: (θ, state, converged, message, history)."""
    params = reml.params
    st = reml.state(theta)
    history = [(theta.copy(), st.objective)]
    converged, message = False, "iteration limit reached"
    damping = 0.0
    stalled = 0
    for iteration in range(1, max_iterations + 1):
        g, H = st.gradient, st.hessian
        # variances at their floor that −2ℓ would push lower stay there (active set)
        floor = params.at_floor(theta)
        held = floor & (g > 0)
        for _ in range(len(theta) + 1):
            step = _newton_step(g, H, ~held)
            # a variance at its floor that the Newton step takes lower is held too
            # (projecting the step instead crawls along the floor)
            lower = floor & ~held & (step < 0)
            if not lower.any():
                break
            held |= lower
        decrement = float(-g @ step)
        if decrement < AI_TOLERANCE and iteration > 1:
            converged, message = True, "Newton decrement below tolerance"
            break
        # Levenberg-Marquardt: a step that does not lower −2ℓ is retried with the
        # AI matrix's diagonal weighted up (towards a scaled gradient step, in every
        # direction at once: halving the Newton step stalls where the AI matrix is
        # poorly conditioned, as near a singular G0)
        accepted = None
        for attempt in range(14):
            trial = step if damping == 0 else _newton_step(g, H, ~held, damping)
            longest = np.abs(trial).max()
            if longest > MAX_STEP:
                trial = trial * (MAX_STEP / longest)
            candidate = np.maximum(theta + trial, params.lower)
            value = reml.objective(candidate)
            if np.isfinite(value) and value <= st.objective + 1e-12 * abs(st.objective):
                accepted = candidate
                break
            damping = 1e-3 if damping == 0 else damping * 10.0
        how = "AI step" if damping == 0 else f"AI step, damping {damping:.0e}"
        damping = damping / 10.0 if damping > 1e-3 else 0.0
        if accepted is None:
            # EM-REML on the G0s (always positive definite), R0 kept
            *_, R0 = params.matrices(theta)
            try:
                candidate = np.maximum(params.to_theta(list(st.em_matrices) + [R0]),
                                       params.lower)
                value = reml.objective(candidate)
            except np.linalg.LinAlgError:
                value = np.inf
            if np.isfinite(value) and value < st.objective:
                accepted, how = candidate, "EM step"
        if accepted is None:
            converged = decrement < 1e-4
            message = ("no step lowers -2 log L further (at the optimum to rounding)"
                       if converged else "no step lowers -2 log L; stopped")
            break
        change = st.objective - value
        stalled = stalled + 1 if change <= 0 else 0
        if stalled >= 3:
            converged, message = decrement < 1e-4, "no step lowers -2 log L; stopped"
            break
        theta = accepted
        if (np.any(theta[params.is_diagonal] > 30.0)
                or np.any(np.abs(theta[~params.is_diagonal]) > 1e6)):
            # a variance beyond e^60 of its start: diverging
            converged, message = False, "the (co)variances diverge"
            st = reml.state(theta)
            break
        st = reml.state(theta)
        history.append((theta.copy(), st.objective))
        if verbose:
            print(f"AI-REML {iteration:3d}: -2logL = {st.objective:.6f} ({how}, "
                  f"change {change:.3g}, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if change < AI_TOLERANCE * max(1.0, abs(st.objective)) * 1e-2 and decrement < 1e-6:
            converged, message = True, "-2 log L changes below tolerance"
            break
        if (len(history) > 5 and history[-6][1] - st.objective
                < 1e-10 * max(1.0, abs(st.objective))):
            # near a boundary the AI matrix is poorly conditioned and its Newton
            # decrement overstates what is left: five iterations without progress end
            converged, message = True, "-2 log L no longer changes (5 iterations)"
            break
    return theta, st, converged, message, history


def _newton_step(g, H, free, damping: float = 0.0) -> np.ndarray:
    """``−(H + λ h̄ I)⁻¹ g`` over the free parameters (0 for the others; h̄ the mean
    diagonal of H)."""
    step = np.zeros_like(g)
    if not free.any():
        return step
    Hf = H[np.ix_(free, free)]
    # Levenberg's damping (the identity, scaled): Marquardt's diag(H) leaves alone the
    # directions the AI matrix hardly sees (an off-diagonal below a diagonal at its floor)
    Hf = Hf + damping * np.mean(np.abs(np.diag(Hf))) * np.eye(len(Hf))
    try:
        step[free] = -np.linalg.solve(Hf + 1e-12 * np.abs(np.diag(Hf)).max()
                                      * np.eye(len(Hf)), g[free])
    except np.linalg.LinAlgError:
        step[free] = -g[free] / max(np.abs(np.diag(Hf)).max(), 1.0)
    return step


def start_matrices(design: MultivariateDesign) -> list[np.ndarray]:
    """Start: each trait's residual variance after the fixed effects (least squares),
    split evenly between the residual and the random effects (a random-regression
    coefficient's share divided by its covariable's mean square); no correlations."""
    resid = design.y     # already free of the least-squares fixed-effect fit
    variance = np.array([max(np.var(resid[design.long_trait == t]), 1e-300)
                         for t in range(design.n_traits)])
    share = 0.5 / max(len(design.effects), 1)
    out = []
    for effect in design.effects:
        diag = np.empty(effect.k)
        for c in range(effect.k):
            cols = kept_columns(design, effect.offset + np.arange(effect.rank) * effect.k + c)
            z2 = np.asarray(design.T[:, cols[cols >= 0]].power(2).sum(axis=1)).ravel()
            used = z2[design.long_trait == effect.component_trait[c]]
            scale = used.mean() if used.size and used.mean() > 0 else 1.0
            diag[c] = share * variance[effect.component_trait[c]] / scale
        out.append(np.diag(diag))
    out.append(np.diag(0.5 * variance))
    return out
