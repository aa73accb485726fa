"""Example data shipped with henderson, with R's factor levels applied.

>>> import henderson as hd
>>> hd.datasets.load("plants").shape
(10, 3)
"""
from __future__ import annotations

import json
from pathlib import Path
from importlib import resources

import pandas as pd

NAMES = ("plants", "sleepstudy", "sleepstudy_weighted", "dyestuff", "dyestuff2",
         "pastes", "penicillin", "insteval", "animal_records", "animal_pedigree",
         "machines", "orthodont")
#: Mrode (2014), *Linear Models for the Prediction of Animal Breeding Values*, 3rd ed.:
#: the examples' records (``load("mrode_5_1")``) and pedigrees
#: (``load("mrode_5_1_pedigree")``); :func:`mrode` gives both with the book's model
MRODE = ("mrode_3_1", "mrode_3_4", "mrode_4_1", "mrode_5_1", "mrode_5_2", "mrode_5_4",
         "mrode_7_1", "mrode_9_2")


def load(name: str) -> pd.DataFrame:
    """Load a bundled data set; categorical columns carry R's level order, and
    ``attrs["name"]`` the set's name (a summary's ``Data:`` line).

    Parameters
    ----------
    name : str
        One of ``henderson.datasets.NAMES``. ``animal_pedigree`` and
        ``animal_records`` are a simulated pedigree (860 animals, 6 generations) and
        its 1,039 records (the reference of ``tests/data/animal``). ``machines`` and
        ``orthodont`` are nlme's Machines and Orthodont (the glmmTMB references of
        ``tests/data/covstruct``). ``mrode_*`` are the records of Mrode's textbook
        examples (``mrode_*_pedigree`` their pedigrees; see :func:`mrode`).

    Examples
    --------
    >>> import henderson as hd
    >>> hd.datasets.load("sleepstudy").shape
    (180, 3)
    """
    frame = _read(name)
    frame.attrs.update(name=name, rows=len(frame))   # a subset keeps attrs, not its rows
    return frame


def export(name: str, path) -> Path:
    """Write a bundled data set to ``path`` (CSV, or Parquet for a ``.parquet`` name),
    for the command line and the README's examples: ``henderson data sleepstudy``
    does the same from the shell.

    Examples
    --------
    >>> import tempfile, os, henderson as hd
    >>> folder = tempfile.mkdtemp()
    >>> hd.datasets.export("sleepstudy", os.path.join(folder, "sleepstudy.csv")).name
    'sleepstudy.csv'
    """
    frame = load(name)
    path = Path(path)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _read(name: str) -> pd.DataFrame:
    folder = resources.files(__name__)
    if name.endswith("_pedigree") and name[:-len("_pedigree")] in MRODE:
        with resources.as_file(folder / f"{name}.csv") as path:
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    if name in MRODE:
        schema = json.loads((folder / f"{name}.schema.json").read_text())
        with resources.as_file(folder / f"{name}.csv") as path:
            frame = pd.read_csv(path, dtype={c: str for c in
                                             list(schema["categorical"]) + schema["text"]})
        for column, levels in schema["categorical"].items():
            frame[column] = pd.Categorical(frame[column], categories=levels)
        return frame
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(NAMES + MRODE)} "
                         "(and each mrode_* with _pedigree)")
    if name == "animal_pedigree":  # identifiers as text, "0" for an unknown parent
        with resources.as_file(folder / f"{name}.csv") as path:
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    if name == "animal_records":
        with resources.as_file(folder / f"{name}.csv") as path:
            return pd.read_csv(path, dtype={"animal": str, "sex": str, "hy": str})
    schema = json.loads((folder / f"{name}.schema.json").read_text())
    categorical = schema.get("categorical", {})
    with resources.as_file(folder / f"{name}.csv") as path:
        frame = pd.read_csv(path, dtype={c: str for c in categorical})
    for column, levels in categorical.items():
        frame[column] = pd.Categorical(frame[column], categories=levels)
    return frame


def mrode(example: str) -> dict:
    """A textbook example of Mrode (2014, 3rd ed.) with the book's model.

    Parameters
    ----------
    example : str
        ``"3.1"`` animal model, ``"3.4"`` unknown-parent groups, ``"4.1"``
        repeatability, ``"5.1"`` two traits, ``"5.2"`` two traits with missing
        records, ``"5.4"`` two traits on different animals, ``"7.1"`` maternal
        effects, ``"9.2"`` random regression.

    Returns
    -------
    dict
        ``data``, ``pedigree`` (a :class:`~henderson.Pedigree`, with the groups of
        3.4), ``formula``, ``fixed_variances`` (the book's (co)variances), ``covary``
        and ``relationships`` (every term the pedigree applies to), ready for
        ``hd.lmm(**{k: v for k, v in case.items() if k in (...)})``; 9.2's data
        carries its Legendre covariables ``leg0 … leg4``.

    Examples
    --------
    >>> import henderson as hd
    >>> case = hd.datasets.mrode("3.1")
    >>> m = hd.lmm(case["formula"], case["data"], relationships=case["relationships"],
    ...            fixed_variances=case["fixed_variances"])
    >>> round(float(m.ranef["animal"].loc["4"].iloc[0]), 3)
    -0.009
    """
    from ..breeding import legendre
    from ..pedigree import Pedigree

    name = "mrode_" + str(example).replace(".", "_")
    if name not in MRODE:
        raise ValueError(f"unknown Mrode example {example!r}; available: "
                         + ", ".join(n[6:].replace("_", ".") for n in MRODE))
    folder = resources.files(__name__)
    schema = json.loads((folder / f"{name}.schema.json").read_text())
    data = load(name)
    if name == "mrode_9_2":
        data = data.join(legendre(data["dim"], 4, lower=4, upper=310))
    pedigree = Pedigree.from_dataframe(load(f"{name}_pedigree"),
                                       groups=schema.get("pedigree_groups"))
    covary = [tuple(c) for c in schema.get("covary", [])] or None
    groups = ["animal"] + (["dam"] if "dam" in data.columns else [])
    fixed = {(tuple(k.split(",")) if "," in k else k): v
             for k, v in schema["fixed_variances"].items()}
    return {"data": data, "pedigree": pedigree, "formula": schema["formula"],
            "fixed_variances": fixed, "covary": covary,
            "relationships": {g: pedigree for g in groups}, "title": schema["title"]}
