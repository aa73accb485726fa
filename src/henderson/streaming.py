"""Stage 2 for data that arrive in chunks: the design and cross-products without rows.

The mixed-model equations depend on the data only through cross-products
(:class:`~henderson.mme.CrossProducts`), and cross-products add over rows. A chunked
fit makes two passes over the chunks (Parquet row groups, CSV chunks, Dask partitions):

1. a *scan* fixes what every chunk must share: which rows are kept, the levels of each
   grouping factor (the ones the whole data would give) and the categories of each
   categorical covariate;
2. each chunk becomes a :class:`~henderson.design.Design` with those levels, and its
   cross-products are added to the total.

Memory is bounded by the size of the MME plus one chunk, not by the number of rows.
The result is a :class:`Design` without rows (``n_rows`` set) and its cross-products,
which :func:`~henderson.fit.fit_design` fits as it fits an in-memory design.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .design import (
    SPARSE_FIXED_LEVELS,
    Design,
    RandomTerm,
    _grouping_factor,
    _model_matrix,
    _used_columns,
    as_parsed_formula,
    grouping_only_columns,
    check_columns,
    check_levels,
    is_categorical,
    known_relationships,
    level_labels,
    lme4_column_name,
    levels_not_in_relationship,
    lme4_term_order,
    spec_variables,
    warn_dropped,
    random_term,
    response_and_offset,
    row_labels,
    check_data,
    text_labels,
    select_rows,
    with_categories,
)
from .errors import DataError, FormulaError
from .formula import ParsedFormula, r_labels
from .linalg import independent_columns
from .mme import CrossProducts, response_shift

#: rows per chunk when a file or DataFrame is cut into chunks
DEFAULT_CHUNK_ROWS = 1_000_000


# ---------------------------------------------------------------- sources of chunks
class ChunkedData:
    """Rows that arrive as pandas DataFrames, one chunk at a time, and can be read twice.

    Build one with :func:`chunked`; pass it to :func:`henderson.lmm` as ``data``.

    Parameters
    ----------
    read : callable
        ``read(columns)`` returns an iterator over DataFrames holding those columns.
    columns : list of str
        The columns the source has.
    name : str
        What the source is, for messages.
    """

    def __init__(self, read: Callable[[list[str]], Iterator[pd.DataFrame]],
                 columns: list[str], name: str = "chunks", text_reader=None):
        self._read = read
        self.columns = list(columns)
        self.name = name
        self._text_reader = text_reader
        self.text_columns: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"ChunkedData({self.name})"

    def reading_as_text(self, columns) -> ChunkedData:
        """This source with ``columns`` read as text where the format has no types (CSV):
        ids are labels, and "001" read as the number 1 matched no pedigree id."""
        out = copy.copy(self)
        out.text_columns = tuple(columns)
        return out

    def chunks(self, columns: list[str]) -> Iterator[pd.DataFrame]:
        """The chunks, holding ``columns``."""
        if self._text_reader is not None and self.text_columns:
            return self._text_reader(columns, [c for c in self.text_columns if c in columns])
        return self._read(columns)

    def first_chunks(self, columns: list[str]) -> Iterator[pd.DataFrame]:
        """The chunks from the first, read only as far as the caller goes."""
        return self.chunks(columns)

    def map_reduce(self, columns: list[str], func, combine, progress=None):
        """``func(chunk, where)`` on every chunk, folded with ``combine(total, part)``."""
        total, rows = None, 0
        for i, chunk in enumerate(self.chunks(columns)):
            part = func(chunk, f" of chunk {i}")
            rows += len(chunk)
            total = part if total is None else combine(total, part)
            if progress is not None:
                progress(i, rows)
        if total is None:
            raise DataError(f"{self.name} has no rows")
        return total


class DaskData:
    """A Dask DataFrame as a source of chunks: one chunk per partition, the partial
    results summed by a tree reduction on the cluster (the active ``distributed``
    client, or Dask's default scheduler)."""

    def __init__(self, frame, split_every: int = 8):
        self.frame = frame
        self.columns = list(frame.columns)
        self.name = f"Dask DataFrame with {frame.npartitions} partitions"
        self.split_every = split_every

    def first_chunks(self, columns: list[str]) -> Iterator[pd.DataFrame]:
        """The partitions from the first, each computed when the caller reaches it."""
        frame = self.frame[columns]
        for i in range(frame.npartitions):
            yield frame.get_partition(i).compute()

    def map_reduce(self, columns: list[str], func, combine, progress=None):
        import dask

        parts = self.frame[columns].to_delayed()
        tasks = [dask.delayed(func)(part, f" of partition {i}") for i, part in enumerate(parts)]
        if not tasks:
            raise DataError(f"{self.name} has no partitions")
        reduce = dask.delayed(_combine_all)
        while len(tasks) > 1:
            tasks = [reduce(combine, tasks[i:i + self.split_every])
                     for i in range(0, len(tasks), self.split_every)]
        (result,) = dask.compute(tasks[0])
        return result


def _combine_all(combine, parts):
    """Sum a list of partial results without changing any of them (Dask may hold
    them elsewhere, or recompute a task from them)."""
    total = copy.deepcopy(parts[0])
    for part in parts[1:]:
        total = combine(total, part)
    return total


def is_dask_frame(data) -> bool:
    return type(data).__module__.split(".")[0] == "dask" and hasattr(data, "to_delayed")


def chunked(source, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ChunkedData:
    """Rows to be fitted chunk by chunk, out of core.

    Parameters
    ----------
    source : str, Path, DataFrame, list of DataFrames or callable
        A Parquet file (read a batch of ``chunk_rows`` at a time, within row groups),
        a CSV file (read ``chunk_rows`` rows at a time), a DataFrame (cut into chunks),
        a list of DataFrames, or a callable returning a fresh iterator of DataFrames
        each time it is called (the data are read twice).
    chunk_rows : int
        Rows per chunk for files and DataFrames.

    Returns
    -------
    ChunkedData

    Examples
    --------
    >>> import henderson as hd
    >>> data = hd.chunked(hd.datasets.load("sleepstudy"), chunk_rows=50)
    >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", data)
    >>> round(m.objective, 3), m.nobs
    (1743.628, 180)
    """
    if isinstance(source, ChunkedData):
        return source
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
            or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"data file {str(source)!r} not found")
        if path.suffix.lower() in (".parquet", ".pq"):
            return _parquet_chunks(path, chunk_rows)
        return _csv_chunks(path, chunk_rows)
    if isinstance(source, pd.DataFrame):
        frame = source

        def read_frame(columns):
            for start in range(0, len(frame), chunk_rows):
                yield frame.iloc[start:start + chunk_rows][columns]

        return ChunkedData(read_frame, list(frame.columns), f"DataFrame of {len(frame)} rows")
    if callable(source):
        first = next(iter(source()), None)
        if first is None:
            raise DataError("the chunk source yields no chunks")

        def read_callable(columns):
            for chunk in source():
                yield _select(chunk, columns)

        return ChunkedData(read_callable, list(first.columns), "chunks")
    try:
        frames = list(source)
    except TypeError:
        frames = []
    if not frames or not all(isinstance(f, pd.DataFrame) for f in frames):
        raise DataError("chunked() needs a file path, a DataFrame, a list of DataFrames "
                        "or a callable returning DataFrames")
    return ChunkedData(lambda columns: (_select(f, columns) for f in frames),
                       list(frames[0].columns), f"{len(frames)} DataFrames")


def _select(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The columns a chunk has of those asked for (the fit names the missing ones)."""
    return frame[[c for c in columns if c in frame.columns]]


def _parquet_chunks(path: Path, chunk_rows: int) -> ChunkedData:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError("reading Parquet needs pyarrow: pip install henderson[pipeline]") \
            from exc
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as exc:
        raise DataError(f"cannot read Parquet file {str(path)!r}: {exc}") from exc

    def read(columns):
        try:
            file = pq.ParquetFile(path)
            for batch in file.iter_batches(batch_size=chunk_rows, columns=columns):
                yield batch.to_pandas()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"cannot read Parquet file {str(path)!r}: {exc}") from None

    return ChunkedData(read, list(schema.names), f"Parquet file {str(path)!r}")


def _csv_chunks(path: Path, chunk_rows: int) -> ChunkedData:
    name = f"CSV file {str(path)!r}"
    if path.is_dir():
        raise DataError(f"{name} is a folder")
    try:
        header = pd.read_csv(path, nrows=0)
    except pd.errors.EmptyDataError:
        raise DataError(f"{name} is empty (no header line)") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{name} is not a readable CSV file (Parquet bytes under a .csv "
                        f"name?): {exc}") from None

    def read(columns, text=()):
        try:
            for chunk in pd.read_csv(path, usecols=columns, chunksize=chunk_rows,
                                     dtype={c: str for c in text}):
                yield text_labels(chunk, text)
        except (UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise DataError(f"{name} cannot be read: {exc}") from None

    return ChunkedData(read, list(header.columns), name, text_reader=read)


# ---------------------------------------------------------------- pass 1: the scan
@dataclass
class ChunkScan:
    """What one pass over the chunks learns: rows kept, the combinations of grouping
    columns that occur (per random term), the values of categorical covariates."""

    n_rows: int
    combos: list[pd.DataFrame]
    values: dict[str, list]           # categorical covariate -> values in first-seen order
    ordered: dict[str, bool]          # True where the column is a pandas categorical
    weighted: bool

    def merge(self, other: ChunkScan) -> ChunkScan:
        combos = [pd.concat([a, b], ignore_index=True).drop_duplicates(ignore_index=True)
                  for a, b in zip(self.combos, other.combos)]
        values = {}
        for name in self.values:
            seen = dict.fromkeys(self.values[name])
            seen.update(dict.fromkeys(other.values[name]))
            values[name] = list(seen)
        ordered = {n: self.ordered[n] and other.ordered[n] for n in self.ordered}
        return ChunkScan(self.n_rows + other.n_rows, combos, values, ordered,
                         self.weighted or other.weighted)

    def categories(self) -> dict[str, list]:
        """Categories in the order formulaic gives the whole data: a categorical's own
        order, otherwise sorted."""
        return {name: (vals if self.ordered[name] else sorted(vals))
                for name, vals in self.values.items()}


@dataclass
class _Plan:
    """The columns a model reads and how rows are selected; sent to every chunk."""

    formula: ParsedFormula
    columns: list[str]
    covariates: list[str]             # variables of the fixed part and of the bars' lhs
    weights: str | None
    missing: str
    offset: str | None = None           # the offset= column

    def read_columns(self) -> list[str]:
        return self.columns + ([self.weights] if self.weights and
                               self.weights not in self.columns else [])

    def rows(self, chunk: pd.DataFrame, where: str):
        absent = [c for c in self.read_columns() if c not in chunk.columns]
        if absent:
            raise DataError(f"column(s) {', '.join(map(repr, absent))} missing{where}")
        check_data(chunk, self.formula, self.columns)
        frame, weights = select_rows(chunk, self.columns, self.weights, self.missing,
                                     where=where, allow_empty=True)
        # object covariates as R labels (5 and "5" one category), as in memory
        labels = {name: row_labels(frame[name]) for name in self.covariates
                  if pd.api.types.is_object_dtype(frame[name].dtype)}
        return (frame.assign(**labels) if labels else frame), weights

    def scan(self, chunk: pd.DataFrame, where: str = "") -> ChunkScan:
        frame, weights = self.rows(chunk, where)
        combos = [frame[list(bar.factors)].drop_duplicates(ignore_index=True)
                  for bar in self.formula.bars]
        values, ordered = {}, {}
        for name in self.covariates:
            column = frame[name]
            if not is_categorical(column):
                continue
            if isinstance(column.dtype, pd.CategoricalDtype):
                values[name] = list(column.cat.categories)
                ordered[name] = True
            else:
                values[name] = list(pd.unique(column))
                ordered[name] = False
        return ChunkScan(len(frame), combos, values, ordered,
                         bool(np.any(weights != 1.0)))


# ---------------------------------------------------------------- pass 2: cross-products
@dataclass
class _ChunkProducts:
    """A chunk's cross-products with the model-matrix specs that made them."""

    crossproducts: CrossProducts | None
    fixed_names: list[str]
    fixed_spec: object
    z_specs: list


def _add_products(a: _ChunkProducts, b: _ChunkProducts) -> _ChunkProducts:
    if b.crossproducts is None:
        return a
    if a.crossproducts is None:
        return b
    if a.fixed_names != b.fixed_names:
        raise DataError("chunks encode the fixed effects to different columns: "
                        f"{a.fixed_names} and {b.fixed_names}")
    a.crossproducts.add(b.crossproducts)
    return a


@dataclass
class ChunkEncoder:
    """Turns one chunk into a :class:`Design` whose level codes, fixed columns and
    categories are those of the whole data. Its terms carry no level covariance: the
    cross-products do not need it, and a pedigree's A⁻¹ need not travel to every Dask
    task."""

    plan: _Plan
    categories: dict[str, list]
    levels: list[pd.Index]            # per bar, in formula order
    known_bars: frozenset             # bars whose levels are a relationship matrix's
    term_order: list[int]
    sparse_fixed: bool
    #: β₀ of the shifted response y − Xβ₀, shared by every chunk (from the first)
    fixed_shift: np.ndarray | None = None

    def design(self, chunk: pd.DataFrame, where: str = "") -> Design | None:
        plan = self.plan
        frame, weights = plan.rows(chunk, where)
        if len(frame) == 0:
            return None
        frame = with_categories(frame, self.categories)
        y, offset = response_and_offset(plan.formula, frame, plan.offset)
        if offset is not None:
            y = y - offset
        X, fixed_names, fixed_spec = _model_matrix(plan.formula.fixed, frame,
                                                   sparse=self.sparse_fixed)
        terms = []
        for b, bar in enumerate(plan.formula.bars):
            z, coef_names, z_spec = _model_matrix(bar.lhs, frame)
            codes = _level_codes(frame, bar.factors, self.levels[b])
            if np.any(codes < 0):  # the scan saw every level, except of known matrices
                raise levels_not_in_relationship(
                    bar.group, level_labels(frame, bar.factors)[codes < 0])
            terms.append(RandomTerm(bar.group, codes, self.levels[b], z, coef_names,
                                    z_spec=z_spec, factors=bar.factors))
        stateful = [name for spec in [fixed_spec] + [t.z_spec for t in terms]
                    for name in spec.transform_state]
        if stateful:
            raise FormulaError(
                f"stateful transforms ({', '.join(stateful)}) would be computed chunk by "
                "chunk, not on the whole data; compute those columns before a chunked fit")
        return Design(formula=plan.formula, y=y, X=X,
                      fixed_names=fixed_names, terms=[terms[i] for i in self.term_order],
                      weights=weights, response_name=plan.formula.response,
                      fixed_spec=fixed_spec)

    def products(self, chunk: pd.DataFrame, where: str = "") -> _ChunkProducts:
        design = self.design(chunk, where)
        if design is None:
            return _ChunkProducts(None, [], None, [])
        return _ChunkProducts(CrossProducts.from_design(design, self.fixed_shift),
                              design.fixed_names,
                              design.fixed_spec, [t.z_spec for t in design.terms])


def _level_codes(frame: pd.DataFrame, factors, levels: pd.Index) -> np.ndarray:
    column = frame[factors[0]]
    if len(factors) == 1 and isinstance(column.dtype, pd.CategoricalDtype):
        # one lookup per category instead of one per row
        per_category = levels.get_indexer(r_labels(np.asarray(column.cat.categories))
                                          .astype(str))
        codes = column.cat.codes.to_numpy()
        return np.where(codes >= 0, per_category[codes], -1).astype(np.int64)
    return levels.get_indexer(level_labels(frame, factors)).astype(np.int64)


# ---------------------------------------------------------------- the whole stage
def chunked_design(formula, source, weights: str | None = None, missing: str = "raise",
                   relationships: dict | None = None, sparse_fixed: bool | str = "auto",
                   verbose: bool = False, offset: str | None = None
                   ) -> tuple[Design, CrossProducts]:
    """The design (without rows) and the cross-products of data read in chunks.

    Parameters
    ----------
    formula : str or ParsedFormula
    source : ChunkedData or DaskData
    weights : str, optional
        Name of the prior-weight column.
    missing, relationships, sparse_fixed
        As for :func:`henderson.design.build_design`.
    verbose : bool
        Report each chunk of both passes on stderr.

    Returns
    -------
    design : Design
        With ``n_rows`` set and no row arrays.
    crossproducts : CrossProducts
    """
    parsed = as_parsed_formula(formula)
    if missing not in ("raise", "drop"):
        raise ValueError("missing must be 'raise' or 'drop'")
    if weights is not None and not isinstance(weights, str):
        raise DataError("a chunked fit takes prior weights as a column name")
    if offset is not None and not isinstance(offset, str):
        raise DataError("a chunked fit takes offset= as a column name")
    columns = _used_columns(parsed, source.columns)
    check_columns(columns + ([weights] if weights else []), source.columns)
    covariates = sorted(set().union(*[spec_variables(spec, source.columns)
                                      for spec in [parsed.fixed] + [b.lhs for b in parsed.bars]]))
    columns = columns + ([offset] if offset and offset not in columns else [])
    plan = _Plan(parsed, columns, [c for c in covariates if c in columns], weights, missing,
                 offset)

    if isinstance(source, ChunkedData):  # grouping columns are labels
        source = source.reading_as_text(grouping_only_columns(parsed, source.columns))
    scan = source.map_reduce(plan.read_columns(), plan.scan, ChunkScan.merge,
                             progress=_progress("scan", verbose))
    n = scan.n_rows
    if n == 0:
        raise DataError("no rows left after dropping missing values" if missing == "drop"
                        else f"{source.name} has no rows")
    relationships = known_relationships(parsed, relationships)
    several = [group for group, named in relationships.items() if len(named) > 1]
    if several:
        raise DataError(f"several relationship matrices on {several[0]!r} are fitted in "
                        "memory only, not chunked")
    relationships = {group: named[0][1] for group, named in relationships.items()}
    levels = []
    for b, bar in enumerate(parsed.bars):
        if bar.group in relationships:
            levels.append(pd.Index(relationships[bar.group].labels, name=bar.group))
        else:
            levels.append(_grouping_factor(scan.combos[b], bar)[1])
            check_levels(bar, levels[-1])  # before the second pass over the data
    categories = scan.categories()
    if sparse_fixed == "auto":
        fixed_vars = spec_variables(parsed.fixed, source.columns)
        sparse_fixed = sum(len(v) for k, v in categories.items() if k in fixed_vars) \
            > SPARSE_FIXED_LEVELS
    term_order = lme4_term_order([len(lv) for lv in levels])
    known_bars = frozenset(b for b, bar in enumerate(parsed.bars) if bar.group in relationships)
    encoder = ChunkEncoder(plan, categories, levels, known_bars, term_order, bool(sparse_fixed))
    encoder.fixed_shift = _first_chunk_shift(source, plan, encoder)

    total = source.map_reduce(plan.read_columns(), encoder.products, _add_products,
                              progress=_progress("cross-products", verbose))
    xp = total.crossproducts
    if xp is None:
        raise DataError("no rows left after dropping missing values")
    fixed_names, dropped = list(total.fixed_names), []
    keep = independent_columns(xp.xx)
    if len(keep) < len(fixed_names):
        dropped = [name for j, name in enumerate(fixed_names) if j not in keep]
        warn_dropped(dropped)
        xp = xp.drop_fixed(np.array(keep))
        fixed_names = [fixed_names[j] for j in keep]
    p = len(fixed_names)
    terms = []
    for b in term_order:
        bar = parsed.bars[b]
        coef_names = _coef_names(total.z_specs[term_order.index(b)])
        terms.append(random_term(bar, np.zeros(0, dtype=np.int64), levels[b],
                                 np.zeros((0, len(coef_names))), coef_names,
                                 total.z_specs[term_order.index(b)],
                                 relationships.get(bar.group), n))
    X = sp.csc_matrix((0, p)) if sparse_fixed else np.zeros((0, p))
    design = Design(formula=parsed, y=np.zeros(0), X=X, fixed_names=fixed_names,
                    terms=terms, weights=np.zeros(0), dropped_fixed=dropped,
                    response_name=parsed.response, fixed_spec=total.fixed_spec,
                    n_rows=n, prior_weights=scan.weighted, offset_argument=offset)
    return design, xp


def _first_chunk_shift(source, plan: _Plan, encoder: ChunkEncoder) -> np.ndarray | None:
    """β₀ for every chunk, from the first chunk with rows: any β₀ gives the same model
    (:func:`~henderson.mme.response_shift`), and one chunk's least-squares fit already
    takes a large mean or trend out of y."""
    for i, chunk in enumerate(source.first_chunks(plan.read_columns())):
        design = encoder.design(chunk, f" of chunk {i}")
        if design is not None:
            return response_shift(design.X, design.y, design.weights, design.fixed_names)
    return None


def _coef_names(spec) -> list[str]:
    return [lme4_column_name(c) for c in spec.column_names]


def _progress(stage: str, verbose: bool):
    if not verbose:
        return None

    def report(chunk: int, rows: int) -> None:
        print(f"[henderson] {stage}: chunk {chunk + 1}, {rows:,} rows", file=sys.stderr,
              flush=True)

    return report


def as_chunk_source(data) -> ChunkedData | DaskData | None:
    """The chunk source ``data`` stands for, or None for an in-memory DataFrame."""
    if isinstance(data, (ChunkedData, DaskData)):
        return data
    if is_dask_frame(data):
        return DaskData(data)
    if isinstance(data, (str, Path)):
        return chunked(data)
    return None


__all__ = [
    "ChunkEncoder",
    "ChunkScan",
    "ChunkedData",
    "DaskData",
    "as_chunk_source",
    "chunked",
    "chunked_design",
]
