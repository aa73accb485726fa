"""Saved models: no pickle, the same estimates, predictions equal to the fitted model's."""
import zipfile

import numpy as np
import pandas as pd
import pytest

import henderson as hd
from henderson.errors import DataError

MODELS = [
    ("plants", "height ~ moisture + (1 | pot)"),
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("insteval", "y ~ service * dept + (1 | s) + (1 | d)"),
    ("pastes", "strength ~ 1 + (1 | batch/cask)"),
]


@pytest.mark.parametrize("name,formula", MODELS, ids=[m[0] for m in MODELS])
def test_loaded_model_predicts_as_the_fitted_one(tmp_path, name, formula):
    data = hd.datasets.load(name)
    model = hd.lmm(formula, data)
    path = model.save(tmp_path / "model.henderson")
    assert path.name == "model.henderson"  # the name given, no suffix added
    saved = hd.load(path)
    np.testing.assert_array_equal(saved.predict(data), model.predict(data))
    np.testing.assert_allclose(saved.predict(data), model.fitted, rtol=1e-12)
    np.testing.assert_array_equal(saved.predict(data, re=False),
                                  model.predict(data, re=False))
    pd.testing.assert_series_equal(saved.fixef, model.fixef)
    pd.testing.assert_frame_equal(saved.vcov, model.vcov)
    pd.testing.assert_frame_equal(saved.varcorr, model.varcorr)
    for group in model.ranef:
        pd.testing.assert_frame_equal(saved.ranef[group], model.ranef[group])
        pd.testing.assert_frame_equal(saved.ranef_sd[group], model.ranef_sd[group])
    assert saved.objective == model.objective and saved.nobs == model.nobs
    np.testing.assert_array_equal(saved.theta, model.theta)
    assert "Fixed effects" in saved.summary() and model.design.formula.text in saved.summary()


def test_saved_file_holds_no_pickled_objects(tmp_path):
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    path = model.save(tmp_path / "m.npz", conditional_sd=False)
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            header = archive.read(member)[:10]
            assert header.startswith(b"\x93NUMPY")
    with np.load(path, allow_pickle=False) as arrays:  # would raise on an object array
        assert all(arrays[key].dtype != object for key in arrays.files)
    assert hd.load(path).ranef_sd == {}


def test_new_levels_and_unseen_categories():
    data = hd.datasets.load("insteval").iloc[:5000]
    model = hd.lmm("y ~ service + (1 | s) + (1 | d)", data)
    new = data.iloc[:3].copy()
    new["s"] = new["s"].astype(str) + "-new"     # new student: population prediction for s
    expected = model.predict(new, allow_new_levels=True)
    import os
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "m.npz")
    model.save(path)
    saved = hd.load(path)
    np.testing.assert_allclose(saved.predict(new, allow_new_levels=True), expected, rtol=1e-12)
    with pytest.raises(DataError, match="allow_new_levels"):
        saved.predict(new)
    bad = data.iloc[:3].assign(service=["0", "1", "7"])
    with pytest.raises(DataError, match="'service' has value\\(s\\) not seen in the fit: '7'"):
        saved.predict(bad)
    with pytest.raises(hd.FormulaError, match="'service'"):
        saved.predict(data[["s", "d", "y"]])


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        hd.load(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match="not a saved henderson model"):
        hd.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(DataError, match="no header"):
        hd.load(tmp_path / "other.npz")


def test_stateful_transforms_are_refused_clearly(tmp_path):
    data = hd.datasets.load("sleepstudy")
    model = hd.lmm("Reaction ~ center(Days) + (1 | Subject)", data)
    with pytest.raises(ValueError, match="stateful transforms"):
        model.save(tmp_path / "m.npz")


def test_chunked_fit_saves_and_loads(tmp_path):
    data = hd.datasets.load("sleepstudy")
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.chunked(data, chunk_rows=45))
    saved = hd.load(model.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(saved.predict(data), model.predict(data))
