"""The names lme4 and statsmodels users reach for (issue 16): statsmodels' aliases on
fitted and saved models, predict() without newdata, new levels refused by default,
VarCorr's missing names, and `henderson data` for the README's files."""
import warnings

import numpy as np
import pandas as pd
import pytest

import henderson as hd
from henderson.cli import main


@pytest.fixture(scope="module")
def sleep():
    return hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))


def test_statsmodels_aliases_equal_the_henderson_names(sleep):
    pd.testing.assert_series_equal(sleep.params, sleep.fixef)
    np.testing.assert_allclose(sleep.bse, np.sqrt(np.diag(sleep.vcov)))
    np.testing.assert_allclose(sleep.tvalues, sleep.coef_table["t value"])
    np.testing.assert_allclose(sleep.pvalues, sleep.coef_table["Pr(>|t|)"])
    np.testing.assert_allclose(sleep.fittedvalues, sleep.fitted)
    np.testing.assert_allclose(sleep.resid, sleep.response - sleep.fitted)
    assert sleep.llf == sleep.loglik and sleep.llf == pytest.approx(-871.8141, abs=1e-3)
    assert list(sleep.bse.index) == ["(Intercept)", "Days"]


def test_aliases_on_a_saved_model(sleep, tmp_path):
    sleep.save(tmp_path / "m.npz")
    saved = hd.load(tmp_path / "m.npz")
    np.testing.assert_allclose(saved.params, sleep.params)
    np.testing.assert_allclose(saved.bse, sleep.bse)
    np.testing.assert_allclose(saved.tvalues, sleep.tvalues)
    assert saved.llf == pytest.approx(sleep.llf)
    text = str(saved.summary())
    assert "  251.405      6.825  36.838" in text and "loaded from file" in text


def test_predict_without_newdata_is_the_fitted_values(sleep):
    np.testing.assert_allclose(sleep.predict(), sleep.fitted)
    np.testing.assert_allclose(sleep.predict(re=False), sleep.population_fitted)


def test_new_levels_need_allow_new_levels(sleep):
    new = pd.DataFrame({"Days": [1.0], "Subject": ["999"]})
    with pytest.raises(hd.DataError, match="999"):
        sleep.predict(new)
    assert sleep.predict(new, allow_new_levels=True)[0] == pytest.approx(
        sleep.fixef["(Intercept)"] + sleep.fixef["Days"])


@pytest.mark.parametrize("formula, data", [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    ("strength ~ 1 + (1 | batch/cask)", "pastes"),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy"),
])
def test_varcorr_names_are_none_where_lme4_has_na(formula, data):
    vc = hd.lmm(formula, hd.datasets.load(data)).varcorr
    for column in ("var1", "var2"):
        values = vc[column].tolist()
        assert all(v is None or isinstance(v, str) for v in values), values
    assert vc["var1"].iloc[-1] is None and vc["var2"].iloc[0] is None


def test_henderson_data_writes_and_lists_the_bundled_sets(tmp_path, capsys):
    assert main(["data"]) == 0
    names = capsys.readouterr().out.split()
    assert {"sleepstudy", "animal_records", "animal_pedigree", "insteval"} <= set(names)
    assert main(["data", "sleepstudy", "--out", str(tmp_path / "s.csv")]) == 0
    frame = pd.read_csv(tmp_path / "s.csv")
    assert frame.shape == (180, 3) and frame["Reaction"].iloc[0] == 249.56
    assert main(["data", "pastes", "--out", str(tmp_path / "p.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "p.parquet").shape == (60, 4)
    assert main(["data", "nosuch"]) == 2
    assert "unknown data set 'nosuch'" in capsys.readouterr().err


def test_summary_and_repr_of_a_large_model_skip_satterthwaite_but_keep_lme4_layout():
    """Above 50 fixed effects the table is lme4's (no df, no p)."""
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"g": rng.integers(0, 30, 600).astype(str),
                          "f": rng.integers(0, 60, 600).astype(str)})
    frame["y"] = rng.normal(size=600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hd.lmm("y ~ f + (1 | g)", frame)
    text = str(m.summary())
    assert "Estimate Std. Error t value" in text and "Pr(>|t|)" not in text
    assert "Correlation of Fixed Effects" not in text          # p > 20, as lme4
