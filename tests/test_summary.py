"""summary(), repr and the notebook HTML against what lme4 1.1-31 with lmerTest prints
for the same fits (tests/data/rformat/summaries, made by make_summaries.R).

Every line must match lme4's, character for character in its text and layout, except
the class in the title; a number may differ by up to 2 in its last printed digit (or
1e-4 relative), where lme4's optimum is itself that far from the optimum (sleepstudy:
henderson's θ gives a lower REML criterion than lme4's), and must still be printed with
lme4's decimals."""
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import henderson as hd
from henderson.report import Summary

FOLDER = Path(__file__).parent / "data" / "rformat" / "summaries"
FITS = {
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", "sleepstudy", True),
    "sleepstudy_ml": ("Reaction ~ Days + (Days | Subject)", "sleepstudy", False),
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", True),
    "pastes": ("strength ~ 1 + (1 | batch/cask)", "pastes", True),
    "dyestuff2": ("Yield ~ 1 + (1 | Batch)", "dyestuff2", True),
    "plants": ("height ~ moisture + (1 | pot)", "plants", True),
}
NUMBER = re.compile(r"-?\d+\.?\d*(?:e[-+]\d+)?")


def _fit(name):
    formula, data, reml = FITS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.SingularFitWarning)
        return hd.lmm(formula, hd.datasets.load(data), reml=reml)


def _same_line(ours: str, theirs: str) -> bool:
    """Equal text, and numbers with the same decimals within 1e-4 relative (or 2 in
    the last printed digit)."""
    if NUMBER.sub("#", ours) != NUMBER.sub("#", theirs):
        return False
    for a, b in zip(NUMBER.findall(ours), NUMBER.findall(theirs)):
        if a == b:
            continue
        if len(a.split(".")[-1]) != len(b.split(".")[-1]) or ("." in a) != ("." in b):
            return False
        places = len(a.split(".")[1]) if "." in a and "e" not in a else 0
        x, y = float(a), float(b)
        if abs(x - y) > max(1e-4 * abs(y), 2.01 * 10.0 ** -places):
            return False
    return True


def _title_lines(lines):
    return next(i for i, line in enumerate(lines) if line.startswith("Formula:"))


@pytest.mark.parametrize("name", list(FITS))
def test_summary_reads_as_lme4s(name):
    text = str(_fit(name).summary())
    theirs = (FOLDER / f"{name}.txt").read_text()
    lme4 = theirs.splitlines()
    lme4 = lme4[_title_lines(lme4):]
    ours = text.splitlines()
    ours = ours[_title_lines(ours):]
    # lme4's extra lines: the optimizer's note and the singular message (ours differ)
    lme4 = [line for line in lme4 if not line.startswith(("optimizer (", "boundary"))]
    ours = [line for line in ours if not line.startswith("boundary")]
    while lme4 and not lme4[-1].strip():
        lme4.pop()
    while ours and not ours[-1].strip():
        ours.pop()
    assert len(ours) == len(lme4), "\n".join(ours) + "\n---\n" + "\n".join(lme4)
    for a, b in zip(ours, lme4):
        assert _same_line(a, b), f"\nhenderson: {a!r}\nlme4:      {b!r}"


@pytest.mark.parametrize("name", list(FITS))
def test_repr_reads_as_lme4s_print(name):
    lme4 = (FOLDER / f"{name}_print.txt").read_text().splitlines()
    ours = repr(_fit(name)).splitlines()
    assert ours[0].startswith("Linear mixed model fit by") and ours[0].endswith("['henderson']")
    lme4, ours = lme4[_title_lines(lme4):], ours[_title_lines(ours):]
    lme4 = [line for line in lme4 if not line.startswith(("optimizer (", "boundary"))]
    ours = [line for line in ours if not line.startswith("boundary")]
    assert len(ours) == len(lme4), "\n".join(ours) + "\n---\n" + "\n".join(lme4)
    for a, b in zip(ours, lme4):
        assert _same_line(a, b), f"\nhenderson: {a!r}\nlme4:      {b!r}"


def test_summary_object_text_html_and_tables():
    m = _fit("sleepstudy")
    s = m.summary()
    assert isinstance(s, Summary)
    assert repr(s) == str(s) == s.as_text()
    assert "\\n" not in repr(s)                # a REPL shows lines, not escapes
    html = m._repr_html_()
    assert html == s.as_html() and html.count("<table>") == 2
    assert "&lt; 2e-16" in html and "251.405" in html and "<pre" in html
    pd.testing.assert_frame_equal(s.tables["fixed_effects"], m.coef_table)
    np.testing.assert_allclose(s.tables["correlation"].loc["Days", "(Intercept)"],
                               m.vcov.iloc[0, 1] / np.sqrt(m.vcov.iloc[0, 0] * m.vcov.iloc[1, 1]))
    scaled = m.residuals / m.sigma
    np.testing.assert_allclose(s.tables["residuals"]["Max"], scaled.max(), atol=1e-4)


def test_tiny_p_values_print_as_bounds_not_zero():
    m = _fit("sleepstudy")
    assert m.coef_table.loc["(Intercept)", "Pr(>|t|)"] < 2.2e-16
    line = [x for x in str(m.summary()).splitlines() if x.startswith("(Intercept)")][0]
    assert "< 2e-16" in line and " 0 " not in line


def test_data_line_names_the_callers_frame_or_the_path(tmp_path):
    sleep = hd.datasets.load("sleepstudy").iloc[:90]
    m = hd.lmm("Reaction ~ Days + (1 | Subject)", sleep)
    assert "   Data: sleep" in str(m.summary()).splitlines()
    path = tmp_path / "rows.csv"
    sleep.to_csv(path, index=False)
    m = hd.lmm("Reaction ~ Days + (1 | Subject)", str(path))
    assert f"   Data: {path}" in repr(m).splitlines()


def test_singular_fit_warns_at_fit_time():
    with pytest.warns(hd.SingularFitWarning, match="boundary"):
        m = hd.lmm("Yield ~ 1 + (1 | Batch)", hd.datasets.load("dyestuff2"))
    assert m.singular and "boundary (singular)" in m.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hd.SingularFitWarning)
        hd.lmm("Yield ~ 1 + (1 | Batch)", hd.datasets.load("dyestuff"))   # not singular
