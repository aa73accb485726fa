"""lme4 formula idioms mean what they mean in R: powers, functions of the response and
covariates, factor(), offsets, poly() and scale(), checked against lme4 1.1-31's fits
of the same formulas (tests/data/idioms/, made by R; see its README)."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

import henderson as hd
from henderson.errors import DataError, FormulaError

IDIOMS = json.loads((DATA / "idioms" / "lme4_idioms.json").read_text())


@pytest.fixture(scope="module")
def frame():
    return pd.read_csv(DATA / "idioms" / "sleepstudy_idioms.csv")


@pytest.mark.parametrize("case", IDIOMS, ids=[c["formula"] for c in IDIOMS])
def test_formula_idiom_matches_lme4(frame, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hd.lmm(case["formula"], frame)
    assert m.objective == pytest.approx(case["objective"], rel=1e-8, abs=1e-6)
    assert list(m.fixef.index) == case["fixef_names"]
    np.testing.assert_allclose(m.fixef, case["fixef"], rtol=1e-5, atol=1e-7)
    assert m.sigma == pytest.approx(case["sigma"], rel=1e-5)


def test_power_of_an_integer_column_is_a_power_not_xor(frame):
    """formulaic evaluates I(x^2) as Python, where ^ is bitwise XOR on integers: a
    different model, 81 deviance units worse, with no warning."""
    assert frame["Days"].dtype.kind == "i"
    m = hd.lmm("Reaction ~ Days + I(Days^2) + (1 | Subject)", frame)
    square = m.design.X[:, list(m.fixef.index).index("I(Days^2)")]
    np.testing.assert_array_equal(square, frame["Days"].to_numpy(dtype=float) ** 2)


def test_offset_in_formula_equals_offset_argument_and_predicts(frame):
    a = hd.lmm("Reaction ~ Days + offset(log(n)) + (1 | Subject)", frame)
    b = hd.lmm("Reaction ~ Days + (1 | Subject)", frame, offset=np.log(frame["n"]))
    c = hd.lmm("Reaction ~ Days + (1 | Subject)", frame.assign(o=np.log(frame["n"])),
               offset="o")
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
    assert a.objective == pytest.approx(c.objective, rel=1e-12)
    np.testing.assert_allclose(a.fitted, b.fitted, rtol=1e-10)
    # fitted values and predictions carry the offset; residuals are of the response
    np.testing.assert_allclose(a.predict(frame), a.fitted, rtol=1e-10)
    np.testing.assert_allclose(a.residuals + a.fitted, frame["Reaction"], rtol=1e-12)
    np.testing.assert_allclose(c.predict(frame.assign(o=np.log(frame["n"]))), a.fitted,
                               rtol=1e-10)
    with pytest.raises(DataError, match="offset"):
        b.predict(frame)  # values per row were given: predict needs them again
    np.testing.assert_allclose(b.predict(frame, offset=np.log(frame["n"])), a.fitted,
                               rtol=1e-10)


def test_response_expression_predictions_are_on_its_scale(frame):
    m = hd.lmm("log(Reaction) ~ Days + (1 | Subject)", frame)
    np.testing.assert_allclose(m.response, np.log(frame["Reaction"]))
    np.testing.assert_allclose(m.predict(frame), m.fitted, rtol=1e-12)


@pytest.mark.parametrize("formula", [
    "Reaction ~ . + (1 | Subject)",
    "Reaction ~ nosuchfunction(Days) + (1 | Subject)",
    "Reaction ~ Days + offset(nosuchcolumn) + (1 | Subject)",
])
def test_what_cannot_be_honoured_is_an_error(frame, formula):
    with pytest.raises(FormulaError):
        hd.lmm(formula, frame)


def test_double_parentheses_around_a_bar_are_one_term(frame):
    a = hd.lmm("Reaction ~ Days + ((1 | Subject))", frame)
    b = hd.lmm("Reaction ~ Days + (1 | Subject)", frame)
    assert a.objective == b.objective
