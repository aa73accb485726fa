"""Fitted models on disk, without pickle: ``m.save(path)`` and ``hd.load(path)``.

The file is a NumPy ``.npz`` archive holding only numeric and string arrays (it is
read with ``allow_pickle=False``): the estimates, the BLUPs and conditional SDs with
their level labels, and a JSON header with the formula, the names and the categories
each categorical covariate was encoded with. That is all prediction needs, so a
loaded model predicts for new rows exactly as the fitted one did.

Saving is atomic (a temporary file in the same folder, synced, then renamed over the
target), so a save that is killed leaves the previous file whole. Loading treats the
file as untrusted data: every key, shape and dtype is checked against the header, and
the formula expressions (which formulaic evaluates as Python) must be column names,
numbers, arithmetic and a short list of numeric functions.
"""
from __future__ import annotations

import ast
import json
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .design import _model_matrix as design_model_matrix
from .design import check_new_levels, predicted_offset, spec_variables, with_categories
from .errors import DataError, FormulaError, HendersonError
from .formula import python_expression
from .report import (StatsmodelsNames, Summary, TermTable, _normal_term,
                    blup_contribution, call_lines, check_newdata, criterion_lines,
                    dispersion_line, group_names, groups_line, structure_lines,
                    varcorr_lines, varcorr_table)
from .rprint import coefficient_lines

FORMAT = "henderson-model"
VERSION = 1


def _plain(value):
    """A JSON-able Python value from a NumPy scalar."""
    return value.item() if hasattr(value, "item") else value


def _spec_categories(spec) -> dict[str, list]:
    """Categories of the categorical variables a formulaic ModelSpec encoded."""
    if spec.transform_state:
        raise FormulaError(
            "cannot save a model whose formula uses stateful transforms "
            f"({', '.join(spec.transform_state)}); compute those columns before fitting")
    out = {}
    columns = set(spec.required_variables)
    for name, (kind, state) in spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        if name not in columns:
            raise FormulaError(
                f"cannot save a model that encodes the expression {name!r} as a factor; "
                "make it a categorical column of the data before fitting")
        out[name] = [_plain(c) for c in state["categories"]]
    return out


def _plain_parameters(parameters: dict) -> dict:
    """A term's structure parameters as JSON values (arrays as lists)."""
    return {key: (np.asarray(value, dtype=float).tolist()
                  if key != "structure" and value is not None else value)
            for key, value in parameters.items()}


def save_model(model, path, conditional_sd: bool = True) -> Path:
    """Write a fitted :class:`~henderson.results.LinearMixedModel` to ``path``.

    Parameters
    ----------
    model : LinearMixedModel
    path : str or Path
        The file to write (an ``.npz`` archive, whatever its name).
    conditional_sd : bool
        Also store the conditional SDs of the BLUPs (costs one selected inverse).

    Returns
    -------
    Path

    Notes
    -----
    The file is replaced atomically (:func:`write_atomically`): a save that fails or
    is killed leaves the previous file as it was.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name, got {type(path).__name__}")
    design = model.design
    categories = _spec_categories(design.fixed_spec)
    for term in design.terms:
        categories.update(_spec_categories(term.z_spec))
    names = group_names(design)
    offsets = design.column_offsets()
    sds = None
    if conditional_sd:
        sds = model.conditional_sds_by_term()
    terms, arrays = [], {}
    for t, term in enumerate(design.terms):
        terms.append({
            "name": names[t], "group": term.group, "factors": list(term.factors),
            "covariates": term.covariates or str(term.z_spec.formula),
            "structure": term.structure.name, "coef_names": list(term.coef_names),
            "known_covariance": term.level_precision is not None,
            "parameters": _plain_parameters(model.covariance_parameters[names[t]]),
        })
        arrays[f"levels_{t}"] = np.asarray(term.levels.astype(str), dtype=str)
        arrays[f"ranef_{t}"] = model.random_effects_vector[offsets[t]:offsets[t + 1]].reshape(
            term.n_levels, term.n_coefs)
        if sds is not None:
            arrays[f"ranef_sd_{t}"] = sds[t]
        arrays[f"covariance_{t}"] = model.sigma ** 2 * (
            model.relative_factors[t] @ model.relative_factors[t].T)
    header = {
        "format": FORMAT, "version": VERSION,
        "formula": design.formula.text, "fixed": design.formula.fixed,
        "response": design.response_name, "reml": bool(model.reml),
        "objective": float(model.objective), "sigma": float(model.sigma),
        "nobs": int(model.nobs), "npar": int(model.npar),
        "loglik": float(model.loglik), "aic": float(model.aic), "bic": float(model.bic),
        "fixed_names": list(design.fixed_names), "dropped_fixed": list(design.dropped_fixed),
        "categories": categories, "terms": terms,
        "known_variances": bool(model.known_variances),
        "offsets": list(design.formula.offsets), "offset_argument": design.offset_argument,
        "data_name": getattr(model, "data_name", None),
    }
    if design.residual_model is not None:
        groups = model.residual_groups()
        header.update(dispformula=design.residual_model.formula,
                      dispersion={k: float(v) for k, v in model.dispersion.items()},
                      residual_groups=None if groups is None else
                      {str(k): float(v) for k, v in groups.items()})
    arrays.update(theta=np.asarray(model.theta, dtype=float),
                  fixef=model.fixef.to_numpy(dtype=float),
                  vcov=model.vcov.to_numpy(dtype=float))
    path = Path(path)
    write_atomically(path, lambda handle: np.savez_compressed(
        handle, header=np.array(json.dumps(header)), **arrays))
    return path


def write_atomically(path, write) -> Path:
    """Write a file so that it is, at every moment, either its old or its new content.

    ``write(handle)`` fills a temporary file in the same folder (opened ``"wb"``); the
    file is flushed and synced to disk, then renamed over ``path`` and the folder
    synced. A write that fails or is killed leaves ``path`` untouched (a killed one
    may leave a hidden ``.<name>.<random>.tmp`` beside it).

    Parameters
    ----------
    path : str or Path
        The file to write; a symbolic link is followed, so its target is replaced.
    write : callable
        ``write(handle)`` writes the content to a binary file handle.

    Returns
    -------
    Path
        ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name, got {type(path).__name__}")
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    folder = target.parent
    if target.is_dir():
        raise DataError(f"{str(path)!r} is a folder; give a file name")
    if not folder.is_dir():
        raise DataError(f"the folder of {str(path)!r} does not exist")
    while True:
        temporary = folder / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            # 0o666 under the umask: the permissions open(path, "w") would have given
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():
            # keep the mode the user gave the file they are replacing
            os.chmod(temporary, target.stat().st_mode & 0o7777)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(folder)
    return path


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class SavedModel(StatsmodelsNames):
    """A fitted model read back by :func:`load`: its estimates, BLUPs and ``predict``.

    Attributes
    ----------
    formula : str
    reml : bool
    objective, sigma, loglik, aic, bic : float
    nobs : int
    theta : ndarray
    fixef : Series
    vcov : DataFrame
    varcorr : DataFrame
        Variances and SDs (covariances and correlations) by term, as the fitted model's.
    ranef, ranef_sd : dict of DataFrame
        BLUPs and their conditional SDs by grouping factor (``ranef_sd`` empty when
        the file was saved with ``conditional_sd=False``).

    Examples
    --------
    >>> import henderson as hd, pandas as pd, tempfile, os
    >>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    >>> path = os.path.join(tempfile.mkdtemp(), "sleep.npz")
    >>> _ = m.save(path)
    >>> saved = hd.load(path)
    >>> new = pd.DataFrame({"Days": [0, 10], "Subject": ["308", "999"]})
    >>> saved.predict(new, allow_new_levels=True).round(2).tolist()
    [253.66, 356.08]
    """

    def __init__(self, header: dict, arrays: dict[str, np.ndarray]):
        self._header = header
        self.formula = header["formula"]
        self.reml = header["reml"]
        for key in ("objective", "sigma", "loglik", "aic", "bic", "nobs", "npar"):
            setattr(self, key, header[key])
        self.theta = arrays["theta"]
        names = header["fixed_names"]
        self.fixef = pd.Series(arrays["fixef"], index=names, name="estimate")
        self.vcov = pd.DataFrame(arrays["vcov"], index=names, columns=names)
        self._terms = header["terms"]
        self._levels = [pd.Index(arrays[f"levels_{t}"], name=term["group"])
                        for t, term in enumerate(self._terms)]
        self.random_effects_vector = [arrays[f"ranef_{t}"] for t in range(len(self._terms))]
        self._covariances = [arrays[f"covariance_{t}"] for t in range(len(self._terms))]
        self.ranef = self._tables(self.random_effects_vector)
        sds = [arrays.get(f"ranef_sd_{t}") for t in range(len(self._terms))]
        self.ranef_sd = self._tables(sds) if all(s is not None for s in sds) else {}
        self.varcorr = self._varcorr()

    def _tables(self, per_term) -> dict[str, pd.DataFrame]:
        frames: dict[str, list[pd.DataFrame]] = {}
        for term, levels, values in zip(self._terms, self._levels, per_term):
            frames.setdefault(term["group"], []).append(
                pd.DataFrame(values, index=levels, columns=term["coef_names"]))
        return {g: f[0] if len(f) == 1 else pd.concat(f, axis=1) for g, f in frames.items()}

    def _varcorr(self) -> pd.DataFrame:
        return varcorr_table([t["name"] for t in self._terms],
                             [t["coef_names"] for t in self._terms],
                             self._covariances, self.sigma,
                             self._header.get("residual_groups"))

    @property
    def covariance_parameters(self) -> dict[str, dict]:
        """Each term's structure and its own parameters, as the fitted model's
        ``covariance_parameters`` (empty for files written before henderson saved
        them)."""
        out = TermTable()
        for term in self._terms:
            if term["parameters"] is None:
                continue
            out[term["name"]] = {key: (value if key == "structure" or value is None
                                       or isinstance(value, (int, float)) else
                                       np.asarray(value, dtype=float))
                                 for key, value in term["parameters"].items()}
            out.aliases[_normal_term(f"{term['structure']}({term['covariates']} | "
                                     f"{term['group']})")] = term["name"]
        return out

    @property
    def dispersion(self) -> pd.Series:
        """The dispformula's coefficients of ``log σ²``, as the fitted model's (without
        a dispformula, the intercept alone: ``log σ²``)."""
        values = self._header.get("dispersion")
        if values is None:
            values = {"(Intercept)": 2.0 * np.log(self.sigma)}
        return pd.Series(values, name="log variance")

    @property
    def residual_variances(self) -> pd.Series:
        """Residual variance by group of the dispformula (one, σ², without)."""
        groups = self._header.get("residual_groups")
        if groups is None:
            if self._header.get("dispformula") is not None:
                raise ValueError("a continuous dispformula gives each row its own "
                                 "residual variance")
            return pd.Series({"Residual": self.sigma ** 2}, name="variance")
        return pd.Series(groups, name="variance")

    def predict(self, newdata: pd.DataFrame, re: bool = True,
                allow_new_levels: bool = False, offset=None) -> np.ndarray:
        """Predictions ``X β̂ (+ Z b̂) (+ offset)`` for new rows, as the fitted model's
        :meth:`~henderson.results.LinearMixedModel.predict` (a level not seen in the
        fit is an error unless ``allow_new_levels``, then it contributes 0)."""

        if not isinstance(newdata, pd.DataFrame):
            raise TypeError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        if not isinstance(re, (bool, np.bool_)):
            raise TypeError(f"re must be True or False, got {re!r}")
        header = self._header
        needed = set(spec_variables(header["fixed"], newdata.columns, missing=True))
        if re:
            for term in self._terms:
                needed |= set(spec_variables(term["covariates"], newdata.columns,
                                             missing=True))
                needed |= set(term["factors"])
        check_newdata(newdata, needed)
        frame = with_categories(newdata.reset_index(drop=True), header["categories"])
        prediction = _model_matrix(header["fixed"], frame, list(self.fixef.index)) \
            @ self.fixef.to_numpy()
        prediction += predicted_offset(tuple(header.get("offsets", ())),
                                       header.get("offset_argument"), frame, offset)
        if not re:
            return prediction
        for term, levels, b in zip(self._terms, self._levels, self.random_effects_vector):
            if not allow_new_levels:
                check_new_levels(newdata, term["factors"], levels)
            z = _model_matrix(term["covariates"], frame, term["coef_names"])
            prediction += blup_contribution(newdata, term["factors"], levels, z, b)
        return prediction

    def summary(self) -> Summary:
        """The estimates as the fitted model's ``summary()`` printed them, with Wald t
        values (the Satterthwaite df need the equations, which a file does not keep)."""
        groups = dict.fromkeys((t["group"], len(lv)) for t, lv in zip(self._terms, self._levels))
        head = [f"Linear mixed model fit by {'REML' if self.reml else 'maximum likelihood'} "
                "['henderson'], loaded from file"]
        name = self._header.get("data_name")
        head += call_lines(self.formula, name if isinstance(name, str) else None)
        head += [""] + criterion_lines(self.reml, self.objective, self.aic, self.bic,
                                       self.loglik, self.nobs - self.npar, 1) + [""]
        re_lines, columns, cells = varcorr_lines(
            [t["name"] for t in self._terms], [t["coef_names"] for t in self._terms],
            self._covariances, self.sigma, self._header.get("residual_groups"))
        more = structure_lines(self.covariance_parameters)
        if self._header.get("dispformula") is not None:
            more.append(dispersion_line(self._header["dispformula"], self.dispersion))
        more.append(groups_line(self.nobs, groups))
        table = pd.DataFrame({"Estimate": self.fixef.to_numpy(), "Std. Error": self.bse,
                              "t value": self.tvalues}, index=self.fixef.index)
        blocks = [("text", head), ("text", re_lines), ("text", more)]
        if len(table):
            blocks.append(("text", ["", "Fixed effects:"] + coefficient_lines(
                table.to_numpy(), list(table.index), list(table.columns))))
        return Summary(blocks, {"random_effects": self.varcorr, "fixed_effects": table})

    def __repr__(self) -> str:
        return str(self.summary())

    def _repr_html_(self) -> str:
        return self.summary().as_html()


def _model_matrix(spec: str, frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The columns ``columns`` of the model matrix of ``spec`` for ``frame`` (built as
    the fit built it: :func:`henderson.design._model_matrix`)."""
    try:
        values, names, _ = design_model_matrix(spec, frame)
    except HendersonError as exc:
        raise DataError(f"cannot build {spec!r} for newdata: {exc}") from exc
    matrix = pd.DataFrame(values, columns=names)
    absent = [c for c in columns if c not in matrix.columns]
    if absent:
        raise DataError(f"the saved model's columns {', '.join(map(repr, absent))} are not "
                        f"among those {spec!r} builds for newdata")
    return matrix[columns].to_numpy()


def load(path) -> SavedModel:
    """Read a model written by ``m.save(path)``.

    The file is checked before anything is built from it: a truncated or damaged
    archive, a header that is not the JSON ``save`` writes, an array whose shape or
    dtype disagrees with the header, or a formula expression outside what a saved
    model can hold (column names, numbers, arithmetic, ``I()`` and numeric functions
    such as ``log``) raises a :class:`DataError` naming the file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    SavedModel

    Raises
    ------
    DataError
        The file is absent, or is not a whole, well-formed saved henderson model.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name, got {type(path).__name__}")
    path = Path(path)
    name = repr(str(path))
    if not path.exists():
        raise DataError(f"model file {name} not found")
    if path.is_dir():
        raise DataError(f"model file {name} is a folder")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{name} is not a saved henderson model (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:  # zip, zlib and .npy errors of a damaged file alike
        raise DataError(f"{name} is not a saved henderson model (damaged or truncated: "
                        f"{type(exc).__name__}: {exc})") from exc
    if "header" not in arrays:
        raise DataError(f"{name} is not a saved henderson model (no header)")
    header = _read_header(arrays.pop("header"), name)
    _check_arrays(header, arrays, name)
    return SavedModel(header, arrays)


#: header entries and their JSON types (``"number"``: int or float, not bool)
_HEADER_FIELDS = {
    "formula": "str", "fixed": "str", "response": "str", "reml": "bool",
    "objective": "number", "sigma": "number", "loglik": "number", "aic": "number",
    "bic": "number", "nobs": "int", "npar": "int", "fixed_names": "str list",
    "dropped_fixed": "str list", "categories": "dict", "terms": "list",
    "known_variances": "bool",
}
_TERM_FIELDS = {
    "name": "str", "group": "str", "factors": "str list", "covariates": "str",
    "coef_names": "str list", "known_covariance": "bool",
}
#: the functions a saved formula may call (formulaic evaluates expressions as
#: Python, so a model file from elsewhere must not be able to name anything else)
SAFE_FUNCTIONS = frozenset({
    "I", "log", "log2", "log10", "log1p", "exp", "expm1", "sqrt", "abs", "floor",
    "ceil", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
})
_SAFE_NODES = (ast.Expression, ast.Name, ast.Load, ast.Constant, ast.BinOp, ast.UnaryOp,
               ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.operator,
               ast.unaryop, ast.boolop, ast.cmpop)


def _is_type(value, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, {"dict": dict, "list": list}[kind])


def _bad_parameters(parameters, structure: str, k: int) -> str | None:
    """Why a saved term's structure parameters are not those of ``structure`` over k
    coefficients (None when they are): the keys each structure reports, SDs ≥ 0, ρ in
    [−1, 1], a k x k correlation matrix for ``us``."""
    expected = {"us": {"sd", "corr"}, "diag": {"sd"}, "cs": {"sd", "rho"},
                "ar1": {"sd", "rho"}, "toep": {"sd", "rho"}}.get(structure)
    if expected is None:
        return f"unknown structure {structure!r}"
    if not isinstance(parameters, dict) or parameters.get("structure") != structure:
        return f"not those of the term's structure {structure!r}"
    if set(parameters) - {"structure"} != expected:
        return f"{structure} has {sorted(expected)}, got {sorted(set(parameters) - {'structure'})}"

    def numbers(value, length, low, high):
        values = value if isinstance(value, list) else [value]
        return (len(values) == length and all(
            _is_type(v, "number") and low <= v <= high for v in values))

    n_sd = 1 if structure == "ar1" else k
    if not numbers(parameters["sd"], n_sd, 0.0, np.inf):
        return f"'sd' must be {n_sd} SD(s) ≥ 0"
    if structure in ("cs", "ar1") and not numbers(parameters["rho"], 1, -1.0, 1.0):
        return "'rho' must be a correlation"
    if structure == "toep" and not (isinstance(parameters["rho"], list)
                                    and numbers(parameters["rho"], k - 1, -1.0, 1.0)):
        return f"'rho' must be {k - 1} correlations by lag"
    if structure == "us":
        corr = parameters["corr"]
        if not (isinstance(corr, list) and len(corr) == k and all(
                isinstance(row, list) and numbers(row, k, -1.0, 1.0) for row in corr)):
            return f"'corr' must be a {k} x {k} correlation matrix"
    return None


def _read_header(array: np.ndarray, name: str) -> dict:
    """The JSON header, with every field ``save_model`` writes, of the right type."""
    def bad(why: str) -> DataError:
        return DataError(f"{name} is not a saved henderson model ({why})")

    if array.dtype.kind != "U" or array.shape != ():
        raise bad("its header is not a string")
    try:
        header = json.loads(str(array))
    except ValueError as exc:
        raise bad(f"its header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise bad(f"its header does not say format {FORMAT!r}")
    version = header.get("version")
    if not _is_type(version, "int") or version < 1:
        raise bad(f"format version {version!r}")
    if version > VERSION:
        raise DataError(f"{name} was written by a newer henderson (format version {version})")
    for field, kind in _HEADER_FIELDS.items():
        if field not in header:
            raise bad(f"its header lacks {field!r}")
        if not _is_type(header[field], kind):
            raise bad(f"header field {field!r} is not a {kind}")
    for variable, categories in header["categories"].items():
        if not isinstance(categories, list) or not all(
                isinstance(c, (str, int, float, bool)) for c in categories):
            raise bad(f"the categories of {variable!r} are not a list of values")
    for t, term in enumerate(header["terms"]):
        if not isinstance(term, dict):
            raise bad(f"term {t} of its header is not an object")
        for field, kind in _TERM_FIELDS.items():
            if not _is_type(term.get(field), kind):
                raise bad(f"term {t} of its header lacks a {kind} {field!r}")
        if not term["factors"] or not term["coef_names"]:
            raise bad(f"term {t} of its header has no factors or no coefficients")
        if not set(term["factors"]) <= set(term["group"].split(":")):
            raise bad(f"term {t}'s factors are not those of its group {term['group']!r}")
    for spec in [header["fixed"]] + [term["covariates"] for term in header["terms"]]:
        _check_expressions(spec, name)
    # absent from files before structures and dispformulas were saved
    for t, term in enumerate(header["terms"]):
        term.setdefault("structure", "us")
        parameters = term.setdefault("parameters", None)
        if parameters is not None:
            why = _bad_parameters(parameters, term["structure"], len(term["coef_names"]))
            if why:
                raise bad(f"term {t}'s parameters: {why}")
    dispformula = header.setdefault("dispformula", None)
    dispersion = header.setdefault("dispersion", None)
    groups = header.setdefault("residual_groups", None)
    if dispformula is None:
        if dispersion is not None or groups is not None:
            raise bad("it has residual variances by group but no dispformula")
    else:
        if not isinstance(dispformula, str):
            raise bad("header field 'dispformula' is not a string")
        if not (isinstance(dispersion, dict) and dispersion and all(
                _is_type(v, "number") and np.isfinite(v) for v in dispersion.values())):
            raise bad("header field 'dispersion' is not a dict of finite numbers")
        if groups is not None and not (isinstance(groups, dict) and all(
                _is_type(v, "number") and np.isfinite(v) and v > 0
                for v in groups.values())):
            raise bad("header field 'residual_groups' is not a dict of positive variances")
    offsets = header.setdefault("offsets", [])  # absent from files before offsets
    if not _is_type(offsets, "str list"):
        raise bad("header field 'offsets' is not a str list")
    argument = header.setdefault("offset_argument", None)
    if argument is not None and not isinstance(argument, str):
        raise bad("header field 'offset_argument' is not a string")
    for text in offsets:  # evaluated as I(...) on newdata
        _check_expressions(python_expression(f"I({text})"), name)
    return header


def _check_expressions(spec: str, name: str) -> None:
    """A :class:`DataError` unless every expression of the formula ``spec`` is a
    column, a number, arithmetic or a call of :data:`SAFE_FUNCTIONS`."""
    import formulaic
    from formulaic.formula import SimpleFormula

    try:
        formula = formulaic.Formula(spec)
    except Exception as exc:
        raise DataError(f"{name} holds a formula that does not parse: {spec!r}") from exc
    if not isinstance(formula, SimpleFormula):
        raise DataError(f"{name} holds {spec!r} where a right-hand side belongs")
    for term in formula:
        for factor in term.factors:
            if getattr(factor.eval_method, "value", factor.eval_method) != "python":
                continue
            try:
                tree = ast.parse(factor.expr, mode="eval")
            except SyntaxError as exc:
                raise DataError(f"{name} holds an expression that does not parse: "
                                f"{factor.expr!r}") from exc
            for node in ast.walk(tree):
                if not _safe_node(node):
                    raise DataError(
                        f"{name} holds the expression {factor.expr!r}, which a saved model "
                        "may not evaluate (allowed: columns, numbers, arithmetic and "
                        f"{', '.join(sorted(SAFE_FUNCTIONS))})")


def _safe_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        # np.log / numpy.log, and only as the function of a call (checked there)
        return (isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")
                and node.attr in SAFE_FUNCTIONS)
    if isinstance(node, ast.Name):
        return not node.id.startswith("_")
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, complex, str, bool, type(None)))
    if isinstance(node, ast.Call):
        func = node.func
        return ((isinstance(func, ast.Name) and func.id in SAFE_FUNCTIONS)
                or isinstance(func, ast.Attribute))
    return isinstance(node, _SAFE_NODES)


def _check_arrays(header: dict, arrays: dict[str, np.ndarray], name: str) -> None:
    """A :class:`DataError` unless the arrays are exactly those the header implies,
    with its shapes and dtypes."""
    def expect(key: str, kind: str, shape: tuple) -> None:
        if key not in arrays:
            raise DataError(f"{name} is not a saved henderson model (no {key!r} array)")
        array = arrays[key]
        if array.dtype.kind != kind or array.ndim != len(shape) or any(
                want is not None and got != want for got, want in zip(array.shape, shape)):
            dims = " x ".join("n" if s is None else str(s) for s in shape) or "scalar"
            raise DataError(f"{name} is not a saved henderson model (array {key!r} is "
                            f"{array.dtype} {array.shape}, expected "
                            f"{'strings' if kind == 'U' else 'floats'} of shape {dims})")

    p = len(header["fixed_names"])
    expect("theta", "f", (None,))
    expect("fixef", "f", (p,))
    expect("vcov", "f", (p, p))
    expected = {"theta", "fixef", "vcov"}
    with_sd = [f"ranef_sd_{t}" in arrays for t in range(len(header["terms"]))]
    if any(with_sd) and not all(with_sd):
        raise DataError(f"{name} is not a saved henderson model (conditional SDs for "
                        "some terms only)")
    for t, term in enumerate(header["terms"]):
        k = len(term["coef_names"])
        expect(f"levels_{t}", "U", (None,))
        levels = arrays[f"levels_{t}"]
        if len(set(levels.tolist())) != len(levels):
            raise DataError(f"{name} is not a saved henderson model (the levels of "
                            f"{term['group']!r} repeat)")
        m = len(levels)
        expect(f"ranef_{t}", "f", (m, k))
        expect(f"covariance_{t}", "f", (k, k))
        keys = [f"levels_{t}", f"ranef_{t}", f"covariance_{t}"]
        if with_sd[t]:
            expect(f"ranef_sd_{t}", "f", (m, k))
            keys.append(f"ranef_sd_{t}")
        expected.update(keys)
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise DataError(f"{name} is not a saved henderson model (unexpected array(s) "
                        f"{', '.join(map(repr, unexpected))})")
