"""Example data shipped with henderson, with R's factor levels applied.

>>> import henderson as hd
>>> hd.datasets.load("plants").shape
(10, 3)
"""
from __future__ import annotations

import json
from importlib import resources

import pandas as pd

NAMES = ("plants", "sleepstudy", "sleepstudy_weighted", "dyestuff", "dyestuff2",
         "pastes", "penicillin", "insteval", "animal_records", "animal_pedigree",
         "machines", "orthodont")


def load(name: str) -> pd.DataFrame:
    """Load a bundled data set; categorical columns carry R's level order.

    Parameters
    ----------
    name : str
        One of ``henderson.datasets.NAMES``. ``animal_pedigree`` and
        ``animal_records`` are a simulated pedigree (860 animals, 6 generations) and
        its 1,039 records (the reference of ``tests/data/animal``). ``machines`` and
        ``orthodont`` are nlme's Machines and Orthodont (the glmmTMB references of
        ``tests/data/covstruct``).
    """
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(NAMES)}")
    folder = resources.files(__name__)
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
