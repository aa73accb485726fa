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


def test_repr_of_a_model_without_fixed_effects():
    """repr(m) crashed on `0 + (1 | g)` (review of issue 16)."""
    m = hd.lmm("Reaction ~ 0 + (1 | Subject)", hd.datasets.load("sleepstudy"))
    assert repr(m).splitlines()[-1] == "No fixed effect coefficients"
    assert "Fixed effects:" not in str(m.summary())


def test_correlation_of_fixed_effects_up_to_twelve_as_lme4():
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"g": rng.integers(0, 20, 400).astype(str)})
    for j in range(12):
        frame[f"covariate{j}"] = rng.normal(size=400)
    frame["y"] = frame.filter(like="covariate").sum(axis=1) + rng.normal(size=400)
    twelve = " + ".join(f"covariate{j}" for j in range(11))    # + intercept = 12
    m = hd.lmm(f"y ~ {twelve} + (1 | g)", frame)
    text = str(m.summary())
    assert "Correlation of Fixed Effects:" in text
    # R wraps the 12-column matrix at 80 columns: the row names come again
    block = text.split("Correlation of Fixed Effects:")[1].splitlines()
    assert sum(line.startswith("covariate10") for line in block) == 2
    assert all(len(line) < 80 for line in block)
    m13 = hd.lmm(f"y ~ {twelve} + covariate11 + (1 | g)", frame)
    text = str(m13.summary())
    assert "Correlation of Fixed Effects:" not in text
    assert "Correlation matrix not shown by default, as p = 13 > 12." in text
    assert "Correlation of Fixed Effects:" in str(m13.summary(correlation=True))


def test_weights_and_data_lines_name_what_the_user_gave(tmp_path, capsys):
    weighted = hd.datasets.load("sleepstudy_weighted")
    m = hd.lmm("Reaction ~ Days + (Days || Subject)", weighted, weights="w")
    lines = str(m.summary()).splitlines()
    assert "   Data: weighted" in lines and "Weights: w" in lines
    subset = hd.lmm("Reaction ~ Days + (1 | Subject)",
                    hd.datasets.load("sleepstudy").query("Days > 2"))
    assert not any(line.startswith("   Data:") for line in str(subset.summary()).splitlines())
    assert "   Data: weighted" in str(m.refit(reml=False).summary()).splitlines()
    m.save(tmp_path / "m.npz")
    assert "   Data: weighted" in str(hd.load(tmp_path / "m.npz").summary()).splitlines()
    path = tmp_path / "sleep.csv"
    hd.datasets.load("sleepstudy").to_csv(path, index=False)
    assert main(["fit", "Reaction ~ Days + (1 | Subject)", str(path), "--quiet"]) == 0
    assert f"   Data: {path}" in capsys.readouterr().out.splitlines()


def test_notebook_html_has_the_legend_and_left_aligned_names():
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    html = m._repr_html_()
    assert "Signif. codes" in html
    assert "<td style=\"text-align:left;font-family:monospace\">Subject</td>" in html


def test_a_given_zero_variance_does_not_warn_of_a_singular_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hd.SingularFitWarning)
        hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"),
               fixed_variances={"Subject": [[600, 0], [0, 0]], "residual": 650})


def test_a_bad_formula_fails_before_the_first_fit_loads_the_kernels():
    import subprocess
    import sys
    code = ("import henderson as hd, henderson.fit as f\n"
            "try:\n    hd.lmm('Reaction ~ nosuch + (1 | Subject)', hd.datasets.load('sleepstudy'))\n"
            "except hd.FormulaError:\n    print(f._KERNELS_LOADED)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
