"""The ``henderson`` command line.

``henderson demo`` fits the bundled example data (the seed's plants in pots,
sleepstudy, Penicillin's crossed design) and prints the summaries.
``henderson fit FORMULA DATA [options]`` fits a model from a CSV or Parquet file (in
memory, or streamed in chunks), prints the summary, writes the result tables and a JSON
summary into ``--out DIR`` and the model into ``--save FILE``;
``henderson predict MODEL DATA`` predicts from a saved model. Run ``henderson fit
--help`` for the options.

Rules the commands keep, for pipelines:

* Grouping-factor columns (and pedigree and relationship-matrix labels) are read as
  text: ``"001"`` stays ``"001"`` and matches the same animal in every file.
* Every failure is one line on stderr, ``henderson: error: ...``, and exit code 2.
* ``--out DIR`` holds the results of one run: henderson lists what it writes in
  ``DIR/henderson-manifest.json`` and, on the next run into ``DIR``, removes what it
  listed there before; it refuses a folder holding files it did not write.
* Files are replaced whole (written beside the target, then renamed over it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

DEMO_MODELS = [
    ("plants", "height ~ moisture + (1 | pot)", {}),
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", {}),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", {}),
    ("pastes", "strength ~ 1 + (1 | batch/cask)", {}),
]

#: the file in ``--out DIR`` that lists the files henderson wrote there
MANIFEST = "henderson-manifest.json"
#: prefix of the folder inside ``--out DIR`` where a run's files are staged
STAGING_PREFIX = ".henderson-staging-"
PARQUET_SUFFIXES = (".parquet", ".pq")


def demo(out=None) -> int:
    import henderson as hd

    out = sys.stdout if out is None else out
    for name, formula, options in DEMO_MODELS:
        model = hd.lmm(formula, hd.datasets.load(name), **options)
        print(f"==== {name}: {formula}", file=out)
        print(model.summary(timings=True), file=out)
        if name == "plants":
            with np.printoptions(precision=3, suppress=True, linewidth=150):
                print("\nZ (10 x 4):\n", model.Z.toarray(), file=out)
                print("\nG:\n", model.G.toarray(), file=out)
                print("\nSigma = Z G Z' + R (block diagonal, one block per pot):\n",
                      model.Sigma.toarray(), file=out)
        print(file=out)
    return 0


def data_command(args, out=None) -> int:
    """``henderson data [NAME] [--out FILE]``: write a bundled data set (the files the
    README's examples use), or list them."""
    import henderson as hd

    out = sys.stdout if out is None else out
    names = list(hd.datasets.NAMES) + list(hd.datasets.MRODE) + [
        f"{m}_pedigree" for m in hd.datasets.MRODE]
    if args.name is None:
        print("\n".join(names), file=out)
        return 0
    if args.name not in names:
        raise ValueError(f"unknown data set {args.name!r}; `henderson data` lists them")
    path = hd.datasets.export(args.name, args.out or f"{args.name}.csv")
    print(f"wrote {path} ({len(hd.datasets.load(args.name)):,} rows)", file=out)
    return 0


# ---------------------------------------------------------------- reading files
def one_line(exc: BaseException) -> str:
    """An exception as one line of text."""
    return " ".join(str(exc).split()) or type(exc).__name__


def label_columns(formula: str) -> list[str]:
    """The columns of ``formula`` that only name levels of grouping factors.

    They are read as text so that identifiers are labels: ``"001"`` stays ``"001"``
    (as it does in a pedigree file) instead of becoming the number 1. A grouping
    column that the formula also uses as a covariate keeps the type read from the
    file, so that the model is the one the formula says.

    Parameters
    ----------
    formula : str
        An lme4 formula.

    Returns
    -------
    list of str
    """
    from .design import as_parsed_formula, grouping_only_columns

    try:
        return grouping_only_columns(as_parsed_formula(formula))
    except Exception:  # a bad formula is reported by the fit, with its context
        return []


def _existing_file(path: str, what: str) -> Path:
    from .errors import DataError

    file = Path(path)
    if not file.exists():
        raise DataError(f"{what} {path!r} not found")
    if file.is_dir():
        raise DataError(f"{what} {path!r} is a folder, not a file")
    if file.stat().st_size == 0:
        raise DataError(f"{what} {path!r} is empty")
    return file


def _starts_as_parquet(file: Path) -> bool:
    with open(file, "rb") as handle:
        return handle.read(4) == b"PAR1"


def _csv_options(file: Path, path: str, what: str, text_columns) -> dict:
    """``read_csv`` options reading ``text_columns`` as text; refuses files that are
    not CSV text before pandas does it with a less telling message."""
    from .errors import DataError

    if _starts_as_parquet(file):
        raise DataError(f"{what} {path!r} holds Parquet data; name it .parquet")
    return {"dtype": {c: str for c in text_columns}} if text_columns else {}


def _read_error(exc: Exception, path: str, what: str):
    """The :class:`DataError` for a file pandas or pyarrow could not read."""

    from .errors import DataError, HendersonError

    if isinstance(exc, HendersonError):
        return exc
    if isinstance(exc, pd.errors.EmptyDataError):
        return DataError(f"{what} {path!r} is empty")
    if isinstance(exc, UnicodeDecodeError):
        return DataError(f"{what} {path!r} is not a text (UTF-8) CSV file")
    return DataError(f"cannot read {what} {path!r}: {one_line(exc)}")


def read_table(path: str, text_columns=(), what: str = "data file"):
    """A CSV or Parquet file as a DataFrame, ``text_columns`` read as text (CSV).

    Parameters
    ----------
    path : str
        ``.parquet``/``.pq`` is read as Parquet, anything else as CSV.
    text_columns : sequence of str
        Columns to read as strings from a CSV file (a Parquet file keeps its types).
    what : str
        What the file is, for messages.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    DataError
        The file is absent, a folder, empty, damaged or not of its kind; the message
        names it.
    """

    from .design import text_labels
    from .errors import DataError

    file = _existing_file(path, what)
    try:
        if file.suffix.lower() in PARQUET_SUFFIXES:
            try:
                frame = pd.read_parquet(file)
            except ImportError as exc:
                raise DataError("reading Parquet needs pyarrow: pip install "
                                "henderson[pipeline]") from exc
        else:
            frame = pd.read_csv(file, **_csv_options(file, path, what, text_columns))
            frame = text_labels(frame, text_columns)
    except Exception as exc:  # pandas, pyarrow, csv, the OS: all about this file
        raise _read_error(exc, path, what) from exc
    if len(frame) == 0:
        raise DataError(f"{what} {path!r} has no rows")
    return frame


def chunked_table(path: str, chunk_rows: int, text_columns=()):
    """A CSV or Parquet file as :class:`~henderson.ChunkedData` (errors in any chunk are
    :class:`DataError` naming the file; the fit reads the grouping columns of a CSV
    file as text itself, so ``text_columns`` is not needed here)."""
    import henderson as hd

    file = _existing_file(path, "data file")
    try:
        return hd.chunked(file, chunk_rows=chunk_rows)
    except Exception as exc:
        raise _read_error(exc, path, "data file") from exc


def read_relationship(path: str):
    """A labelled covariance matrix (a GRM, say) from a CSV file.

    The first row holds a corner cell (any text, or empty) and the labels; every other
    row holds a label and that label's row of the matrix, the labels in the same
    order as in the first row::

        id,001,002,003
        001,1.02,0.11,0.05
        002,0.11,0.98,0.20
        003,0.05,0.20,1.01

    Labels are text (``"001"`` is not ``"1"``). The matrix must be numeric, finite,
    symmetric and positive definite; it is inverted here, once.

    Parameters
    ----------
    path : str

    Returns
    -------
    RelationshipMatrix

    Raises
    ------
    DataError
        Naming the file and the row and column at fault.
    """

    from .errors import DataError, HendersonError
    from .genomic import as_relationship

    what = "relationship file"
    file = _existing_file(path, what)
    name = repr(path)
    try:
        header = pd.read_csv(file, nrows=0, **_csv_options(file, path, what, ()))
        if header.shape[1] < 2:
            raise DataError(f"relationship file {name} needs a label column and one "
                            "column per label")
        # empty or "NA" cells are errors, not missing values
        frame = pd.read_csv(file, dtype={header.columns[0]: str}, keep_default_na=False,
                            index_col=0)
    except Exception as exc:
        raise _read_error(exc, path, what) from exc
    if frame.empty:
        raise DataError(f"relationship file {name} has no rows")
    frame.index = [str(label).strip() for label in frame.index]
    frame.columns = [str(label).strip() for label in frame.columns]
    try:  # the checks every labelled covariance gets (numbers, finite, symmetric, labels)
        relationship = as_relationship(frame)
    except HendersonError as exc:
        raise DataError(f"relationship file {name}: {exc}") from None
    try:
        relationship.precision()  # cached, so the fit does not factor it again
    except HendersonError as exc:
        raise DataError(f"relationship file {name}: {one_line(exc)}") from exc
    return relationship


def parse_fixed_variances(text: str) -> dict:
    """``--fixed-variances``: ``"animal=27,residual=66"`` or a JSON file.

    Parameters
    ----------
    text : str
        Comma-separated ``NAME=NUMBER`` pairs (NAME a grouping factor, a VarCorr name
        such as ``Subject.1``, or ``residual``), or the path of a JSON object mapping
        names to a variance or, for a term with k coefficients, a k x k covariance.

    Returns
    -------
    dict

    Raises
    ------
    DataError
        A pair that is not ``NAME=NUMBER``, a repeated name, a non-finite number, or a
        JSON file that cannot be read or is not such an object.
    """
    from .errors import DataError

    option = "--fixed-variances"
    if text.lower().endswith(".json") or Path(text).is_file():
        file = _existing_file(text, f"{option} file")
        try:
            variances = json.loads(file.read_text())
        except (ValueError, OSError) as exc:
            raise DataError(f"{option} file {text!r} is not readable JSON: "
                            f"{one_line(exc)}") from exc
        if not isinstance(variances, dict) or not variances:
            raise DataError(f"{option} file {text!r} must hold a JSON object of "
                            "name: variance pairs")
        for name, value in variances.items():
            try:
                array = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                array = np.array(np.nan)
            if array.ndim > 2 or not np.isfinite(array).all():
                raise DataError(f"{option} file {text!r}: the variance of {name!r} is "
                                f"{value!r}, not a number or a matrix of numbers")
        return variances
    variances: dict[str, float] = {}
    for pair in text.split(","):
        name, equals, value = pair.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not equals or not name or number is None:
            raise DataError(f"{option}: {pair.strip()!r} is not NAME=NUMBER "
                            "(e.g. animal=27,residual=66) or a .json file")
        if not np.isfinite(number):
            raise DataError(f"{option}: the variance of {name!r} is not finite")
        if name in variances:
            raise DataError(f"{option}: {name!r} is given twice")
        variances[name] = number
    return variances


def parse_relationship_option(text: str) -> tuple[str, str]:
    """``--relationship GROUP=FILE`` as ``(group, file)``."""
    from .errors import DataError

    group, equals, file = text.partition("=")
    if not equals or not group.strip() or not file.strip():
        raise DataError(f"--relationship: {text!r} is not GROUP=FILE")
    return group.strip(), file.strip()


def check_output_file(path: str, option: str, folder_made: bool = False) -> None:
    """A :class:`DataError` naming ``option`` if ``path`` cannot be written as a file:
    it is a folder, or its folder does not exist (unless ``folder_made``)."""
    from .errors import DataError

    file = Path(path)
    if file.is_dir():
        raise DataError(f"{option} {path!r} is a folder, not a file")
    if not folder_made and not file.resolve().parent.is_dir():
        raise DataError(f"{option} {path!r}: its folder does not exist")


# ---------------------------------------------------------------- the results folder
def result_file_stem(kind: str, group: str) -> str:
    """``ranef_<group>`` with the group percent-encoded (RFC 3986): unique per group
    (``a_b`` and ``a:b`` give ``ranef_a_b`` and ``ranef_a%3Ab``), safe on every file
    system, and decoded by ``urllib.parse.unquote``."""
    return f"{kind}_{quote(group, safe='')}"


def check_results_folder(path: str) -> dict:
    """Check ``--out DIR`` before the fit: absent, empty, or holding only what an
    earlier ``henderson fit`` wrote there (its manifest and the files it lists).

    Returns
    -------
    dict
        The earlier manifest (``{"files": [...]}``), empty when there is none.

    Raises
    ------
    DataError
        DIR is a file, or holds other files; henderson never deletes those.
    """
    from .errors import DataError

    folder = Path(path)
    if not folder.exists():
        return {}
    if not folder.is_dir():
        raise DataError(f"--out {path!r} is a file, not a folder")
    manifest = {}
    if (folder / MANIFEST).exists():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if not (isinstance(manifest.get("files"), list)
                    and all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
                            for f in manifest["files"])):
                raise ValueError("no list of files")
        except (ValueError, OSError, AttributeError) as exc:
            raise DataError(f"--out {path!r}: {MANIFEST} is not henderson's "
                            f"({one_line(exc)}); give another folder") from exc
    owned = {MANIFEST, *manifest.get("files", [])}
    foreign = sorted(entry.name for entry in folder.iterdir()
                     if entry.name not in owned and not entry.name.startswith(STAGING_PREFIX))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                           else "")
        raise DataError(f"--out {path!r} holds files that henderson did not write there "
                        f"({listed}); henderson replaces only its own results, so give a "
                        "new or empty folder")
    return manifest


class ResultsFolder:
    """The files of one run, staged inside ``--out DIR`` and then put in place.

    :meth:`stage` writes a file into a hidden staging folder; :meth:`commit` lists the
    old and the new files in the manifest (so that a run killed from here on leaves
    every henderson file listed), moves the new files in (each replaces its namesake
    whole), deletes the old files the new run did not write, and lists only the new
    files. :meth:`discard` removes the staging folder and leaves DIR as it was.
    """

    def __init__(self, path: str, previous: dict):
        import tempfile

        self.folder = Path(path)
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for entry in self.folder.iterdir():  # staging left by a run that was killed
            if entry.name.startswith(STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        self.previous = list(previous.get("files", []))
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
        self.files: list[str] = []
        self.staged: list[str] = []

    def stage(self, name: str, write) -> None:
        """``write(path)`` writes the file ``name`` into the staging folder."""
        from .errors import DataError

        path = self.staging / name
        if path.exists():  # the names differ only in case, on a file system that ignores it
            raise DataError(f"two result files would be named {name!r} on this file "
                            "system; rename a grouping column")
        write(path)
        self.files.append(name)
        self.staged.append(name)

    def adopt(self, name: str) -> None:
        """List ``name``, written into the folder by other means, among the run's files."""
        if name not in self.files:
            self.files.append(name)

    def commit(self) -> None:
        from .persist import write_atomically

        def manifest(files):
            write_atomically(self.folder / MANIFEST, lambda handle: handle.write(
                json.dumps({"written_by": "henderson fit", "files": files},
                           indent=1).encode()))

        manifest(sorted(set(self.previous) | set(self.files)))
        for name in self.staged:
            (self.staging / name).replace(self.folder / name)
        for name in set(self.previous) - set(self.files):
            (self.folder / name).unlink(missing_ok=True)
        manifest(self.files)
        self.staging.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.created:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def _table_writer(kind: str):
    """Write a DataFrame as CSV or Parquet to a path."""
    def write(frame, path):
        frame = frame.copy()
        frame.columns = [str(c) for c in frame.columns]
        if kind == "parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
    return write


def stage_results(model, args, results: ResultsFolder) -> None:
    """The result tables and ``summary.json`` of a fit, into ``results``."""
    suffix = "." + args.format
    write = _table_writer(args.format)
    fixed = model.fixef.to_frame()
    fixed["std_error"] = np.sqrt(np.diag(model.vcov.to_numpy()))
    results.stage("fixef" + suffix,
                  lambda path: write(fixed.rename_axis("term").reset_index(), path))
    results.stage("varcorr" + suffix, lambda path: write(model.varcorr, path))
    ranef_files = {}
    for group, values in model.ranef.items():
        table = values.join(model.ranef_sd[group].add_suffix("_cond_sd"))
        term = next(t for t in model.design.terms if t.group == group)
        if term.level_precision is not None and term.n_coefs == 1:
            bv = model.breeding_values(group)
            table = table.join(bv[["pev", "reliability"]])
        name = result_file_stem("ranef", group) + suffix
        results.stage(name, lambda path, table=table: write(table.reset_index(), path))
        ranef_files[group] = name
    from . import __version__

    summary = {"formula": args.formula, "data": args.data, "reml": args.reml,
               "nobs": model.nobs, "objective": model.objective, "loglik": model.loglik,
               "aic": model.aic, "bic": model.bic, "sigma": model.sigma,
               "theta": model.theta.tolist(), "fixef": model.fixef.to_dict(),
               "converged": model.converged, "singular": model.singular,
               "evaluations": model.n_evaluations, "ranef_files": ranef_files,
               "henderson_version": __version__}
    results.stage("summary.json", lambda path: path.write_text(
        json.dumps(_strict_json(summary), indent=1, allow_nan=False)))


def stage_breeding_results(model, args, results: ResultsFolder) -> None:
    """Result tables of a breeding model: fixed effects with SEs, every (co)variance
    with its SE, breeding values (long: trait, ebv, pev, reliability) by term, and
    ``summary.json``."""
    suffix = "." + args.format
    write = _table_writer(args.format)
    fixed = model.coefficient_table()
    results.stage("fixef" + suffix,
                  lambda path: write(fixed.rename_axis("term").reset_index(), path))
    components = model.variance_components
    results.stage("covariances" + suffix, lambda path: write(components, path))
    groups = model.group_effects
    if groups is not None:
        results.stage("groups" + suffix,
                      lambda path: write(groups.reset_index(), path))
    ranef_files = {}
    for effect in model.design.effects:
        for member in effect.members:
            table = model.breeding_values(member)
            name = result_file_stem("ranef", member) + suffix
            results.stage(name, lambda path, table=table: write(table.reset_index(), path))
            ranef_files[member] = name
    from . import __version__

    summary = {"formula": args.formula, "data": args.data, "reml": True,
               "traits": model.responses, "nobs": model.nobs, "objective": model.objective,
               "loglik": model.loglik, "converged": model.converged,
               "covariances": {(k if isinstance(k, str) else ",".join(k)): v.to_numpy().tolist()
                               for k, v in model.covariances.items()},
               "fixef": model.fixef.to_dict(), "ranef_files": ranef_files,
               "henderson_version": __version__}
    results.stage("summary.json", lambda path: path.write_text(
        json.dumps(_strict_json(summary), indent=1, allow_nan=False)))


def _strict_json(value):
    """JSON without NaN/Infinity (which JSON does not have; many readers refuse them):
    non-finite numbers become null."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ---------------------------------------------------------------- commands
def fit_command(args, out=None, err=None) -> int:
    """``henderson fit``: check the inputs and outputs, read, fit, print the summary,
    stage the results, save the model, put the results in place.

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`build_parser`.
    out, err : file, optional
        Where the summary and the progress go (stdout and stderr).

    Returns
    -------
    int
        0; failures raise (:func:`main` turns them into one line and exit code 2).
    """
    import henderson as hd
    from .errors import DataError

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[henderson] {msg}", file=err))
    # everything that can be checked before the fit is checked before the fit
    text_columns = label_columns(args.formula)
    previous = check_results_folder(args.out) if args.out else {}
    # a model saved into the results folder is one of the run's files
    save_in_out = bool(args.save and args.out and
                       Path(args.save).resolve().parent == Path(args.out).resolve())
    if args.save:
        check_output_file(args.save, "--save", folder_made=save_in_out)
    fixed_variances = (parse_fixed_variances(args.fixed_variances)
                       if args.fixed_variances else None)
    relationships = {}
    for option in args.relationship:
        group, path = parse_relationship_option(option)
        if group in relationships:
            raise DataError(f"--relationship: {group!r} is given twice")
        say(f"reading relationship matrix {path} for {group}")
        relationships[group] = read_relationship(path)
    if args.pedigree:
        groups = [g.strip() for g in (args.animal or "animal").split(",") if g.strip()]
        for group in groups:
            if group in relationships:
                raise DataError(f"--pedigree and --relationship both give {group!r} a "
                                "relationship; give one")
        say(f"reading pedigree {args.pedigree}")
        try:
            pedigree = hd.Pedigree.read(
                _existing_file(args.pedigree, "pedigree file"), sep=None,
                groups=[g.strip() for g in args.groups.split(",")] if args.groups else None)
        except Exception as exc:
            raise _read_error(exc, args.pedigree, "pedigree file") from exc
        for group in groups:
            relationships[group] = pedigree
    elif args.animal:
        raise DataError("--animal names the pedigree's grouping factor; give --pedigree too")
    elif args.groups:
        raise DataError("--groups names unknown-parent groups of a pedigree; give --pedigree")
    covary = []
    for option in args.covary:
        members = tuple(m.strip() for m in option.split(",") if m.strip())
        if len(members) < 2:
            raise DataError(f"--covary: {option!r} is not TERM,TERM (e.g. animal,dam)")
        pedigree_terms = [m for m in members if m in relationships]
        if pedigree_terms and len(pedigree_terms) < len(members):
            missing_terms = [m for m in members if m not in relationships]
            raise DataError(f"--covary {option}: {', '.join(missing_terms)} has no pedigree; "
                            f"give --animal {','.join(members)} so that the pedigree "
                            "applies to every covaried term")
        covary.append(members)
    from .fit import _is_breeding_model

    breeding = _is_breeding_model(args.formula, relationships, covary, args.reml,
                                  args.optimizer)
    if breeding and args.save:
        raise DataError("--save is not available for multi-trait, maternal, group and "
                        "random-regression models yet; use --out for the result tables")
    if breeding and args.chunked:
        raise DataError("--chunked is not available for multi-trait, maternal, group and "
                        "random-regression models; they are fitted in memory")
    if args.chunked:
        say(f"streaming {args.data} in chunks of {args.chunk_rows:,} rows (two passes)")
        data = chunked_table(args.data, args.chunk_rows, text_columns)
        rows = "chunks"
    else:
        say(f"reading {args.data}")
        data = read_table(args.data, text_columns)
        rows = f"{len(data)} rows"
    say(f"fitting {args.formula} to {rows}")
    model = hd.lmm(args.formula, data, reml=args.reml, weights=args.weights,
                   missing=args.missing, optimizer=args.optimizer, ordering=args.ordering,
                   strategy=args.strategy, relationships=relationships or None,
                   fixed_variances=fixed_variances, verbose=False if args.quiet else 25,
                   covary=covary or None, threads=args.threads)
    model.data_name = str(args.data)             # the summary's Data: line, as given
    print(model.summary(), file=out)
    # stage the results, then save the model, then put the results in place: a save
    # that fails (a formula that cannot be saved, a full disk) leaves --out as it was
    results = ResultsFolder(args.out, previous) if args.out else None
    try:
        if results is not None:
            (stage_breeding_results if breeding else stage_results)(model, args, results)
        if args.save:
            model.save(args.save)
            say(f"model saved to {args.save}")
            if save_in_out:
                results.adopt(Path(args.save).name)
        if results is not None:
            results.commit()
            say(f"results written to {results.folder}")
    except BaseException:
        if results is not None:
            results.discard()
        raise
    return 0


def predict_command(args, out=None, err=None) -> int:
    """``henderson predict``: the rows of ``args.data`` with a ``prediction`` column,
    to ``args.out`` (replaced whole) or ``out`` (stdout).

    Returns
    -------
    int
        0; failures raise (:func:`main` turns them into one line and exit code 2).
    """
    import henderson as hd
    from .persist import write_atomically

    out = sys.stdout if out is None else out
    if args.out:
        check_output_file(args.out, "--out")
    model = hd.load(args.model)
    data = read_table(args.data, label_columns(model.formula))
    prediction = model.predict(data, re=not args.population,
                               allow_new_levels=args.allow_new_levels)
    frame = data.assign(prediction=prediction)
    if args.out:
        write_atomically(args.out, lambda handle: frame.to_csv(handle, index=False))
    else:
        frame.to_csv(out, index=False)
    return 0


# ---------------------------------------------------------------- the parser
class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message):
        self.exit(2, f"henderson: error: {one_line(message)} (see `{self.prog} --help`)\n")


def gwas_command(args, out=None, err=None) -> int:
    """``henderson gwas``: a scan of a PLINK set against one null model, streamed to a
    CSV/TSV/Parquet file, with the null fits on stdout."""
    from .gwas import gwas
    from .plink import read_plink

    out = sys.stdout if out is None else out
    genotypes = read_plink(args.bfile)
    data = read_table(args.data, text_columns=[args.id])
    relationship = args.grm
    if args.grm not in ("auto", "vanraden", "standardized"):
        relationship = read_relationship(args.grm)
    result = gwas(args.formula, data, genotypes, id=args.id, grm=relationship,
                  loco=args.loco, test=args.test, reml=args.reml, blend=args.blend,
                  out=args.out, progress=False if args.quiet else "auto",
                  precision=args.precision, threads=args.threads)
    null = pd.DataFrame(result.attrs["null"])
    print(f"{genotypes!r}", file=out)
    print("null model(s):", file=out)
    print(null.to_string(index=False, float_format=lambda v: f"{v:.6g}"), file=out)
    best = result.nsmallest(min(args.top, len(result)), "pvalue")
    print(f"\nsmallest p-values ({args.test}):", file=out)
    print(best.to_string(index=False, float_format=lambda v: f"{v:.4g}"), file=out)
    print(f"\n{len(result):,} rows written to {args.out}", file=out)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


THREADS_HELP = ("threads of the fit, BLAS's and henderson's own (default: "
                "$HENDERSON_THREADS, else the CPUs this process may use, with one BLAS "
                "thread when other work holds them)")

FIT_EPILOG = """\
files:
  DATA      CSV (comma-separated, header row) or Parquet (.parquet/.pq). Grouping
            columns of the formula are read from CSV as text ("001" stays "001").
  --pedigree FILE
            animal, sire, dam (the first three columns; CSV or whitespace-separated,
            header detected); unknown parents 0, NA, "." or empty.
  --relationship GROUP=FILE
            a labelled covariance matrix (GRM) as CSV: a first row of a corner cell
            and the labels, then one row per label (the label, then its row of the
            matrix), labels in the same order down and across.
  --fixed-variances SPEC
            animal=27,residual=66 (grouping factor or VarCorr name, and residual), or
            a .json file {"animal": 27, "Subject": [[600, 10], [10, 35]], "residual": 66}.

results (--out DIR):
  fixef, varcorr and ranef_<group> tables (CSV or Parquet; <group> percent-encoded,
  so (1 | a:b) writes ranef_a%3Ab.csv), summary.json (estimates, fit statistics,
  ranef_files: group -> file) and henderson-manifest.json (the files of the run).
  A second run into DIR replaces the files of the first and deletes those it does
  not write again; a DIR holding other files is refused.

Every failure is one line on stderr, "henderson: error: ...", and exit code 2.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``henderson`` argument parser (``demo``, ``fit``, ``predict``, ``gwas``)."""
    from . import __version__

    parser = _Parser(prog="henderson", description="Linear mixed models on sparse MME.")
    parser.add_argument("--version", action="version", version=f"henderson {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="fit the bundled example data and print the summaries")
    data = sub.add_parser("data", help="write a bundled data set to a file (no name: list them)")
    data.add_argument("name", nargs="?", help="the data set, e.g. sleepstudy")
    data.add_argument("--out", metavar="FILE",
                      help="CSV, or Parquet for a .parquet name (default NAME.csv)")
    data.add_argument("--traceback", action="store_true",
                      help="show the traceback of an error (for bug reports)")
    fit = sub.add_parser("fit", help="fit a model to a CSV or Parquet file",
                         description="Fit a linear mixed model to a CSV or Parquet file, "
                                     "print its summary and write the results.",
                         epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("formula", help='lme4 formula, e.g. "y ~ x + (1 | g)"')
    fit.add_argument("data", help="CSV or Parquet file of the rows")
    model = fit.add_argument_group("model")
    method = model.add_mutually_exclusive_group()
    method.add_argument("--reml", dest="reml", action="store_true", default=True,
                        help="restricted maximum likelihood (the default)")
    method.add_argument("--ml", dest="reml", action="store_false",
                        help="maximum likelihood instead of REML")
    model.add_argument("--weights", metavar="COL",
                       help="column of prior weights (residual variance sigma^2 / w)")
    model.add_argument("--missing", choices=["raise", "drop"], default="raise",
                       help="rows with a missing value in a used column: an error "
                            "(default) or dropped")
    model.add_argument("--pedigree", metavar="FILE",
                       help="pedigree file (animal, sire, dam) for an animal term")
    model.add_argument("--animal", metavar="GROUP",
                       help="grouping factor(s) that the pedigree belongs to, comma-separated "
                            "(default: animal; animal,dam for a maternal model)")
    model.add_argument("--groups", metavar="G1,G2",
                       help="unknown-parent group codes used as parents in the pedigree "
                            "(fitted as fixed effects by the QP transformation)")
    model.add_argument("--covary", metavar="TERM,TERM", action="append", default=[],
                       help="random terms with correlated effects on the same levels, e.g. "
                            "animal,dam (direct and maternal); repeatable")
    model.add_argument("--relationship", metavar="GROUP=FILE", action="append", default=[],
                       help="known covariance (e.g. a GRM) of GROUP's levels from a CSV "
                            "file; repeat for several groups")
    model.add_argument("--fixed-variances", metavar="SPEC",
                       help="known variances, no estimation: animal=27,residual=66 or a "
                            ".json file")
    fitting = fit.add_argument_group("fitting")
    fitting.add_argument("--optimizer", default="auto", metavar="NAME",
                         help="auto (default), ai, newton, bobyqa, lbfgs, or a scipy "
                              "method: Powell, Nelder-Mead, L-BFGS-B")
    fitting.add_argument("--ordering", choices=["auto", "natural", "amd", "metis"],
                         default="auto", help="fill-reducing ordering of CHOLMOD "
                                              "(default auto: measured)")
    fitting.add_argument("--strategy", choices=["auto", "schur", "cholmod"], default="auto",
                         help="how the equations are factored (default auto)")
    fitting.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                         help=THREADS_HELP)
    fitting.add_argument("--chunked", action="store_true",
                         help="stream the file in chunks (out of core: memory bounded by "
                              "the MME, not the rows; no fitted values or residuals)")
    fitting.add_argument("--chunk-rows", type=_positive_int, default=1_000_000, metavar="N",
                         help="rows per chunk with --chunked (default 1,000,000)")
    output = fit.add_argument_group("output")
    output.add_argument("--out", metavar="DIR",
                        help="folder for the result tables, summary.json and the manifest "
                             "(see below)")
    output.add_argument("--format", choices=["csv", "parquet"], default="csv",
                        help="file format of the result tables (default csv)")
    output.add_argument("--save", metavar="FILE",
                        help="write the fitted model to this file (.npz, no pickle) for "
                             "`henderson predict`")
    output.add_argument("--quiet", action="store_true", help="no progress on stderr")
    output.add_argument("--traceback", action="store_true",
                        help="show the traceback of an error (for bug reports)")
    predict = sub.add_parser("predict", help="predict new rows from a saved model",
                             description="Predict new rows from a model saved by "
                                         "`henderson fit --save`.")
    predict.add_argument("model", help="file written by `henderson fit --save`")
    predict.add_argument("data", help="CSV or Parquet file of new rows")
    predict.add_argument("--out", metavar="FILE",
                         help="CSV file for the rows with a prediction column "
                              "(default: stdout)")
    predict.add_argument("--population", action="store_true",
                         help="fixed effects only (no BLUPs)")
    predict.add_argument("--allow-new-levels", action="store_true",
                         help="a level of a grouping factor not in the fit gets the "
                              "population prediction (default: an error, as lme4)")
    predict.add_argument("--traceback", action="store_true",
                         help="show the traceback of an error (for bug reports)")
    scan = sub.add_parser("gwas", help="scan a PLINK set against one null mixed model",
                          description="Test every variant of a PLINK .bed/.bim/.fam set "
                                      "against one null linear mixed model (a random effect "
                                      "of each person with the GRM), streaming the rows to "
                                      "a file.")
    scan.add_argument("formula", help='covariates, e.g. "y ~ age + sex"; "cbind(y1, y2) ~ '
                                      'age" for several phenotypes')
    scan.add_argument("data", help="CSV or Parquet file: one row per person")
    scan.add_argument("--bfile", required=True, metavar="PREFIX",
                      help="PLINK prefix (PREFIX.bed, .bim, .fam)")
    scan.add_argument("--out", required=True, metavar="FILE",
                      help="results file: .csv, .tsv or .parquet")
    scan.add_argument("--id", default="iid", help="column of the data holding the .fam IIDs "
                                                  "(default iid)")
    scan.add_argument("--test", choices=["wald", "score", "lrt"], default="wald",
                      help="wald (default; FaST-LMM's), score, or lrt (needs --ml)")
    scan_method = scan.add_mutually_exclusive_group()
    scan_method.add_argument("--reml", dest="reml", action="store_true", default=True,
                             help="REML null fit (the default)")
    scan_method.add_argument("--ml", dest="reml", action="store_false", help="ML null fit")
    scan.add_argument("--grm", default="auto", metavar="KIND|FILE",
                      help="auto (VanRaden 1 of all variants), standardized, or a CSV file "
                           "of a labelled covariance")
    scan.add_argument("--blend", type=float, default=0.01,
                      help="weight of the identity in a GRM built here (default 0.01)")
    scan.add_argument("--loco", action="store_true",
                      help="leave one chromosome out: each chromosome's GRM and null fit "
                           "from the others")
    scan.add_argument("--precision", choices=["double", "single"], default="double",
                      help="precision of the genotype rotation (single: twice as fast)")
    scan.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                      help=THREADS_HELP)
    scan.add_argument("--top", type=_positive_int, default=10,
                      help="print this many smallest p-values (default 10)")
    scan.add_argument("--quiet", action="store_true", help="no progress on stderr")
    scan.add_argument("--traceback", action="store_true",
                      help="show the traceback of an error (for bug reports)")
    return parser


def describe_error(exc: BaseException) -> str:
    """One line for an error: a ``ValueError`` (henderson's own among them) by its
    message, others with their type, which is part of what went wrong
    (``KeyError: 'x'``)."""
    if isinstance(exc, ValueError) and str(exc).strip():
        return one_line(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or one_line(exc)}: {exc.filename!r}"
    return f"{type(exc).__name__}: {one_line(exc)}"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"henderson: warning: {one_line(message)}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run the ``henderson`` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return demo()
        command = {"fit": fit_command, "predict": predict_command,
                   "gwas": gwas_command, "data": data_command}[args.command]
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line per warning, as errors
            try:
                return command(args)
            except (BrokenPipeError, KeyboardInterrupt):
                raise
            except Exception as exc:
                if args.traceback:
                    raise
                print(f"henderson: error: {describe_error(exc)}", file=sys.stderr)
                return 2
    except BrokenPipeError:  # `henderson demo | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("henderson: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
