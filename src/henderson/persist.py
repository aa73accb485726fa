"""Fitted models on disk, without pickle: ``m.save(path)`` and ``hd.load(path)``.

The file is a NumPy ``.npz`` archive holding only numeric and string arrays (it is
read with ``allow_pickle=False``): the estimates, the BLUPs and conditional SDs with
their level labels, and a JSON header with the formula, the names and the categories
each categorical covariate was encoded with. That is all prediction needs, so a
loaded model predicts for new rows exactly as the fitted one did.

Saving is atomic (a temporary file in the same folder, synced, then renamed over the
target), so a save that is killed leaves the previous file whole.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import pandas as pd

from .design import lme4_column_name, with_categories
from .errors import DataError

FORMAT = "henderson-model"
VERSION = 1


def _plain(value):
    """A JSON-able Python value from a NumPy scalar."""
    return value.item() if hasattr(value, "item") else value


def _spec_categories(spec) -> dict[str, list]:
    """Categories of the categorical variables a formulaic ModelSpec encoded."""
    if spec.transform_state:
        raise ValueError(
            "cannot save a model whose formula uses stateful transforms "
            f"({', '.join(spec.transform_state)}); compute those columns before fitting")
    out = {}
    columns = set(spec.required_variables)
    for name, (kind, state) in spec.encoder_state.items():
        if getattr(kind, "value", kind) != "categorical":
            continue
        if name not in columns:
            raise ValueError(
                f"cannot save a model that encodes the expression {name!r} as a factor; "
                "make it a categorical column of the data before fitting")
        out[name] = [_plain(c) for c in state["categories"]]
    return out


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
    from .results import _group_names

    design = model.design
    categories = _spec_categories(design.fixed_spec)
    for term in design.terms:
        categories.update(_spec_categories(term.z_spec))
    names = _group_names(design)
    offsets = design.column_offsets()
    sds = None
    if conditional_sd:
        sds = model._conditional_sds() if hasattr(model, "_conditional_sds") else None
    terms, arrays = [], {}
    for t, term in enumerate(design.terms):
        terms.append({
            "name": names[t], "group": term.group, "factors": list(term.factors),
            "covariates": str(term.z_spec.formula), "coef_names": list(term.coef_names),
            "known_covariance": term.level_precision is not None,
        })
        arrays[f"levels_{t}"] = np.asarray(term.levels.astype(str), dtype=str)
        arrays[f"ranef_{t}"] = model._b[offsets[t]:offsets[t + 1]].reshape(
            term.n_levels, term.n_coefs)
        if sds is not None:
            arrays[f"ranef_sd_{t}"] = sds[t]
        arrays[f"covariance_{t}"] = model.sigma ** 2 * (
            model._relative_factors[t] @ model._relative_factors[t].T)
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
    }
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
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    folder = target.parent
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


class SavedModel:
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
    >>> saved.predict(new).round(2).tolist()
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
        self._b = [arrays[f"ranef_{t}"] for t in range(len(self._terms))]
        self._covariances = [arrays[f"covariance_{t}"] for t in range(len(self._terms))]
        self.ranef = self._tables(self._b)
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
        from .results import varcorr_table

        return varcorr_table([t["name"] for t in self._terms],
                             [t["coef_names"] for t in self._terms],
                             self._covariances, self.sigma)

    def predict(self, newdata: pd.DataFrame, re: bool = True) -> np.ndarray:
        """Predictions ``X β̂ (+ Z b̂)`` for new rows, as the fitted model's ``predict``
        (a level not seen in the fit contributes 0)."""
        import formulaic

        from .results import blup_contribution, check_newdata

        header = self._header
        needed = set(formulaic.Formula(header["fixed"]).required_variables)
        if re:
            for term in self._terms:
                needed |= set(formulaic.Formula(term["covariates"]).required_variables)
                needed |= set(term["factors"])
        check_newdata(newdata, needed)
        frame = with_categories(newdata[sorted(needed)].reset_index(drop=True),
                                header["categories"])
        prediction = _model_matrix(header["fixed"], frame)[self.fixef.index].to_numpy() \
            @ self.fixef.to_numpy()
        if not re:
            return prediction
        for term, levels, b in zip(self._terms, self._levels, self._b):
            z = _model_matrix(term["covariates"], frame)[term["coef_names"]].to_numpy()
            prediction += blup_contribution(newdata, term["factors"], levels, z, b)
        return prediction

    def summary(self) -> str:
        """The estimates as ``summary()`` printed them (Wald t values)."""
        from .results import random_effects_lines

        method = "REML" if self.reml else "maximum likelihood"
        lines = [f"Linear mixed model fit by {method} ['henderson'], loaded from file",
                 f"Formula: {self.formula}", "",
                 f"{'AIC':>10} {'BIC':>10} {'logLik':>10} {'REML crit' if self.reml else 'deviance':>10}",
                 f"{self.aic:10.1f} {self.bic:10.1f} {self.loglik:10.1f} {self.objective:10.1f}",
                 ""]
        lines += random_effects_lines([t["name"] for t in self._terms],
                                      [t["coef_names"] for t in self._terms],
                                      self._covariances, self.sigma)
        groups = dict.fromkeys((t["group"], len(lv)) for t, lv in zip(self._terms, self._levels))
        lines.append(f"Number of obs: {self.nobs}, groups:  "
                     + "; ".join(f"{g}, {n}" for g, n in groups))
        se = np.sqrt(np.diag(self.vcov.to_numpy()))
        table = pd.DataFrame({"Estimate": self.fixef.to_numpy(), "Std. Error": se,
                              "t value": self.fixef.to_numpy() / se}, index=self.fixef.index)
        lines += ["", "Fixed effects:", table.to_string(float_format=lambda v: f"{v:.4g}")]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _model_matrix(spec: str, frame: pd.DataFrame) -> pd.DataFrame:
    import formulaic

    try:
        matrix = formulaic.model_matrix(spec, frame, na_action="raise")
    except Exception as exc:
        raise DataError(f"cannot build {spec!r} for newdata: {exc}") from exc
    matrix = pd.DataFrame(np.asarray(matrix, dtype=float),
                          columns=[lme4_column_name(c) for c in matrix.columns])
    return matrix


def load(path) -> SavedModel:
    """Read a model written by ``m.save(path)``.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    SavedModel
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"model file {str(path)!r} not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise DataError(f"{str(path)!r} is not a saved henderson model: {exc}") from exc
    if "header" not in arrays:
        raise DataError(f"{str(path)!r} is not a saved henderson model (no header)")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a saved henderson model")
    if header.get("version", 0) > VERSION:
        raise DataError(f"{str(path)!r} was written by a newer henderson "
                        f"(format version {header['version']})")
    return SavedModel(header, arrays)
