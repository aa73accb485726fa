"""Likelihood-ratio tests and predictions against lme4 (tests/data/inference)."""
import numpy as np
import pandas as pd
import pytest

import henderson as hd
from conftest import load_json

REF = load_json("inference", "lme4_inference.json")


def test_lrt_matches_lme4_anova(sleepstudy):
    ref = REF["sleepstudy_lrt"]
    m0 = hd.lmm(ref["m0"], sleepstudy)
    m1 = hd.lmm(ref["m1"], sleepstudy)
    table = hd.anova(m1, m0)  # order of arguments does not matter
    assert np.allclose(table["deviance"], ref["deviance"], rtol=1e-6)
    assert np.allclose(table["AIC"], ref["AIC"], rtol=1e-6)
    assert np.allclose(table["BIC"], ref["BIC"], rtol=1e-6)
    assert table["Chisq"].iloc[1] == pytest.approx(ref["chisq"], rel=1e-6)
    assert table["Df"].iloc[1] == ref["df"]
    assert table["Pr(>Chisq)"].iloc[1] == pytest.approx(ref["p"], rel=1e-6)


def test_predictions_with_and_without_random_effects(sleepstudy):
    ref = REF["sleepstudy_predict"]
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    new = pd.DataFrame(ref["newdata"])
    # lme4's predict(..., allow.new.levels = TRUE): a new subject gets the population
    assert np.allclose(m.predict(new, allow_new_levels=True), ref["with_random"], rtol=1e-6)
    assert np.allclose(m.predict(new, re=False), ref["population"], rtol=1e-6)
    with pytest.raises(hd.DataError, match="allow_new_levels"):
        m.predict(new)  # lme4's default: new levels are an error


def test_predict_matches_levels_as_r_labels_them(sleepstudy):
    """Subject 308 as a float (308.0, e.g. read from a CSV with missing values) is the
    fitted level 308; it got the population prediction when levels were matched by
    their Python string form."""
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    as_int = m.predict(pd.DataFrame({"Days": [1.0, 1.0], "Subject": [308, 309]}))
    as_float = m.predict(pd.DataFrame({"Days": [1.0, 1.0], "Subject": [308.0, 309.0]}))
    as_text = m.predict(pd.DataFrame({"Days": [1.0, 1.0], "Subject": ["308", "309"]}))
    np.testing.assert_array_equal(as_float, as_int)
    np.testing.assert_array_equal(as_text, as_int)
    population = m.predict(pd.DataFrame({"Days": [1.0, 1.0]}), re=False)
    assert np.all(np.abs(as_float - population) > 1.0)


@pytest.mark.parametrize("formula", ["Reaction ~ Day + (1 | Subject)",
                                     "Reaction ~ Days + (1 | Subject) + (1 | Day)",
                                     "Reaction ~ Days + cs(0 + Day | Subject)"])
def test_numbers_given_for_a_factor_are_its_levels(sleepstudy, formula):
    """A factor fitted with levels "0".."9" and predicted from the numbers 0..9 (a CSV
    read back): formulaic took the numbers for a numeric column, every dummy equal to
    the number, a prediction off by hundreds with no message. A saved model had it
    right; the fitted one now does the same, and a number that is no level is an
    error."""
    data = sleepstudy.assign(Day=pd.Categorical(sleepstudy.Days.astype(str),
                                                [str(d) for d in range(10)]))
    m = hd.lmm(formula, data)
    rows = data.iloc[[3, 15, 27]]
    expected = m.fitted.to_numpy()[[3, 15, 27]]
    for day in (rows.Days.astype(int), rows.Days.astype(float), rows.Days.astype(str)):
        new = pd.DataFrame({"Days": rows.Days.to_numpy(), "Subject": rows.Subject.to_numpy(),
                            "Day": day.to_numpy()})
        np.testing.assert_allclose(m.predict(new), expected, rtol=1e-10)
    with pytest.raises(hd.DataError, match=r"\b12\b"):
        m.predict(pd.DataFrame({"Days": [1], "Subject": [308], "Day": [12]}))


def test_unseen_level_of_a_fixed_factor_is_an_error(sleepstudy):
    """It used to be encoded as the reference level, silently."""
    m = hd.lmm("Reaction ~ factor(Days) + (1 | Subject)", sleepstudy)
    with pytest.raises(hd.DataError, match="'11'"):
        m.predict(pd.DataFrame({"Days": [1, 11], "Subject": [308, 309]}))


def test_predict_errors(sleepstudy):
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    with pytest.raises(hd.FormulaError, match="'Days'"):
        m.predict(pd.DataFrame({"Subject": ["308"]}))
    with pytest.raises(hd.FormulaError, match="'Subject'"):
        m.predict(pd.DataFrame({"Days": [1.0]}))
    assert m.predict(pd.DataFrame({"Days": [1.0]}), re=False).shape == (1,)


@pytest.mark.parametrize("name", [n for n in __import__("conftest").CASES
                                  if "satterthwaite_df" in __import__("conftest").load_case(n)["fixef"]])
def test_satterthwaite_df_match_lmertest(name):
    from conftest import load_case

    case = load_case(name)
    m = hd.lmm(case["formula"], hd.datasets.load(case["data"]), reml=case["REML"],
               weights=case["weights"])
    table = m.coef_table
    ref = np.array(case["fixef"]["satterthwaite_df"])
    assert list(table.index) == case["fixef"]["names"]
    assert np.all(np.abs(table["df"].to_numpy() - ref) / ref < 1e-3)
    assert np.allclose(table["Std. Error"], case["fixef"]["std_error"], rtol=2e-3)


def test_satterthwaite_t_and_p_for_sleepstudy(sleepstudy):
    ref = REF["sleepstudy_satterthwaite"]
    table = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy).coef_table
    assert np.allclose(table["t value"], ref["t"], rtol=1e-4)
    assert np.allclose(table["Pr(>|t|)"], ref["p"], rtol=1e-2)


def test_type3_anova_matches_lmertest_on_insteval():
    ref = REF["insteval_anova_satterthwaite"]
    m = hd.lmm(ref["formula"], hd.datasets.load("insteval"))
    table = m.anova()
    assert list(table.index) == ref["terms"]
    assert np.allclose(table["F value"], ref["F"], rtol=1e-4)
    assert np.allclose(table["NumDF"], ref["NumDF"])
    assert np.allclose(table["DenDF"], ref["DenDF"], rtol=1e-2)
    assert np.allclose(table["Pr(>F)"], ref["p"], rtol=1e-2)
    # a one-row contrast: F = t² and the same df as the coefficient table
    L = np.zeros((1, len(m.fixef)))
    L[0, 1] = 1.0
    one = m.test(L)
    row = m.coef_table.iloc[1]
    assert one["F value"] == pytest.approx(row["t value"] ** 2, rel=1e-10)
    assert one["DenDF"] == pytest.approx(row["df"], rel=1e-10)


def test_kenward_roger_matches_pbkrtest(sleepstudy):
    ref = REF["sleepstudy_kenward_roger"]
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    table = m.coefficients(ddf="Kenward-Roger")
    assert list(table.index) == ref["names"]
    assert np.allclose(table["df"], ref["df"], rtol=1e-3)
    assert np.allclose(table["Std. Error"], ref["se"], rtol=1e-4)
    assert np.allclose(table["Pr(>|t|)"], ref["p"], rtol=1e-3)


def test_kenward_roger_is_below_satterthwaite_on_an_unbalanced_crossed_design():
    m = hd.lmm("diameter ~ 1 + (1|plate) + (1|sample)", hd.datasets.load("penicillin"))
    kr = m.coefficients(ddf="Kenward-Roger")
    sw = m.coef_table
    # one intercept, two crossed factors: both approximations land near the number
    # of samples (6) minus one, and KR's variance adjustment only inflates the SE
    assert 4 < kr["df"].iloc[0] < 6.5 and 4 < sw["df"].iloc[0] < 6.5
    assert kr["Std. Error"].iloc[0] >= sw["Std. Error"].iloc[0] * (1 - 1e-9)


def test_summary_prints_satterthwaite_or_kenward_roger(sleepstudy):
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    assert "Satterthwaite" in m.summary() and "Pr(>|t|)" in m.summary()
    kr = m.summary(ddf="Kenward-Roger")
    assert "Kenward-Roger" in kr and "17" in kr


def test_anova_refuses_models_of_different_responses(sleepstudy):
    """It compared them: χ² 0, p 1."""
    m0 = hd.lmm("Reaction ~ Days + (1 | Subject)", sleepstudy)
    m1 = hd.lmm("log(Reaction) ~ Days + (Days | Subject)", sleepstudy)
    with pytest.raises(ValueError, match="different responses"):
        hd.anova(m0, m1)
    other = sleepstudy.assign(Reaction=sleepstudy.Reaction[::-1].to_numpy())
    m2 = hd.lmm("Reaction ~ Days + (Days | Subject)", other)
    with pytest.raises(ValueError, match="different values"):
        hd.anova(m0, m2)
    with pytest.raises(TypeError, match="argument 2"):
        hd.anova(m0, "x")
