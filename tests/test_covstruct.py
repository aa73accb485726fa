"""glmmTMB's covariance structures (us, diag, cs, ar1, toep) and dispformula against
glmmTMB 1.1.5's fits (tests/data/covstruct, copied from shared/reference/covstruct; its
README says what every field means): objective within 1e-6 relative (lower is fine:
glmmTMB optimises less tightly), fixed effects within 1e-3, covariance matrices within
1e-2, the structures' own parameters, and the residual model's variances."""
import json

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

import henderson as hd

FOLDER = DATA / "covstruct"
CASES = sorted(p.stem for p in (FOLDER / "cases").glob("*.json"))


def load_data(name: str) -> pd.DataFrame:
    """A case's data with R's level order (which ar1/toep run over)."""
    schema = json.loads((FOLDER / "data" / f"{name}.schema.json").read_text())
    categorical = schema.get("categorical", {})
    frame = pd.read_csv(FOLDER / "data" / f"{name}.csv", dtype={c: str for c in categorical})
    for column, levels in categorical.items():
        frame[column] = pd.Categorical(frame[column], categories=levels)
    return frame


def fit(case: dict, **options):
    return hd.lmm(case["formula"], load_data(case["data"]), reml=case["REML"],
                  dispformula=case["dispformula"], **options)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("optimizer", ["auto", "lbfgs"])
def test_structure_matches_glmmtmb(name, optimizer):
    case = json.loads((FOLDER / "cases" / f"{name}.json").read_text())
    m = fit(case, optimizer=optimizer)
    assert m.converged
    scale = abs(case["objective"])
    assert m.objective <= case["objective"] + 1e-6 * scale
    assert m.objective == pytest.approx(case["objective"], rel=1e-6)
    assert list(m.fixef.index) == case["fixef"]["names"]
    np.testing.assert_allclose(m.fixef, case["fixef"]["estimate"], rtol=1e-3, atol=1e-6)
    # glmmTMB's SEs come from TMB's joint Hessian, ours are lme4's σ²(X'V⁻¹X)⁻¹ at
    # the estimates: equal for the lme4-shaped cases, 0.13% apart for ar1
    np.testing.assert_allclose(np.sqrt(np.diag(m.vcov)), case["fixef"]["std_error"], rtol=5e-3)
    covariances = list(m.covariance_matrices().values())
    for term, cov in zip(case["terms"], covariances):
        np.testing.assert_allclose(cov, term["cov"], rtol=1e-2, atol=1e-2 * np.max(term["cov"]))
        params = m.covariance_parameters[term["term"]]
        assert params["structure"] == term["structure"]
        expected = case["covariance_parameters"][term["term"]]
        np.testing.assert_allclose(np.atleast_1d(params["sd"]), expected["sd"], rtol=1e-2)
        if "rho" in expected:
            np.testing.assert_allclose(params["rho"], expected["rho"], atol=1e-2)
    residual = case["residual"]
    if case["dispformula"] is None:
        assert m.sigma == pytest.approx(residual["sigma"], rel=1e-3)
    else:
        variances = m.residual_variances
        for level, variance in residual["variance_by_level"].items():
            assert variances[level] == pytest.approx(variance, rel=1e-3)
        np.testing.assert_allclose(m.dispersion, residual["dispersion_coef"]["estimate"],
                                   rtol=1e-3)
    assert m.npar == case["df"]


def test_structured_term_with_one_record_per_random_effect_is_fitted():
    """lme4 refuses as many random effects as rows; an ar1 term with one record per
    subject and time (1600 of each here) is identified by its two parameters."""
    case = json.loads((FOLDER / "cases" / "sim_ar1_reml.json").read_text())
    m = fit(case)
    assert m.design.n_random == m.nobs == 1600


def test_us_is_lme4s_bar_and_diag_of_one_column_terms_is_lme4s_double_bar(sleepstudy):
    a = hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    b = hd.lmm("Reaction ~ Days + us(Days | Subject)", sleepstudy)
    assert b.objective == pytest.approx(a.objective, rel=1e-12)
    c = hd.lmm("Reaction ~ Days + (Days || Subject)", sleepstudy)
    d = hd.lmm("Reaction ~ Days + diag(Days | Subject)", sleepstudy)
    assert d.objective == pytest.approx(c.objective, rel=1e-10)


def test_structures_nest_lrt_and_persist(tmp_path):
    """cs ⊂ us (one correlation), ar1 ⊂ toep: likelihood-ratio tests between
    structures, and saved models keep the covariance matrices."""
    data = load_data("machines")
    ml = {s: hd.lmm(f"score ~ Machine + {s}(0 + Machine | Worker)", data, reml=False)
          for s in ("diag", "cs", "us", "ar1", "toep")}
    assert ml["us"].objective <= ml["cs"].objective + 1e-8 <= ml["diag"].objective + 1e-8
    assert ml["toep"].objective <= ml["ar1"].objective + 1e-8
    table = hd.anova(ml["cs"], ml["us"])
    assert table["Df"].iloc[1] == 2  # us: 6 parameters, cs: 4
    path = ml["cs"].save(tmp_path / "cs.npz")
    saved = hd.load(path)
    np.testing.assert_allclose(saved.varcorr["vcov"], ml["cs"].varcorr["vcov"], rtol=1e-12)
    np.testing.assert_allclose(saved.predict(data), ml["cs"].predict(data), rtol=1e-12)


def test_fixed_variances_of_a_structure():
    """BLUP at a known cs covariance: θ from the covariance, and back."""
    data = load_data("machines")
    m = hd.lmm("score ~ Machine + cs(0 + Machine | Worker)", data)
    cov = m.covariance_matrices()["Worker"]
    known = hd.lmm("score ~ Machine + cs(0 + Machine | Worker)", data,
                   fixed_variances={"Worker": cov, "residual": m.sigma ** 2})
    np.testing.assert_allclose(known.fixef, m.fixef, rtol=1e-8)
    # the term named as written, as covariance_parameters accepts it (and .get)
    by_text = hd.lmm("score ~ Machine + cs(0 + Machine | Worker)", data,
                     fixed_variances={"cs(0+Machine | Worker)": cov, "residual": m.sigma ** 2})
    np.testing.assert_allclose(by_text.fixef, m.fixef, rtol=1e-8)
    assert m.covariance_parameters.get("cs(0 + Machine | Worker)")["structure"] == "cs"
    assert m.covariance_parameters.get("toep(0 + Machine | Worker)") is None
    with pytest.raises(ValueError, match="cs"):
        hd.lmm("score ~ Machine + cs(0 + Machine | Worker)", data,
               fixed_variances={"Worker": np.diag([1.0, 2.0, 3.0]) + 0.1 * np.eye(3)[::-1],
                                "residual": 1.0})


def test_chunked_fit_of_a_structure_equals_the_in_memory_one():
    data = load_data("sim_ar1")
    formula = "y ~ x + time + ar1(0 + timef | subj)"
    memory = hd.lmm(formula, data)
    chunked = hd.lmm(formula, hd.chunked(data, chunk_rows=300))
    assert chunked.objective == pytest.approx(memory.objective, rel=1e-10)
    assert chunked.covariance_parameters["subj"]["rho"] == pytest.approx(
        memory.covariance_parameters["subj"]["rho"], rel=1e-6)


@pytest.mark.parametrize("formula", [
    "y ~ x + ar1(1 + timef | subj)",      # an intercept: not a process over levels
    "y ~ x + ou(0 + timef | subj)",       # a glmmTMB structure henderson does not have
    "y ~ x + cs(0 + timef || subj)",
    "y ~ x + ar1(0 + time | subj)",       # a number: one slope, no correlation at all
    "y ~ x + toep(0 + time | subj)",
    "y ~ x + ar1(0 + x | subj)",
    "y ~ x + toep(0 + time + x | subj)",  # two columns, not a factor's levels
])
def test_structures_henderson_cannot_honour_are_errors(formula):
    """ar1 and toep on integer times (as a CSV reads them) fitted one random slope,
    4938.3 instead of 4814.1, and reported no correlation: a different model."""
    with pytest.raises(hd.FormulaError, match=None if "ar1(1" in formula or "||" in formula
                       or "ou(" in formula else "factor"):
        hd.lmm(formula, load_data("sim_ar1"))


def dense_reml_deviance(model, values: np.ndarray) -> float:
    """REML deviance (σ not profiled) at the flat parameters ``values`` (the terms'
    SDs and correlations, then σ), from V built densely from the structures'
    definitions (conftest.covariance_from_parameters)."""
    from conftest import covariance_from_parameters

    design = model.design
    X, y = np.asarray(design.X), design.y
    sigma = values[-1]
    V = sigma ** 2 * np.diag(1.0 / design.weights)
    position = 0
    for name, term in zip(model.covariance_parameters, design.terms):
        kind = model.covariance_parameters[name]["structure"]
        count = len(term.structure.flat_parameters(term.structure.start(), 1.0))
        part = values[position:position + count]
        position += count
        k = term.n_coefs
        if kind == "us":
            sd, corr, i = np.zeros(k), np.eye(k), 0
            for a in range(k):
                sd[a] = part[i]
                i += 1
                for b in range(a + 1, k):
                    corr[a, b] = corr[b, a] = part[i]
                    i += 1
            params = {"sd": sd, "corr": corr}
        else:
            n_sd = 1 if kind == "ar1" else k
            params = {"sd": part[:n_sd], "rho": part[n_sd] if kind in ("cs", "ar1") and k > 1
                      else part[n_sd:]}
        covariance = covariance_from_parameters(kind, k, params)
        Z = term.z_matrix().toarray()
        V += Z @ np.kron(np.eye(term.n_levels), covariance) @ Z.T
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    n, p = X.shape
    return float(np.linalg.slogdet(V)[1] + np.linalg.slogdet(XtViX)[1] + r @ Vi @ r
                 + (n - p) * np.log(2 * np.pi))


@pytest.mark.parametrize("formula,data", [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    ("score ~ Machine + cs(0 + Machine | Worker)", "machines"),
])
def test_covariance_parameter_standard_errors_equal_a_dense_hessian(formula, data):
    """SEs of the structures' own parameters: 2 H⁻¹ of the REML deviance in those
    parameters, numerically, from a dense V (no θ, no Λ)."""
    frame = hd.datasets.load("sleepstudy") if data == "sleepstudy" else load_data(data)
    m = hd.lmm(formula, frame)
    table = m.covariance_parameter_table
    x = table["estimate"].to_numpy()
    step = 1e-3 * np.maximum(np.abs(x), 0.05)
    n = len(x)
    hessian = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            ei, ej = np.eye(n)[i] * step[i], np.eye(n)[j] * step[j]
            hessian[i, j] = (dense_reml_deviance(m, x + ei + ej) - dense_reml_deviance(m, x + ei - ej)
                             - dense_reml_deviance(m, x - ei + ej)
                             + dense_reml_deviance(m, x - ei - ej)) / (4 * step[i] * step[j])
    expected = np.sqrt(np.diag(2 * np.linalg.inv(hessian)))
    np.testing.assert_allclose(table["std_error"], expected, rtol=5e-3)


def test_unused_levels_are_dropped_as_r_drops_them():
    """A categorical with a level that has no rows (D) got a column of zeros in Z: its
    SD "estimated" with an SE (0.350, SE 0.041) from no data; in a dispformula, a
    coefficient of its own. R's model frame drops unused levels; so does henderson."""
    machines = hd.datasets.load("machines")
    padded = machines.assign(Machine=pd.Categorical(machines.Machine.astype(str),
                                                    categories=list("ABCD")))
    for formula in ("score ~ Machine + cs(0 + Machine | Worker)",
                    "score ~ Machine + (0 + Machine | Worker)"):
        plain, fitted = hd.lmm(formula, machines), hd.lmm(formula, padded)
        assert fitted.objective == pytest.approx(plain.objective, rel=1e-10)
        assert list(fitted.covariance_parameter_table.index) == list(
            plain.covariance_parameter_table.index)
        assert not any("MachineD" in name for name in fitted.covariance_parameter_table.index)
    orthodont = hd.datasets.load("orthodont")
    sexes = pd.Categorical(orthodont.Sex.astype(str), categories=["Female", "Male", "X"])
    fitted = hd.lmm("distance ~ age * Sex + (1 | Subject)", orthodont.assign(S=sexes),
                    dispformula="~ S")
    assert list(fitted.dispersion.index) == ["(Intercept)", "SMale"]


def test_anova_of_models_that_are_not_nested_warns():
    """The model with more parameters has the higher deviance: lme4 prints χ² = 0,
    p = 1 without a word; henderson says the test does not apply."""
    machines = hd.datasets.load("machines")
    diag = hd.lmm("score ~ Machine + diag(0 + Machine | Worker)", machines)
    ar1 = hd.lmm("score ~ Machine + ar1(0 + Machine | Worker)", machines)
    with pytest.warns(UserWarning, match="not nested"):
        table = hd.anova(diag, ar1)
    assert table["Chisq"].iloc[1] == 0.0
    cs = hd.lmm("score ~ Machine + cs(0 + Machine | Worker)", machines)
    us = hd.lmm("score ~ Machine + (0 + Machine | Worker)", machines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hd.anova(cs, us)["Chisq"].iloc[1] > 0  # nested: no warning


def test_a_space_before_the_structures_parenthesis_is_allowed_as_in_r():
    machines = hd.datasets.load("machines")
    spaced = hd.lmm("score ~ Machine + cs (0+Machine|Worker)", machines)
    plain = hd.lmm("score ~ Machine + cs(0 + Machine | Worker)", machines)
    assert spaced.objective == pytest.approx(plain.objective, rel=1e-12)
    assert spaced.covariance_parameters["Worker"]["structure"] == "cs"


EXTRA = json.loads((FOLDER / "extra" / "glmmtmb_extra.json").read_text())["cases"]


@pytest.mark.parametrize("name", list(EXTRA))
def test_more_structures_match_glmmtmb(name):
    """Nine more glmmTMB 1.1.5 fits (extra/make_extra.R): ar1 with a dispformula, ar1
    over factor(time), cs over 8 levels (henderson stopped 9.5 units above it, at
    ρ = 0.23 with σ → 0), us, diag, a continuous dispformula; toep (~15 s each) lies
    on a ridge where σ → 0, and is within 1e-6 relative."""
    case = EXTRA[name]
    data = load_data("sim_ar1") if case["data"] == "sim_ar1" else hd.datasets.load(case["data"])
    dispformula = case["dispformula"].replace("~", "~ ") if case["dispformula"] else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # toep: σ → 0 may warn
        m = hd.lmm(case["formula"], data, reml=case["REML"], dispformula=dispformula)
    scale = abs(case["objective"])
    assert m.objective <= case["objective"] + 1e-6 * scale
    assert m.objective == pytest.approx(case["objective"], rel=1e-6)
    np.testing.assert_allclose(m.fixef, list(case["fixef"].values()), rtol=1e-3, atol=1e-6)
    for cov, expected in zip(m.covariance_matrices().values(), case["cov"].values()):
        expected = np.atleast_2d(expected)
        np.testing.assert_allclose(cov, expected, rtol=1e-2, atol=1e-2 * np.max(expected))
    if dispformula:
        np.testing.assert_allclose(m.dispersion, list(case["disp"].values()), rtol=1e-3,
                                   atol=1e-4)
