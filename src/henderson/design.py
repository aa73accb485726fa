"""Stage 2 of the pipeline: the design.

Turns a :class:`~henderson.formula.ParsedFormula` and a pandas DataFrame into arrays:
the response ``y``, prior weights, the fixed-effects matrix ``X`` (via formulaic) and
one :class:`RandomTerm` per random term, each holding its integer level codes, its
``n x k`` covariate matrix ``z``, its level labels and its relative covariance factor.
``Z`` itself is only assembled (as CSC) when asked for.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import formulaic
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import DataError, FormulaError, RankDeficiencyWarning
from .formula import ParsedFormula, RandomBar, parse_formula

_CATEGORY_COLUMN = re.compile(r"^(?P<var>.+?)\[(?:T\.)?(?P<level>.*)\]$")


def lme4_column_name(name: str) -> str:
    """Rename formulaic's column names the way R prints them.

    ``Intercept`` -> ``(Intercept)``, ``dept[T.5]`` -> ``dept5``, ``a[T.x]:b`` -> ``ax:b``.
    """
    if name == "Intercept":
        return "(Intercept)"
    pieces = []
    for piece in name.split(":"):
        match = _CATEGORY_COLUMN.match(piece)
        pieces.append(match["var"] + match["level"] if match else piece)
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

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_coefs(self) -> int:
        return self.z.shape[1]

    @property
    def n_theta(self) -> int:
        k = self.n_coefs
        return k * (k + 1) // 2

    @property
    def n_columns(self) -> int:
        """Columns of Z that belong to this term (levels x coefficients)."""
        return self.n_levels * self.n_coefs

    def theta_lower_bounds(self) -> np.ndarray:
        """0 for diagonal elements of Λ_t, -inf for the off-diagonal ones."""
        k = self.n_coefs
        rows, cols = np.tril_indices(k)
        order = np.lexsort((rows, cols))  # column by column, as lme4
        return np.where(rows[order] == cols[order], 0.0, -np.inf)

    def theta_start(self) -> np.ndarray:
        return np.where(np.isfinite(self.theta_lower_bounds()), 1.0, 0.0)

    def relative_factor(self, theta_t: np.ndarray) -> np.ndarray:
        """The k x k lower-triangular Λ_t from this term's slice of θ."""
        k = self.n_coefs
        rows, cols = np.tril_indices(k)
        order = np.lexsort((rows, cols))
        lam = np.zeros((k, k))
        lam[rows[order], cols[order]] = theta_t
        return lam

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

    Terms are stored in lme4's order (decreasing number of levels), which is also the
    order of θ and of the columns of Z.
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
    def Z(self) -> sp.csc_matrix:
        """The random-effects model matrix, n x q, CSC."""
        return sp.hstack([t.z_matrix() for t in self.terms], format="csc")


def _grouping_factor(data: pd.DataFrame, bar: RandomBar) -> tuple[np.ndarray, pd.Index]:
    """Integer codes and labels of the (interaction of the) grouping columns.

    Levels follow a categorical's category order, otherwise sorted values; for an
    interaction the first factor varies slowest, as R's ``a:b``. Unused levels are
    dropped, as lme4 does.
    """
    codes = np.zeros(len(data), dtype=np.int64)
    labels: list[np.ndarray] = []
    for name in bar.factors:
        column = data[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            cats = column.cat.categories
            col_codes = column.cat.codes.to_numpy().astype(np.int64)
        else:
            col_codes, cats = pd.factorize(column, sort=True)
            col_codes = col_codes.astype(np.int64)
        codes = codes * len(cats) + col_codes
        labels.append(np.asarray(cats.astype(str)))
    used, level_codes = np.unique(codes, return_inverse=True)
    parts = []
    for lab in reversed(labels):
        parts.append(lab[used % len(lab)])
        used = used // len(lab)
    parts.reverse()
    names = parts[0] if len(parts) == 1 else [":".join(p) for p in zip(*parts)]
    return level_codes.astype(np.int64), pd.Index(names, name=bar.group)


def _model_matrix(spec: str, data: pd.DataFrame, sparse: bool = False):
    try:
        matrix = formulaic.model_matrix(spec, data, na_action="raise",
                                        output="sparse" if sparse else "pandas")
    except FormulaError:
        raise
    except Exception as exc:  # formulaic raises many types; give one of ours
        raise FormulaError(f"cannot build model matrix for {spec!r}: {exc}") from exc
    names = [lme4_column_name(c) for c in matrix.model_spec.column_names]
    if sparse:
        return sp.csc_matrix(matrix, dtype=np.float64), names, matrix.model_spec
    return np.asarray(matrix, dtype=np.float64), names, matrix.model_spec


def _required_columns(formula: ParsedFormula) -> list[str]:
    columns: list[str] = []
    try:
        for spec in [formula.fixed] + [b.lhs for b in formula.bars]:
            columns.extend(sorted(formulaic.Formula(spec).required_variables))
    except Exception as exc:
        raise FormulaError(f"cannot parse formula {formula.text!r}: {exc}") from exc
    for bar in formula.bars:
        columns.extend(bar.factors)
    return list(dict.fromkeys([formula.response] + columns))


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _used_columns(formula: ParsedFormula, available) -> list[str]:
    """The columns a model reads: formulaic's required variables, plus names that only
    appear inside stateful transforms (formulaic 1.2 leaves ``Days`` out of
    ``center(Days)``'s required variables)."""
    columns = _required_columns(formula)
    available = set(map(str, available))
    for spec in [formula.fixed] + [b.lhs for b in formula.bars]:
        for name in _IDENTIFIER.findall(spec):
            if name in available and name not in columns:
                columns.append(name)
    return columns


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
    warnings.warn(
        f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
        f"column(s): {', '.join(dropped)}",
        RankDeficiencyWarning,
        stacklevel=3,
    )
    return X[:, kept], [names[j] for j in kept], dropped


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
        weight_values = data[weights].to_numpy(dtype=np.float64)
    elif weights is not None:
        weight_values = np.asarray(weights, dtype=np.float64)
        if weight_values.shape != (len(data),):
            raise DataError(f"weights must have length {len(data)}, got {weight_values.shape}")

    frame = data[columns]
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
                "clean them or pass missing='drop'"
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

    return frame, weight_values


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
            codes = pd.Index([str(c) for c in cats]).get_indexer(column.astype(str))
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


def _wants_sparse_fixed(formula: ParsedFormula, frame: pd.DataFrame, sparse_fixed) -> bool:
    if sparse_fixed != "auto":
        return bool(sparse_fixed)

    levels = 0
    for name in formulaic.Formula(formula.fixed).required_variables:
        column = frame[name]
        if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype == object \
                or pd.api.types.is_string_dtype(column):
            levels += column.nunique()
    return levels > SPARSE_FIXED_LEVELS


def level_labels(frame: pd.DataFrame, factors) -> np.ndarray:
    """The level label of every row, as :func:`_grouping_factor` names levels
    (``"a:b"`` for an interaction)."""
    parts = [frame[name].astype(str).to_numpy() for name in factors]
    if len(parts) == 1:
        return parts[0]
    out = parts[0].astype(object)
    for part in parts[1:]:
        out = out + ":" + part
    return out


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
    """Grouping factor -> :class:`~henderson.RelationshipMatrix`, each a factor of the
    formula's random terms."""
    from .genomic import as_relationship

    relationships = dict(relationships or {})
    unknown = [g for g in relationships if g not in {b.group for b in formula.bars}]
    if unknown:
        raise FormulaError(f"relationships given for {', '.join(map(repr, unknown))}, which "
                           "is not the grouping factor of any random term")
    return {group: as_relationship(known) for group, known in relationships.items()}


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
        raise FormulaError(f"random term ({bar.lhs} | {bar.group}) has no columns")
    term = RandomTerm(bar.group, level_codes, levels, z, coef_names, z_spec=z_spec,
                      factors=bar.factors)
    if known is not None:
        term.level_precision = known.precision()
        term.logdet_level_covariance = known.logdet()
        term.level_variance = known.diagonal()
        return term
    check_levels(bar, levels)
    if term.n_columns >= n_obs:
        raise DataError(
            f"number of observations (={n_obs}) <= number of random effects "
            f"(={term.n_columns}) for term ({bar.lhs} | {bar.group}); the "
            "random-effects parameters and the residual variance are unidentifiable"
        )
    return term


def build_design(
    formula: str | ParsedFormula,
    data: pd.DataFrame,
    weights: str | np.ndarray | None = None,
    missing: str = "raise",
    relationships: dict | None = None,
    sparse_fixed: bool | str = "auto",
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
        more than 100 levels. Aliased columns are not detected in a sparse X.

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
    parsed = parse_formula(formula) if isinstance(formula, str) else formula
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError("data has no rows")
    if missing not in ("raise", "drop"):
        raise ValueError("missing must be 'raise' or 'drop'")
    columns = _used_columns(parsed, data.columns)
    check_columns(columns, data.columns)
    frame, weight_values = select_rows(data, columns, weights, missing)

    y_col = frame[parsed.response]
    if not pd.api.types.is_numeric_dtype(y_col) or pd.api.types.is_bool_dtype(y_col):
        raise DataError(f"response {parsed.response!r} must be numeric")
    y = y_col.to_numpy(dtype=np.float64)
    n = len(y)

    if _wants_sparse_fixed(parsed, frame, sparse_fixed):
        X, fixed_names, fixed_spec = _model_matrix(parsed.fixed, frame, sparse=True)
        dropped = []
    else:
        X, fixed_names, fixed_spec = _model_matrix(parsed.fixed, frame)
        X, fixed_names, dropped = _drop_aliased(X, fixed_names)
    relationships = known_relationships(parsed, relationships)
    terms: list[RandomTerm] = []
    for bar in parsed.bars:
        z, coef_names, z_spec = _model_matrix(bar.lhs, frame)
        known = relationships.get(bar.group)
        if known is not None:
            labels = level_labels(frame, bar.factors)
            levels = pd.Index(known.labels, name=bar.group)
            codes = levels.get_indexer(labels).astype(np.int64)
            if np.any(codes < 0):
                raise levels_not_in_relationship(bar.group, labels[codes < 0])
        else:
            codes, levels = _grouping_factor(frame, bar)
        terms.append(random_term(bar, codes, levels, z, coef_names, z_spec, known, n))
    if not terms:
        raise FormulaError(
            f"formula {parsed.text!r} has no random term '(... | group)'; "
            "use ordinary least squares for a model without random effects"
        )
    order = sorted(range(len(terms)), key=lambda i: -terms[i].n_levels)
    terms = [terms[i] for i in order]
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
    )
