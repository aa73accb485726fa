"""Stage 2 of the pipeline: the design.

Turns a :class:`~henderson.formula.ParsedFormula` and a pandas DataFrame into arrays:
the response ``y``, prior weights, the fixed-effects matrix ``X`` (via formulaic) and
one :class:`RandomTerm` per random term, each holding its integer level codes, its
``n x k`` covariate matrix ``z``, its level labels and its relative covariance factor.
``Z`` itself is only assembled (as CSC) when asked for.
"""
from __future__ import annotations

import functools
import itertools
import operator
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import formulaic
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .covariance import CovarianceStructure, ResidualModel
from .covariance import structure as covariance_structure
from .errors import DataError, FormulaError, RankDeficiencyWarning
from .linalg import independent_columns
from .formula import (R_FUNCTIONS, ParsedFormula, RandomBar, parse_formula,
                      python_expression, r_labels)

_CATEGORY_COLUMN = re.compile(r"^(?P<var>.+?)\[(?:T\.)?(?P<level>.*)\]$")


def _r_operators(text: str) -> str:
    """A term as R deparses it: the operators :func:`~henderson.formula.python_expression`
    rewrote for Python back in R's spelling, names without quote_columns' backticks."""
    text = text.replace("`", "")
    for python_op, r_op in ((" ** ", "^"), (" // ", "%/%"), (" % ", "%%"), (" / ", "/")):
        text = text.replace(python_op, r_op)
    return text


def lme4_column_name(name: str) -> str:
    """Rename formulaic's column names the way R prints them.

    ``Intercept`` -> ``(Intercept)``, ``dept[T.5]`` -> ``dept5``, ``a[T.x]:b`` -> ``ax:b``.
    """
    if name == "Intercept":
        return "(Intercept)"
    pieces = []
    for piece in name.split(":"):
        match = _CATEGORY_COLUMN.match(piece)
        if match:
            pieces.append(_r_operators(match["var"]) + match["level"])
        else:
            pieces.append(_r_operators(piece))
    return ":".join(pieces)


@dataclass
class RandomTerm:
    """One random-effects term ``(z | group)``: its codes, covariates and Λ_t.

    Attributes
    ----------
    group : str
        Name of the grouping factor (``"Subject"``, ``"batch:cask"``).
    level_codes : ndarray of int64, shape (n,)
        Level of every observation, ``0 .. n_levels-1``.
    levels : pandas.Index
        Level labels in code order.
    z : ndarray, shape (n, k)
        The term's model-matrix rows (intercept, slopes).
    coef_names : list of str
        Names of the k coefficients.
    level_precision : scipy.sparse.csc_matrix or None
        ``K⁻¹`` over levels (None: identity, an ordinary grouping factor).
    logdet_level_covariance : float
        ``log|K|`` (0 for the identity).
    """

    group: str
    level_codes: np.ndarray
    levels: pd.Index
    z: np.ndarray
    coef_names: list[str]
    level_precision: sp.csc_matrix | None = None
    logdet_level_covariance: float = 0.0
    level_variance: np.ndarray | None = None  # diag(K) when known (1 + F for a pedigree)
    z_spec: object = None                      # formulaic ModelSpec of the term's covariates
    factors: tuple = ()                        # data columns forming the grouping factor
    #: the covariance structure of the k coefficients (:mod:`henderson.covariance`);
    #: lme4's unstructured one unless the formula names another
    structure: CovarianceStructure | None = None
    #: the term as the formula wrote it (``"ar1(0 + timef | subj)"``)
    label: str = ""
    #: the formulaic spec of the covariates (``"0 + Machine"``: formulaic's own
    #: ``str(z_spec.formula)`` drops the ``0 +``)
    covariates: str = ""

    def __post_init__(self):
        if self.structure is None:
            self.structure = covariance_structure("us", self.z.shape[1], self.coef_names)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_coefs(self) -> int:
        return self.z.shape[1]

    @property
    def n_theta(self) -> int:
        return self.structure.n_theta

    @property
    def n_columns(self) -> int:
        """Columns of Z that belong to this term (levels x coefficients)."""
        return self.n_levels * self.n_coefs

    def theta_lower_bounds(self) -> np.ndarray:
        """The structure's bounds: 0 for standard deviations (Λ's diagonal), −∞ else."""
        return self.structure.lower_bounds()

    def theta_start(self) -> np.ndarray:
        return self.structure.start()

    def relative_factor(self, theta_t: np.ndarray) -> np.ndarray:
        """The k x k lower-triangular Λ_t from this term's slice of θ."""
        return self.structure.relative_factor(np.asarray(theta_t, dtype=float))

    def level_block_indices(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Row and column indices in C of every level's k x k diagonal block, each of
        shape (n_levels, k, k), for a term whose columns start at ``offset``."""
        k = self.n_coefs
        base = offset + np.arange(self.n_levels)[:, None, None] * k
        shape = (self.n_levels, k, k)
        return (np.broadcast_to(base + np.arange(k)[None, :, None], shape),
                np.broadcast_to(base + np.arange(k)[None, None, :], shape))

    def z_matrix(self) -> sp.csc_matrix:
        """This term's block of Z: n x (n_levels k), column ``level*k + coef``."""
        n, k = self.z.shape
        cols = (self.level_codes[:, None] * k + np.arange(k)[None, :]).ravel()
        rows = np.repeat(np.arange(n), k)
        return sp.csc_matrix(
            (self.z.ravel(), (rows, cols)), shape=(n, self.n_columns)
        )


@dataclass
class Design:
    """Arrays of one model: ``y``, weights, ``X`` and the random terms.

    Terms are stored in lme4's order (:func:`lme4_term_order`), which is also the order
    of θ and of the columns of Z.
    """

    formula: ParsedFormula
    y: np.ndarray
    X: np.ndarray
    fixed_names: list[str]
    terms: list[RandomTerm]
    weights: np.ndarray
    dropped_fixed: list[str] = field(default_factory=list)
    response_name: str = "y"
    row_index: pd.Index | None = None
    fixed_spec: object = None                  # formulaic ModelSpec of the fixed part
    #: rows of a design whose rows were not kept (chunked and Dask fits: ``y``, ``X``,
    #: ``weights`` and each term's ``z`` and ``level_codes`` then have no rows)
    n_rows: int | None = None
    #: whether prior weights were given, for designs without rows
    prior_weights: bool | None = None
    #: the offset of every row (the response is ``y + offset``), None without one
    offset: np.ndarray | None = None
    #: the ``offset=`` argument: a column name, "array" for values given per row, or None
    offset_argument: str | None = None
    #: heterogeneous residual variances (``dispformula``), None for R = σ² W⁻¹
    residual_model: ResidualModel | None = None

    @property
    def n_obs(self) -> int:
        return len(self.y) if self.n_rows is None else self.n_rows

    @property
    def has_rows(self) -> bool:
        """False for a design built from chunks: only its cross-products exist."""
        return self.n_rows is None

    def require_rows(self, what: str) -> None:
        """Raise a clear error when ``what`` needs the rows of a chunked design."""
        if not self.has_rows:
            raise DataError(
                f"{what} needs the rows of the data, which a chunked or Dask fit does not "
                "keep (only the cross-products); use predict(data) on the rows you need, or "
                "fit in memory")

    @property
    def n_fixed(self) -> int:
        return self.X.shape[1]

    @property
    def n_random(self) -> int:
        return sum(t.n_columns for t in self.terms)

    @property
    def n_theta(self) -> int:
        return sum(t.n_theta for t in self.terms)

    @property
    def weighted(self) -> bool:
        if self.prior_weights is not None:
            return self.prior_weights
        return not np.all(self.weights == 1.0)

    def theta_slices(self) -> list[slice]:
        out, start = [], 0
        for term in self.terms:
            out.append(slice(start, start + term.n_theta))
            start += term.n_theta
        return out

    def column_offsets(self) -> np.ndarray:
        return np.cumsum([0] + [t.n_columns for t in self.terms])

    def theta_lower_bounds(self) -> np.ndarray:
        return np.concatenate([t.theta_lower_bounds() for t in self.terms])

    def theta_start(self) -> np.ndarray:
        return np.concatenate([t.theta_start() for t in self.terms])

    @property
    def n_dispersion(self) -> int:
        """Parameters of the residual model (0 without a ``dispformula``)."""
        return 0 if self.residual_model is None else self.residual_model.n_params

    def parameter_lower_bounds(self) -> np.ndarray:
        """Bounds of everything the optimisers estimate: θ, then γ."""
        extra = self.residual_model.lower_bounds() if self.residual_model else np.zeros(0)
        return np.concatenate([self.theta_lower_bounds(), extra])

    def parameter_start(self) -> np.ndarray:
        extra = self.residual_model.start() if self.residual_model else np.zeros(0)
        return np.concatenate([self.theta_start(), extra])

    @property
    def Z(self) -> sp.csc_matrix:
        """The random-effects model matrix, n x q, CSC."""
        return sp.hstack([t.z_matrix() for t in self.terms], format="csc")


def factor_codes(column: pd.Series, numbers_as_text: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (−1 for missing) and R labels of one grouping column.

    Levels follow a categorical's category order, numbers sorted by value, anything
    else sorted by label (R's order of character levels); values with the same label
    (5 and "5", 308 and 308.0) are one level, as in R, where a factor's levels are
    character strings. ``numbers_as_text`` (grouping factors) sorts text written as R
    writes numbers by value too: ids read from a file as labels keep the order they
    have as numbers (a choice of presentation; R would sort them as text).
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy().astype(np.int64)
        labels = r_labels(np.asarray(column.cat.categories))
    else:
        codes, uniques = pd.factorize(column, sort=False)
        codes = codes.astype(np.int64)
        values = np.asarray(uniques)
        labels = r_labels(values)
        if values.dtype.kind in "iuf":
            order = np.argsort(values, kind="stable")
        elif numbers_as_text and len(labels) and all(_CANONICAL_NUMBER.fullmatch(v)
                                                     for v in labels):
            # numbers read as text (ids from a CSV read as labels) keep the order their
            # values would have, whichever way the file was read
            order = np.argsort(labels.astype(float), kind="stable")
        else:
            order = np.argsort(labels.astype(str), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
        labels = labels[order]
    distinct, first = np.unique(labels.astype(str), return_index=True)
    if len(distinct) < len(labels):  # equal labels are one level, kept at the first
        keep = np.sort(first)
        merged = pd.Index(labels[keep].astype(str)).get_indexer(labels.astype(str))
        codes = np.where(codes >= 0, merged[np.maximum(codes, 0)], -1)
        labels = labels[keep]
    return codes, labels.astype(object)


#: how R writes a number (no leading zeros, no '+'): labels that are numbers as text
_CANONICAL_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?(e[-+]?[0-9]+)?")


_INTEGRAL_TEXT = re.compile(r"^(-?[0-9]+)\.0+$")


def text_labels(frame: pd.DataFrame, columns) -> pd.DataFrame:
    """Id columns read from a file as text, with integers that the file wrote as floats
    ("12.0", as pandas writes a column that had a missing value) written as R writes
    them ("12"); other text, zero-padded ids ("001") among it, is kept as it is."""
    columns = [c for c in columns if c in frame.columns]
    if not columns:
        return frame
    fixed = {c: frame[c].str.replace(_INTEGRAL_TEXT, r"\1", regex=True)
             for c in columns if pd.api.types.is_string_dtype(frame[c].dtype)
             or pd.api.types.is_object_dtype(frame[c].dtype)}
    return frame.assign(**fixed)


def row_labels(column: pd.Series) -> np.ndarray:
    """The R label of every value of a column (None where missing)."""
    codes, uniques = pd.factorize(column, sort=False)
    labels = np.append(r_labels(np.asarray(uniques)), None)
    return labels[codes]  # code −1 (missing) takes the appended None


def _grouping_factor(data: pd.DataFrame, bar: RandomBar) -> tuple[np.ndarray, pd.Index]:
    """Integer codes and labels of the (interaction of the) grouping columns.

    Levels of each column as :func:`factor_codes`; for an interaction the first factor
    varies slowest, as R's ``a:b``. Unused levels are dropped, as lme4 does. Codes are
    renumbered after each column, so that an interaction of many columns cannot
    overflow (a product of category counts above 2⁶³ wrapped round).
    """
    codes = np.zeros(len(data), dtype=np.int64)
    parts: list[np.ndarray] = []      # per column, its code of every current level
    labels: list[np.ndarray] = []
    for name in bar.factors:
        col_codes, col_labels = factor_codes(data[name], numbers_as_text=True)
        used, codes = _used_levels(codes * len(col_labels) + col_codes)
        parts = [part[used // len(col_labels)] for part in parts] + [used % len(col_labels)]
        labels.append(col_labels)
    pieces = [lab[part].astype(str) for lab, part in zip(labels, parts)]
    names = pieces[0] if len(pieces) == 1 else [":".join(p) for p in zip(*pieces)]
    index = pd.Index(list(names), name=bar.group)
    if index.has_duplicates:  # values holding ':' join to the same label
        clash = index[index.duplicated()][0]
        raise DataError(f"levels of {bar.group!r} collide: different combinations of "
                        f"{', '.join(map(repr, bar.factors))} are all labelled {clash!r} "
                        "(the values hold ':'); recode them")
    return codes.astype(np.int64).ravel(), index


def _used_levels(combined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(combined, return_inverse=True)``: the values that occur, ascending,
    and each row's index among them. Non-negative values below a few times the rows
    are counted (a pass, not a sort: 5 ms -> 0.3 ms for InstEval's 73,421 students)."""
    if len(combined) and combined.min() >= 0 and combined.max() < 4 * len(combined) + 1024:
        present = np.bincount(combined) > 0
        used = np.flatnonzero(present)
        if len(used) == len(present):
            return used, combined.copy()
        index = np.cumsum(present) - 1
        return used, index[combined]
    used, inverse = np.unique(combined, return_inverse=True)
    return used, inverse.ravel()


def _r_numbers(spec: str, data: pd.DataFrame, keep=()) -> pd.DataFrame:
    """Integer columns a spec reads, as floats: R computes with doubles, so
    ``I(x^2)`` of an integer column neither overflows nor stays integer. Columns in
    ``keep`` (grouping factors, whose labels are the integers) stay as they are."""
    names = set(_IDENTIFIER.findall(spec))
    integer = [c for c in data.columns
               if c in names and c not in keep and data[c].dtype.kind in "iu"]
    if not integer:
        return data
    # one Series at a time: DataFrame.astype with a dict took ~1 ms on any frame
    return data.assign(**{c: data[c].astype(np.float64) for c in integer})


def materialize(model_spec, data: pd.DataFrame, what: str = "newdata"):
    """A formulaic model spec evaluated on other rows (prediction, chunks), with R's
    functions; a level of a categorical the fit did not see is a :class:`DataError`
    (formulaic would encode it as the reference level, with a warning)."""
    from formulaic.errors import DataMismatchWarning

    # a column the fit encoded as a factor is one here too, its values matched to the
    # fit's levels as R labels them (formulaic would take numbers 1, 2 given for a
    # factor with levels "1", "2" as a numeric column, every dummy equal to the value)
    data = with_categories(data, {
        name: list(state["categories"])
        for name, (kind, state) in model_spec.encoder_state.items()
        if getattr(kind, "value", kind) == "categorical" and name in data.columns})
    data = _r_numbers(" ".join(map(str, model_spec.formula)), data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataMismatchWarning)
            return model_spec.get_model_matrix(data, context=R_FUNCTIONS, na_action="raise")
    except DataMismatchWarning as exc:
        levels = str(exc).split(":", 1)[-1].split(".", 1)[0].strip()
        raise DataError(f"{what} has level(s) of a fixed-effect factor that the fit did not "
                        f"see: {levels}") from None
    except (FormulaError, DataError):
        raise
    except Exception as exc:
        raise DataError(f"cannot build the model matrix for {what}: {exc}") from exc


class PlainSpecs:
    """Formulaic model specs reused across fits, for *plain* specs: every factor a
    column looked up by name — numbers (float64) or a categorical with treatment
    contrasts — or the intercept; no functions, no stateful transforms.

    Such a spec's model matrix on rows whose columns have the same kinds (the same
    categories for categoricals) is the product of those columns and 0/1 dummies, in
    formulaic's order; it is built here with NumPy (column-major, as formulaic's), with
    formulaic's spec and column names from the first fit. Formulaic took ~2.5 ms per
    spec to parse and materialise, two specs for a model with a random slope: a
    quarter of a small model's fit. Each entry is checked on the rows that make it: a
    plan that does not give formulaic's matrix bit for bit is stored as not plain, and
    formulaic builds that spec every time. A spec is learnt the second time formulaic
    builds it: checking a plan costs about what it saves once (InstEval's
    ``service * dept``: 13 ms), which a process that fits a model once never gets back.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._plans: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()   # keys built once, not learnt yet

    @staticmethod
    def key(spec: str, data: pd.DataFrame):
        """The spec and the kinds of the columns it may read (None: not reusable)."""
        names = sorted({n for n in _IDENTIFIER.findall(spec) + _BACKTICKED.findall(spec)
                        if n in data.columns})
        kinds = []
        for name in names:
            dtype = data[name].dtype
            if isinstance(dtype, pd.CategoricalDtype):
                kinds.append((name, "category", tuple(dtype.categories), dtype.ordered))
            elif dtype == np.float64:
                kinds.append((name, "float64"))
            else:
                return None
        return spec, tuple(kinds)

    def matrix(self, key, data: pd.DataFrame):
        """``(values, names, model_spec)`` from a stored plan, or None (no plan, not
        plain, or a missing value that formulaic must report)."""
        entry = self._plans.get(key)
        if entry is None:
            return None
        self._plans.move_to_end(key)
        plan, names, model_spec = entry
        values = _plain_values(plan, data)
        return None if values is None else (values, names, model_spec)

    def learn(self, key, data: pd.DataFrame, values: np.ndarray, names: list[str],
              model_spec) -> None:
        """Store the plan of a spec that formulaic just built on ``data`` (or that it is
        not plain), once it is checked against formulaic's ``values``."""
        if key in self._plans:
            return
        if key not in self._seen:
            self._seen[key] = None
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
            return
        del self._seen[key]
        plan = _plain_plan(model_spec, data)
        if plan is not None:
            mine = _plain_values(plan, data)
            if (mine is None or mine.shape != values.shape or not values.flags.f_contiguous
                    or not np.array_equal(mine, values)):
                plan = None
        self._plans[key] = None if plan is None else (plan, list(names), model_spec)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)


def _plain_plan(model_spec, data: pd.DataFrame):
    """Each column of a plain spec as its factors' pieces, ``(column, None)`` for a
    number or ``(column, code)`` for a dummy; None when the spec is not plain."""
    from formulaic.parser.types import Factor
    from formulaic.transforms.contrasts import TreatmentContrasts
    from formulaic.utils.sentinels import UNSET

    if model_spec.transform_state:
        return None
    for factor in model_spec.factors:
        if factor.eval_method == Factor.EvalMethod.LITERAL and str(factor.expr) == "1":
            continue
        if factor.eval_method != Factor.EvalMethod.LOOKUP or factor.expr not in data.columns:
            return None
    plan = []
    for structure in model_spec.structure:
        for scoped in structure.scoped_terms:
            if scoped.scale != 1:
                return None
            choices = []
            for scoped_factor in scoped.factors:
                name = scoped_factor.factor.expr
                if name not in model_spec.encoder_state or name not in data.columns:
                    return None
                kind, state = model_spec.encoder_state[name]
                kind = getattr(kind, "value", kind)
                dtype = data[name].dtype
                if kind == "numerical" and dtype == np.float64:
                    choices.append([(name, None)])
                elif kind == "categorical" and isinstance(dtype, pd.CategoricalDtype):
                    contrasts = state.get("contrasts")
                    categories = list(dtype.categories)
                    if (type(getattr(contrasts, "contrasts", None)) is not TreatmentContrasts
                            or contrasts.contrasts.base is not UNSET
                            or list(contrasts.levels) != categories
                            or list(state.get("categories", ())) != categories):
                        return None
                    first = 1 if scoped_factor.reduced else 0
                    choices.append([(name, code) for code in range(first, len(categories))])
                else:
                    return None
            # formulaic's row-wise Kronecker product: the first factor varies fastest
            plan.extend(tuple(reversed(pieces))
                        for pieces in itertools.product(*reversed(choices)))
    return tuple(plan)


def _plain_values(plan, data: pd.DataFrame) -> np.ndarray | None:
    """The model matrix of a plain spec's plan on these rows, multiplied as formulaic
    multiplies (left to right); None if a value is missing or not finite."""
    out = np.empty((len(data), len(plan)), order="F")
    pieces: dict = {}
    for j, factors in enumerate(plan):
        arrays = []
        for name, code in factors:
            if (name, code) not in pieces:
                column = data[name]
                if code is None:
                    values = column.to_numpy(dtype=np.float64)
                    if not np.all(np.isfinite(values)):
                        return None
                else:
                    codes = column.cat.codes.to_numpy()
                    if np.any(codes < 0):
                        return None
                    values = (codes == code).astype(np.float64)
                pieces[(name, code)] = values
            arrays.append(pieces[(name, code)])
        out[:, j] = functools.reduce(operator.mul, arrays) if arrays else 1.0
    return out


#: model specs reused across fits (:class:`PlainSpecs`)
PLAIN_SPECS = PlainSpecs()


def _model_matrix(spec: str, data: pd.DataFrame, sparse: bool = False):
    spec = quote_columns(spec, data.columns)
    data = _r_numbers(spec, data)
    key = None if sparse else PlainSpecs.key(spec, data)
    reused = None if key is None else PLAIN_SPECS.matrix(key, data)
    if reused is not None:
        values, names, model_spec = reused
        if values.size and not np.max(np.abs(values)) <= MAX_ABS_VALUE:
            raise DataError(f"the model matrix of {spec!r} has values beyond "
                            f"{MAX_ABS_VALUE:.0e} (or not finite): their squares overflow; "
                            "rescale the covariates")
        return values, list(names), model_spec
    try:
        matrix = formulaic.model_matrix(spec, data, na_action="raise", context=R_FUNCTIONS,
                                        output="sparse" if sparse else "pandas")
    except FormulaError:
        raise
    except Exception as exc:  # formulaic raises many types; give one of ours
        raise FormulaError(f"cannot build model matrix for {spec!r}: {exc}") from exc
    names = [lme4_column_name(c) for c in matrix.model_spec.column_names]
    values = sp.csc_matrix(matrix, dtype=np.float64) if sparse else \
        np.asarray(matrix, dtype=np.float64)
    data_values = values.data if sparse else values
    if data_values.size and not np.max(np.abs(data_values)) <= MAX_ABS_VALUE:
        raise DataError(f"the model matrix of {spec!r} has values beyond {MAX_ABS_VALUE:.0e} "
                        "(or not finite): their squares overflow; rescale the covariates")
    if key is not None:
        PLAIN_SPECS.learn(key, data, values, names, matrix.model_spec)
    return values, names, matrix.model_spec


def expression_values(expression: str, data: pd.DataFrame, what: str) -> np.ndarray:
    """An R expression of the columns (a response such as ``log(y)``, an offset),
    evaluated as formulaic evaluates ``I(...)``; one number per row."""
    spec = quote_columns(python_expression(f"I({expression})"), data.columns)
    data = _r_numbers(spec, data)
    try:
        matrix = formulaic.model_matrix(f"0 + {spec}", data, na_action="ignore",
                                        context=R_FUNCTIONS)
    except Exception as exc:
        raise FormulaError(f"cannot evaluate the {what} {expression!r}: {exc}") from exc
    values = np.asarray(matrix, dtype=np.float64)
    if values.shape != (len(data), 1):
        raise FormulaError(f"the {what} {expression!r} must give one number per row")
    return values[:, 0]


def response_and_offset(formula: ParsedFormula, frame: pd.DataFrame,
                        offset=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The response (a column or an R expression of columns) and the offset: the sum
    of the formula's ``offset(...)`` terms and of ``offset`` (a column name or an array
    of one value per row), None when there is none."""
    if formula.response_is_column:
        column = frame[formula.response]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"response {formula.response!r} must be numeric")
        y = column.to_numpy(dtype=np.float64)
    else:
        y = expression_values(formula.response, frame, "response")
    if len(y) and np.max(np.abs(y)) > MAX_ABS_VALUE:
        raise DataError(f"response {formula.response!r} reaches {np.max(np.abs(y)):.3g}: "
                        "its squares overflow; rescale it")
    if not np.all(np.isfinite(y)):
        bad = np.flatnonzero(~np.isfinite(y))
        raise DataError(f"response {formula.response!r} is missing or not finite in "
                        f"{len(bad)} row(s) (first at row {int(bad[0])})")
    return y, offset_values(formula.offsets, frame, offset)


def offset_values(offsets, frame: pd.DataFrame, offset=None) -> np.ndarray | None:
    """The sum of the ``offset(...)`` expressions and of ``offset`` (a column name or
    one value per row) on these rows; None when there is neither."""
    parts = [expression_values(text, frame, "offset") for text in offsets]
    if offset is not None:
        if isinstance(offset, str):
            if offset not in frame.columns:
                raise FormulaError(f"offset column {offset!r} not found in data")
            column = frame[offset]
            if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
                raise DataError(f"offset column {offset!r} must be numeric, not {column.dtype}")
            parts.append(column.to_numpy(dtype=np.float64))
        else:
            values = np.asarray(offset, dtype=np.float64).ravel()
            if values.shape != (len(frame),):
                raise DataError(f"offset must have one value per row ({len(frame)}), "
                                f"got {values.shape}")
            parts.append(values)
    total = None
    for part in parts:
        if not np.all(np.isfinite(part)):
            raise DataError("the offset is missing or not finite in "
                            f"{int(np.sum(~np.isfinite(part)))} row(s)")
        total = part if total is None else total + part
    return total


def predicted_offset(offsets, argument: str | None, frame: pd.DataFrame,
                     given=None) -> np.ndarray:
    """The offset of new rows for a model fitted with the formula's ``offsets`` and an
    ``offset=`` ``argument`` (a column name, "array" or None); ``given`` is the
    ``offset=`` of predict."""
    if argument is None and given is not None:
        raise DataError("this model was fitted without offset=; predict takes none")
    if argument == "array" and given is None:
        raise DataError("the model was fitted with offset= values per row: give "
                        "predict(newdata, offset=...) the offset of the new rows")
    values = offset_values(offsets, frame, given if given is not None else argument)
    return np.zeros(len(frame)) if values is None else values


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _used_columns(formula: ParsedFormula, available) -> list[str]:
    """The columns a model reads, in order: the response, the fixed part, the random
    terms' covariates and grouping factors, the offsets (:func:`spec_variables` of
    each; a name that is not a column stays, to be reported missing)."""
    expressions = [python_expression(f"I({e})") for e in
                   ([] if formula.response_is_column else [formula.response])
                   + list(formula.offsets)]
    columns = [formula.response] if formula.response_is_column else []
    for spec in [formula.fixed] + [b.lhs for b in formula.bars] + expressions:
        columns.extend(spec_variables(spec, available, missing=True))
    for bar in formula.bars:
        columns.extend(bar.factors)
    return list(dict.fromkeys(columns))


def _drop_aliased(X: np.ndarray, names: list[str], tol: float = 1e-7):
    """Drop columns of X that are linear combinations of earlier ones.

    Columns are taken in order and one is dropped when its residual after projection
    on the kept ones is below ``tol`` times its norm: the later of two aliased columns
    goes, as with R's ``qr()`` in lme4.
    """
    if X.shape[1] == 0:
        return X, names, []
    # Screen with the Gram matrix (one BLAS pass; the column-by-column projections
    # below read X four times per column: ~30 of InstEval's ~75 ms of design): the
    # squared Cholesky diagonal of X'X over its diagonal is each column's relative
    # residual² after the earlier ones. Far above tol² (1e-6 against 1e-14) no rounding
    # of X'X can turn it into an aliased column, so all are kept without projecting.
    gram = X.T @ X
    norms2 = np.diag(gram).copy()
    if np.all(norms2 > 0):
        try:
            factor = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            factor = None
        if factor is not None and np.all(np.diag(factor) ** 2 > 1e-6 * norms2):
            return X, names, []
    kept: list[int] = []
    # the orthonormal basis grows in place (column_stack copied it once per column:
    # 124 of InstEval's 180 ms of design)
    basis = np.empty((X.shape[0], X.shape[1]), order="F")
    for j in range(X.shape[1]):
        column = np.asarray(X[:, j], dtype=np.float64)
        norm = np.linalg.norm(column)
        current = basis[:, :len(kept)]
        residual = column - current @ (current.T @ column)
        residual -= current @ (current.T @ residual)  # re-orthogonalise once
        rnorm = np.linalg.norm(residual)
        if norm > 0 and rnorm > tol * norm:
            basis[:, len(kept)] = residual / rnorm
            kept.append(j)
    if len(kept) == X.shape[1]:
        return X, names, []
    dropped = [names[j] for j in range(X.shape[1]) if j not in kept]
    warn_dropped(dropped)
    return X[:, kept], [names[j] for j in kept], dropped


def _drop_aliased_sparse(X: sp.csc_matrix, names: list[str], weights: np.ndarray):
    """:func:`_drop_aliased` for a sparse X, from X'WX
    (:func:`~henderson.linalg.independent_columns`)."""

    if X.shape[1] == 0:
        return X, names, []
    keep = independent_columns((X.T @ sp.diags(weights) @ X).tocsc())
    if len(keep) == X.shape[1]:
        return X, names, []
    dropped = [names[j] for j in range(X.shape[1]) if j not in set(keep)]
    warn_dropped(dropped)
    return X[:, keep], [names[j] for j in keep], dropped


def warn_dropped(dropped: list[str]) -> None:
    """lme4's warning for fixed-effect columns dropped as aliased."""
    warnings.warn(
        f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
        f"column(s): {', '.join(dropped)}", RankDeficiencyWarning, stacklevel=4)


#: largest ratio of prior weights the equations can carry (X'WX of double precision)
MAX_WEIGHT_RATIO = 1e12
#: largest magnitude of a response or covariate value: cross-products square it
MAX_ABS_VALUE = 1e150


def check_data(data: pd.DataFrame, formula: ParsedFormula, columns: list[str]) -> None:
    """Named errors for data a model cannot read: duplicated column names, a column
    named ``Intercept`` used in the model (formulaic names the intercept so), and
    covariates of types with no numeric meaning here (dates, durations, lists)."""
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    duplicated = data.columns[data.columns.duplicated()].unique()
    if len(duplicated):
        raise DataError(f"data has duplicated column names: "
                        f"{', '.join(map(repr, map(str, duplicated)))}")
    if "Intercept" in columns:
        raise FormulaError("a column named 'Intercept' clashes with the intercept's name in "
                           "formulaic; rename the column")
    groups = {f for bar in formula.bars for f in bar.factors}
    if formula.response_is_column and formula.response in set(
            spec_variables(formula.fixed, data.columns)):
        raise FormulaError(f"the response {formula.response!r} is also on the right of '~'")
    for name in columns:
        if name not in data.columns:
            continue
        column = data[name]
        kind = column.dtype.kind
        if name not in groups and (kind in "mMc" or isinstance(column.dtype, pd.PeriodDtype)):
            if kind == "c":
                raise DataError(f"column {name!r} holds complex numbers; a model needs "
                                "real ones")
            what = {"m": "durations (timedelta)", "M": "dates/times"}.get(kind, "periods")
            raise DataError(f"column {name!r} holds {what}, which have no single numeric "
                            "meaning in a model: convert it (e.g. to days as numbers) or "
                            "make it a factor")
        if pd.api.types.is_object_dtype(column.dtype):
            sample = column.dropna().iloc[:1000]
            bad = sample.map(lambda v: isinstance(v, (list, tuple, dict, set, np.ndarray)))
            if bad.any():
                raise DataError(f"column {name!r} holds {type(sample[bad].iloc[0]).__name__}s; "
                                "a model column holds numbers or labels")


def r_factor_columns(frame: pd.DataFrame, columns) -> pd.DataFrame:
    """Object and text columns as categoricals of R labels (levels ordered as R's
    ``factor`` orders them): 5 and "5" are one level, as in R, not two columns both
    named ``x5``; a text column that held pd.NA (rows dropped) encodes as text."""
    cast = {}
    for name in columns:
        if name not in frame.columns:
            continue
        dtype = frame[name].dtype
        if pd.api.types.is_object_dtype(dtype) or (
                pd.api.types.is_string_dtype(dtype)
                and not isinstance(dtype, pd.CategoricalDtype)):
            codes, labels = factor_codes(frame[name])
            cast[name] = pd.Categorical.from_codes(codes, categories=list(labels))
    return frame.assign(**cast) if cast else frame


def select_rows(data: pd.DataFrame, columns: list[str], weights, missing: str,
                where: str = "", allow_empty: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """The used columns of the rows a fit keeps, and their prior weights.

    Rows with a missing or infinite value in a used column (or weight) raise a
    :class:`DataError` (``missing="raise"``) or are dropped (``"drop"``). ``where``
    names the chunk in messages of chunked fits.
    """
    weight_values = None
    if isinstance(weights, str):
        if weights not in data.columns:
            raise FormulaError(f"weights column {weights!r} not found in data")
        column = data[weights]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"weights column {weights!r} must be numeric, not {column.dtype}")
        weight_values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    elif weights is not None:
        try:
            weight_values = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"weights must be numbers: {exc}") from None
        if weight_values.shape != (len(data),):
            raise DataError(f"weights must have length {len(data)}, got {weight_values.shape}")

    frame = data[columns]
    # pandas deep-copies a frame's attrs into every frame and Series made from it (a
    # bundled data set carries its name there): ~35 copies in a small model's design
    frame.attrs = {}
    bad = frame.isna().to_numpy()
    numeric = frame.select_dtypes(include=[np.number])
    if numeric.shape[1]:
        bad_num = ~np.isfinite(numeric.to_numpy(dtype=np.float64))
        bad[:, [frame.columns.get_loc(c) for c in numeric.columns]] |= bad_num
    if weight_values is not None:
        bad = np.column_stack([bad, ~np.isfinite(weight_values)])
    bad_rows = bad.any(axis=1)
    if bad_rows.any():
        if missing == "raise":
            names = list(frame.columns) + (["weights"] if weight_values is not None else [])
            cols = [names[j] for j in np.flatnonzero(bad.any(axis=0))]
            raise DataError(
                f"{int(bad_rows.sum())} row(s) have missing or infinite values in "
                f"{', '.join(map(repr, cols))} (first at row {int(np.argmax(bad_rows))}{where}); "
                "clean them or pass missing='drop' (--missing drop on the command line)"
            )
        frame = frame.loc[~bad_rows]
        if weight_values is not None:
            weight_values = weight_values[~bad_rows]
        if len(frame) == 0 and not allow_empty:
            raise DataError("no rows left after dropping missing values")
    if weight_values is None:
        weight_values = np.ones(len(frame))
    elif np.any(weight_values <= 0):
        raise DataError("prior weights must be positive")
    elif len(weight_values) and weight_values.max() > MAX_WEIGHT_RATIO * weight_values.min():
        raise DataError(
            f"prior weights range from {weight_values.min():.3g} to {weight_values.max():.3g}: "
            f"a ratio above {MAX_WEIGHT_RATIO:.0e} leaves no digits in the equations; drop "
            "or rescale the extreme rows")

    return frame, weight_values


def _all_categories_used(column: pd.Series) -> bool:
    """Whether every category of a categorical column occurs in it."""
    codes = column.cat.codes.to_numpy()
    used = np.bincount(codes[codes >= 0], minlength=len(column.cat.categories))
    return bool(np.all(used > 0))


def is_categorical(column: pd.Series) -> bool:
    """Whether formulaic encodes this column as a factor (not numbers or booleans)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return True
    return not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column))


def with_categories(frame: pd.DataFrame, categories: dict[str, list]) -> pd.DataFrame:
    """Cast the named columns to categoricals with fixed categories.

    Every chunk of a chunked fit, and new data given to a saved model, then encode to
    the same model-matrix columns as the whole data did. A value outside the
    categories is a :class:`DataError`.
    """
    frame = frame.copy()
    for name, cats in categories.items():
        if name not in frame.columns:
            continue
        column = frame[name]
        present = column.notna().to_numpy()
        codes = pd.Index(list(cats)).get_indexer(column.astype(object))
        if np.any((codes < 0) & present):  # e.g. categories '0', '1' and integers from a CSV
            codes = pd.Index(r_labels(np.asarray(cats, dtype=object)).astype(str)).get_indexer(
                row_labels(column).astype(str))
        codes[~present] = -1
        unseen = (codes < 0) & present
        cast = pd.Categorical.from_codes(codes, categories=list(cats))
        if unseen.any():
            examples = pd.unique(column[unseen].astype(str))[:5]
            raise DataError(f"column {name!r} has value(s) not seen in the fit: "
                            f"{', '.join(map(repr, examples))}")
        frame[name] = cast
    return frame


#: a fixed part whose categorical columns have more levels than this is built sparse
SPARSE_FIXED_LEVELS = 100


_FACTOR_CALL = re.compile(r"(?:factor|as\.factor|as_factor|C)\(\s*([A-Za-z_.][A-Za-z0-9_.]*)")


_BACKTICKED = re.compile(r"`([^`]+)`")


@functools.lru_cache(maxsize=1024)
def _required_variables(spec: str) -> frozenset:
    """The names formulaic reads in a spec, parsed once per spec (a parse took ~0.3
    ms, and a fit asks for each spec's names three times)."""
    return frozenset(map(str, formulaic.Formula(spec).required_variables))


def spec_variables(spec: str, available, missing: bool = False) -> list[str]:
    """The data columns a formulaic spec reads.

    Names are found in the spec itself as well as by formulaic, which takes functions
    it does not know (R's ``factor``) for variables, leaves names inside stateful
    transforms out (``center(Days)``) and reads ``x.1`` as ``x``; those are corrected
    against the columns ``available``. With ``missing=True`` names that are no column
    are kept (for the caller to report).
    """
    available = set(map(str, available))
    spec = quote_columns(spec, available)
    # backticked names as plain identifiers while formulaic lists the variables
    # (formulaic before 1.2.2 parses `x.1` there as Python, and fails)
    quoted = sorted(set(_BACKTICKED.findall(spec)))
    placeholders = {f"_henderson_column_{i}": name for i, name in enumerate(quoted)}
    plain = _BACKTICKED.sub(lambda match: f"_henderson_column_{quoted.index(match[1])}", spec)
    try:
        names = {placeholders.get(name, name) for name in _required_variables(plain)}
    except Exception as exc:
        raise FormulaError(f"cannot parse {spec!r}: {exc}") from exc
    found = {n for n in _IDENTIFIER.findall(spec) + _BACKTICKED.findall(spec)
             if n in available}
    out = found | (names & available)
    if missing:
        out |= {n for n in names - available if n not in R_FUNCTIONS
                and not any(c.startswith(n + ".") for c in found)}
    return sorted(out)


def quote_columns(spec: str, columns) -> str:
    """The spec with the columns whose names formulaic would misread (``x.1``, read as
    an attribute) in backticks, as R would take them."""
    dotted = sorted((c for c in map(str, columns) if "." in c and _NAME_RE.fullmatch(c)),
                    key=len, reverse=True)
    for name in dotted:
        spec = re.sub(rf"(?<![\w.`]){re.escape(name)}(?![\w.`(])", f"`{name}`", spec)
    return spec


_NAME_RE = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")


def factor_variables(spec: str, frame: pd.DataFrame) -> list[str]:
    """Columns a spec encodes as factors: categorical columns and those inside
    ``factor(...)`` or ``C(...)``."""
    wrapped = set(_FACTOR_CALL.findall(spec))
    return [name for name in spec_variables(spec, frame.columns)
            if name in frame.columns and (name in wrapped or is_categorical(frame[name]))]


def _wants_sparse_fixed(formula: ParsedFormula, frame: pd.DataFrame, sparse_fixed) -> bool:
    if sparse_fixed != "auto":
        return bool(sparse_fixed)
    levels = sum(frame[name].nunique() for name in factor_variables(formula.fixed, frame))
    return levels > SPARSE_FIXED_LEVELS


def level_labels(frame: pd.DataFrame, factors) -> np.ndarray:
    """The level label of every row, as :func:`_grouping_factor` names levels (R's
    labels, ``"a:b"`` for an interaction); None where a value is missing."""
    parts = [row_labels(frame[name]) for name in factors]
    if len(parts) == 1:
        return parts[0]
    missing = np.zeros(len(frame), dtype=bool)
    for part in parts:
        missing |= pd.isna(part)
    out = parts[0].astype(str).astype(object)
    for part in parts[1:]:
        out = out + ":" + part.astype(str)
    out[missing] = None
    return out


def check_new_levels(frame: pd.DataFrame, factors, levels: pd.Index) -> None:
    """A :class:`DataError` naming levels of a grouping factor that the fit did not
    see (lme4's ``allow.new.levels = FALSE``)."""
    labels = level_labels(frame, factors)
    unseen = pd.Index(levels.astype(str)).get_indexer(pd.Index(labels).astype(str)) < 0
    if unseen.any():
        examples = pd.unique(labels[unseen].astype(str))[:5]
        raise DataError(f"newdata has {len(pd.unique(labels[unseen]))} level(s) of "
                        f"{':'.join(factors)!r} not in the fit ({', '.join(examples)}); "
                        "pass allow_new_levels=True (--allow-new-levels on the command line) for the population prediction there")


def check_columns(columns: list[str], available) -> None:
    """A :class:`FormulaError` naming the columns the model needs and the data lacks."""
    available = list(available)
    absent = [c for c in columns if c not in available]
    if absent:
        raise FormulaError(
            f"column(s) {', '.join(map(repr, absent))} not found in data "
            f"(available: {', '.join(map(str, available[:20]))})"
        )


def known_relationships(formula: ParsedFormula, relationships: dict | None) -> dict:
    """Grouping factor -> list of ``(name, RelationshipMatrix)``, each factor one of the
    formula's random terms. One matrix gives one term named after the factor; several
    on one factor (``{"id": [K1, K2]}`` or ``{"id": {"snp": K1, "dom": K2}}``, GCTA's
    ``--mgrm``) give one variance component each, named ``id.1``, ``id.2`` (or
    ``id.snp``, ``id.dom``)."""
    from .genomic import as_relationship

    if relationships is not None and not isinstance(relationships, dict):
        raise TypeError("relationships must be a dict: grouping factor -> pedigree or "
                        f"relationship matrix, got {type(relationships).__name__}")
    relationships = dict(relationships or {})
    unknown = [g for g in relationships if g not in {b.group for b in formula.bars}]
    if unknown:
        raise FormulaError(f"relationships given for {', '.join(map(repr, unknown))}, which "
                           "is not the grouping factor of any random term")
    known = {}
    for group, given in relationships.items():
        if isinstance(given, (list, tuple)):
            named = [(f"{group}.{i + 1}", k) for i, k in enumerate(given)]
        elif isinstance(given, dict):
            named = [(f"{group}.{name}", k) for name, k in given.items()]
        else:
            named = [(group, given)]
        if not named:
            raise DataError(f"relationships[{group!r}] is empty")
        if len(named) > 1:
            bars = [b for b in formula.bars if b.group == group]
            if any(b.lhs.replace(" ", "") not in ("1", "0+1") for b in bars):
                raise FormulaError(f"several relationship matrices on {group!r} need an "
                                   f"intercept-only term (1 | {group})")
        known[group] = [(name, as_relationship(k)) for name, k in named]
    return known


def levels_not_in_relationship(group: str, labels: np.ndarray) -> DataError:
    """The error for records whose level the relationship matrix lacks."""
    absent = pd.unique(labels)
    return DataError(f"{len(absent)} level(s) of {group!r} are not in its relationship "
                     f"matrix: {', '.join(map(str, absent[:10]))}")


def check_levels(bar: RandomBar, levels: pd.Index) -> None:
    """A random effect needs a grouping factor with two levels or more."""
    if len(levels) < 2:
        raise DataError(
            f"grouping factor {bar.group!r} has a single level "
            f"({levels[0]!r}); a random effect needs at least 2"
        )


def random_term(bar: RandomBar, level_codes: np.ndarray, levels: pd.Index, z: np.ndarray,
                coef_names: list[str], z_spec, known, n_obs: int) -> RandomTerm:
    """The :class:`RandomTerm` of a bar, with its known level covariance (or None),
    after the checks every design makes: columns, two levels, fewer random effects
    than observations."""
    if not coef_names:
        raise FormulaError(f"random term {bar.text} has no columns")
    if bar.structure in ("ar1", "toep") and "(Intercept)" in coef_names:
        raise FormulaError(f"{bar.text}: {bar.structure} runs over the columns of a "
                           "factor; write it without an intercept, e.g. "
                           f"{bar.structure}(0 + f | {bar.group})")
    if bar.structure in ("ar1", "toep") and (
            len(coef_names) < 2 or not np.all(np.isin(z, (0.0, 1.0)))
            or not np.all(z.sum(axis=1) == 1.0)):
        # a numeric column (times read from a CSV as integers) made one slope: a
        # different model, with no correlation at all
        raise FormulaError(
            f"{bar.text}: {bar.structure} runs over the levels of a factor (one "
            f"column per level, each row in one), but {bar.lhs!r} gives "
            f"{len(coef_names)} column(s) {coef_names[:4]}; make it a factor, e.g. "
            f"{bar.structure}(0 + factor(time) | {bar.group})")
    term = RandomTerm(bar.group, level_codes, levels, z, coef_names, z_spec=z_spec,
                      factors=bar.factors, label=bar.text, covariates=bar.lhs,
                      structure=covariance_structure(bar.structure, len(coef_names),
                                                     coef_names))
    if known is not None:
        term.level_precision = known.precision()
        term.logdet_level_covariance = known.logdet()
        term.level_variance = known.diagonal()
        return term
    check_levels(bar, levels)
    # a structure with a few parameters (cs, ar1, toep) is identifiable even with one
    # record per random effect; lme4's refusal is for free variances per coefficient
    if bar.structure in ("us", "diag") and term.n_columns >= n_obs:
        raise DataError(
            f"number of observations (={n_obs}) <= number of random effects "
            f"(={term.n_columns}) for term {bar.text}; the "
            "random-effects parameters and the residual variance are unidentifiable"
        )
    return term


def as_parsed_formula(formula) -> ParsedFormula:
    """A :class:`ParsedFormula` from a formula string (or one already parsed)."""
    if isinstance(formula, ParsedFormula):
        return formula
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string such as 'y ~ x + (1 | g)', got "
                           f"{type(formula).__name__}")
    return parse_formula(formula)


def _dispersion_spec(dispformula) -> str | None:
    """The right-hand side of a ``dispformula`` ("~ Sex" -> "Sex"); None for none."""
    if dispformula is None:
        return None
    if not isinstance(dispformula, str) or "~" not in dispformula:
        raise FormulaError(f"dispformula must be a one-sided formula such as '~ Sex', got "
                           f"{dispformula!r}")
    left, _, right = dispformula.partition("~")
    if left.strip() or not right.strip():
        raise FormulaError(f"dispformula must be a one-sided formula such as '~ Sex', got "
                           f"{dispformula!r}")
    spec = python_expression(right.strip())
    return None if spec.strip() == "1" else spec


def residual_model(spec: str, frame: pd.DataFrame, dispformula: str) -> ResidualModel:
    """The residual model of a ``dispformula``: its model matrix on the rows (with an
    intercept) and a label for each group of rows that share a residual variance."""
    matrix, names, model_spec = _model_matrix(spec, r_factor_columns(
        frame, spec_variables(spec, frame.columns)))
    try:
        model = ResidualModel(matrix, names, dispformula, model_spec)
    except ValueError as exc:
        raise FormulaError(str(exc)) from None
    if model.patterns is not None:
        variables = spec_variables(spec, frame.columns)
        first = [int(np.flatnonzero(model.group_codes == g)[0])
                 for g in range(len(model.patterns))]
        model.labels = [":".join(str(frame[v].iloc[i]) for v in variables) for i in first]
    return model


def grouping_only_columns(formula: ParsedFormula, available=None) -> list[str]:
    """Columns that only name levels of grouping factors (not covariates nor the
    response): read from files as text, since ids are labels ("001" is not 1)."""
    available = available if available is not None else []
    used = {formula.response}
    for spec in [formula.fixed] + [bar.lhs for bar in formula.bars]:
        used |= set(spec_variables(spec, available, missing=True))
    factors = dict.fromkeys(f for bar in formula.bars for f in bar.factors)
    return [f for f in factors if f not in used]


def lme4_term_order(n_levels: list[int]) -> list[int]:
    """The order of the random terms in lme4 (``mkReTrms``): unchanged unless some term
    has more levels than the one before it, then ``rev(order(nl))`` — by decreasing
    number of levels, terms with equally many levels in reverse formula order.

    Examples
    --------
    >>> lme4_term_order([5, 10, 10])
    [2, 1, 0]
    >>> lme4_term_order([10, 10, 5])
    [0, 1, 2]
    """
    if not any(b > a for a, b in zip(n_levels, n_levels[1:])):
        return list(range(len(n_levels)))
    ascending = sorted(range(len(n_levels)), key=lambda i: n_levels[i])  # stable, as order()
    return ascending[::-1]


def build_design(
    formula: str | ParsedFormula,
    data: pd.DataFrame,
    weights: str | np.ndarray | None = None,
    missing: str = "raise",
    relationships: dict | None = None,
    sparse_fixed: bool | str = "auto",
    offset: str | np.ndarray | None = None,
    dispformula: str | None = None,
) -> Design:
    """Build the arrays of a linear mixed model from a formula and a DataFrame.

    Parameters
    ----------
    formula : str or ParsedFormula
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas.DataFrame
    weights : str, array or None
        Prior weights (a column name or an array of length n), ``R = σ² W⁻¹``.
    missing : {"raise", "drop"}
        What to do with rows that have a missing value in a column the model uses.
    relationships : dict, optional
        Grouping-factor name -> known level covariance: a :class:`~henderson.Pedigree`
        (A, through A⁻¹), a :class:`~henderson.RelationshipMatrix` (covariance or
        precision with labels) or a labelled covariance DataFrame. Every level of the
        matrix becomes a level of the term, with or without records.
    sparse_fixed : bool or "auto"
        Build X as a sparse matrix (fixed factors with thousands of levels, e.g.
        herd-year-season). ``"auto"``: when the fixed part's categorical columns have
        more than 100 levels.
    offset : str or array, optional
        A known term of the mean, added to the formula's ``offset(...)`` terms: a
        column name or one value per row. ``y`` holds the response less the offset.
    dispformula : str, optional
        Heterogeneous residual variances, as glmmTMB's: ``"~ Sex"`` gives
        ``log σ²_i = γ₀ + γ_Female [Sex = Female]`` (:class:`~henderson.covariance.ResidualModel`).

    Returns
    -------
    Design

    Examples
    --------
    >>> import henderson as hd
    >>> d = build_design("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    >>> d.X.shape, d.Z.shape, [t.group for t in d.terms]
    ((180, 2), (180, 36), ['Subject'])
    """
    parsed = as_parsed_formula(formula)
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError("data has no rows")
    if missing not in ("raise", "drop"):
        raise ValueError(f"missing must be 'raise' or 'drop', got {missing!r}")
    offset_argument = offset if isinstance(offset, str) or offset is None else "array"
    if offset is not None and not isinstance(offset, str):
        try:
            values = np.asarray(offset, dtype=np.float64).ravel()
        except (TypeError, ValueError) as exc:
            raise DataError(f"offset must be a column name or numbers: {exc}") from None
        if values.shape != (len(data),):
            raise DataError(f"offset must have one value per row ({len(data)}), "
                            f"got shape {values.shape}")
        offset = "(offset)"  # a column, so that rows dropped for missing values go too
        data = data.assign(**{offset: values})
    dispersion_spec = _dispersion_spec(dispformula)
    dispersion_columns = spec_variables(dispersion_spec, data.columns, missing=True) \
        if dispersion_spec else []
    columns = list(dict.fromkeys(_used_columns(parsed, data.columns) + ([offset] if offset else [])
                                 + dispersion_columns))
    check_data(data, parsed, columns)
    check_columns(columns, data.columns)
    frame, weight_values = select_rows(data, columns, weights, missing)
    # R's model frame drops unused levels (lme4: drop.unused.levels = TRUE): a level with
    # no rows made an all-zero column of Z, its variance unidentified yet reported with
    # an SE, or a dispformula coefficient estimated from no data
    unused = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)
              and not _all_categories_used(frame[c])]
    if unused:   # (an assign of unchanged columns cost ~0.5 ms per fit)
        frame = frame.assign(**{c: frame[c].cat.remove_unused_categories() for c in unused})
    frame = r_factor_columns(frame, [c for c in columns if c not in
                                     {f for bar in parsed.bars for f in bar.factors}])

    y, offset_values = response_and_offset(parsed, frame, offset)
    if offset_values is not None:
        y = y - offset_values
    n = len(y)

    # the covariates' integer columns as floats once for all the specs (each spec's
    # own conversion then finds none; a pandas astype per spec was ~0.7 ms of a
    # small model's fit); grouping factors keep their integer labels
    numbers = _r_numbers(" ".join([parsed.fixed] + [bar.lhs for bar in parsed.bars]), frame,
                         keep={f for bar in parsed.bars for f in bar.factors})
    if _wants_sparse_fixed(parsed, frame, sparse_fixed):
        X, fixed_names, fixed_spec = _model_matrix(parsed.fixed, numbers, sparse=True)
        X, fixed_names, dropped = _drop_aliased_sparse(X, fixed_names, weight_values)
    else:
        X, fixed_names, fixed_spec = _model_matrix(parsed.fixed, numbers)
        X, fixed_names, dropped = _drop_aliased(X, fixed_names)
    relationships = known_relationships(parsed, relationships)
    terms: list[RandomTerm] = []
    for bar in parsed.bars:
        z, coef_names, z_spec = _model_matrix(bar.lhs, numbers)
        for name, known in relationships.get(bar.group, [(bar.group, None)]):
            if known is not None:
                labels = level_labels(frame, bar.factors)
                levels = pd.Index(known.labels, name=bar.group)
                codes = levels.get_indexer(labels).astype(np.int64)
                if np.any(codes < 0):
                    raise levels_not_in_relationship(bar.group, labels[codes < 0])
            else:
                codes, levels = _grouping_factor(frame, bar)
            term = random_term(bar, codes, levels, z, coef_names, z_spec, known, n)
            if name != bar.group:  # one of several matrices on this factor
                term.group = name
                term.label = f"{bar.text} [{name}]"
            terms.append(term)
    if not terms:
        raise FormulaError(
            f"formula {parsed.text!r} has no random term '(... | group)'; "
            "use ordinary least squares for a model without random effects"
        )
    terms = [terms[i] for i in lme4_term_order([t.n_levels for t in terms])]
    return Design(
        formula=parsed,
        y=y,
        X=X,
        fixed_names=fixed_names,
        terms=terms,
        weights=weight_values,
        dropped_fixed=dropped,
        response_name=parsed.response,
        row_index=frame.index,
        fixed_spec=fixed_spec,
        offset=offset_values,
        offset_argument=offset_argument,
        residual_model=residual_model(dispersion_spec, frame, dispformula)
        if dispersion_spec else None,
    )
