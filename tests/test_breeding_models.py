"""Breeding models: Mrode's textbook examples against their dense re-derivations
(tests/data/breeding, copied from the shared reference, and tests/data/breeding/extra),
and the general-covariance REML against dense brute-force twins."""
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.optimize

import henderson as hd
from henderson.breeding_model import BreedingModel
from henderson.errors import FormulaError, PedigreeError
from henderson.pedigree import relationship_matrix_tabular
from henderson.simulate import animal_population, maternal_population

DATA = Path(__file__).parent / "data" / "breeding"
CASES = [DATA / f"mrode_{c}" for c in ("3_1", "3_4", "4_1", "9_2")] + [
    DATA / "extra" / f"mrode_{c}" for c in ("mt_equal", "mt_missing", "maternal",
                                           "mt_sexlimited")]
ID_COLUMNS = {"animal", "pe", "dam", "sire"}


def load_case(base: Path):
    case = json.loads(base.with_suffix(".json").read_text())
    data = pd.read_csv(f"{base}_data.csv", dtype=str)
    for column, levels in case["categorical"].items():
        data[column] = pd.Categorical(data[column], categories=levels)
    for column in data.columns:
        if column not in case["categorical"] and column not in ID_COLUMNS:
            data[column] = data[column].astype(float)
    if "legendre" in case:
        spec = case["legendre"]
        data = data.join(hd.legendre(data[spec["column"]], spec["order"],
                                     lower=spec["lower"], upper=spec["upper"]))
    ped = hd.Pedigree.from_dataframe(pd.read_csv(f"{base}_pedigree.csv", dtype=str),
                                     groups=case.get("pedigree_groups"))
    return case, data, ped


def fit_case(base: Path):
    case, data, ped = load_case(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RankDeficiencyWarning)
        m = hd.lmm(case["formula"], data, relationships={g: ped for g in case["relationships"]},
                   fixed_variances=case["fixed_variances"], covary=case.get("covary"))
    return case, data, m


def close_to(got, want):
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    return np.all(np.abs(got - want) <= np.maximum(1e-4, 1e-4 * np.abs(want)))


@pytest.mark.parametrize("base", CASES, ids=lambda b: b.name)
def test_mrode_solutions_and_pevs(base):
    case, data, m = fit_case(base)
    checks, dense = case["checks"], case["dense"]
    for term in checks["random"]:
        ref = dense["random"][term]
        got = m.ranef[term].loc[ref["ids"]].to_numpy()
        want = np.array(ref["values"], dtype=float)
        if checks.get("random_up_to_constant"):
            got = got - (got - want).mean()
        assert close_to(got, want), (term, np.abs(got - want).max())
    for term in checks["pev"]:
        ref = dense["pev"][term]
        got = m.prediction_error_variances[term].loc[ref["ids"]].to_numpy()
        np.testing.assert_allclose(got, np.array(ref["values"], dtype=float), rtol=1e-3)
    if checks.get("xb"):
        for trait, values in dense["xb"].items():
            fitted = m.population_fitted
            got = fitted[trait] if isinstance(fitted, pd.DataFrame) else fitted
            want = np.array([np.nan if v is None else v for v in values], dtype=float)
            np.testing.assert_allclose(got.to_numpy(), want, atol=1e-4)
    if checks.get("fitted"):
        for trait, values in dense["fitted"].items():
            fitted = m.fitted
            got = fitted[trait] if isinstance(fitted, pd.DataFrame) else fitted
            np.testing.assert_allclose(got.to_numpy(), values, atol=1e-4)
    # random-regression PEVs, kept in the reference though its checks list none
    if base.name == "mrode_9_2":
        ref = dense["pev"]["animal"]
        got = m.prediction_error_variances["animal"].loc[ref["ids"]].to_numpy()
        np.testing.assert_allclose(got, np.array(ref["values"]), rtol=1e-3)


def test_mrode_multi_trait_reliabilities_and_long_breeding_values():
    case, data, m = fit_case(DATA / "extra" / "mrode_mt_equal")
    bv = m.breeding_values()
    assert list(bv.columns[:4]) == ["trait", "ebv", "pev", "reliability"]
    assert len(bv) == 2 * len(case["dense"]["random"]["animal"]["ids"])
    G0 = np.array(case["fixed_variances"]["animal"])
    wwg = bv[bv["trait"] == "wwg"]
    np.testing.assert_allclose(wwg["reliability"], 1 - wwg["pev"] / G0[0, 0])
    assert isinstance(m, BreedingModel) and m.covariances["residual"].shape == (2, 2)


def test_maternal_covariances_by_either_order():
    case, data, m = fit_case(DATA / "extra" / "mrode_maternal")
    both = m.covariances[("animal", "dam")]
    np.testing.assert_allclose(both.to_numpy(), case["fixed_variances"]["animal,dam"])
    swapped = m.covariances[("dam", "animal")]
    assert list(swapped.index) == ["dam", "animal"]
    assert m.covariances["dam"].iloc[0, 0] == pytest.approx(both.loc["dam", "dam"])


def test_fixed_variances_for_covaried_terms_as_separate_keys():
    case, data, ped = load_case(DATA / "extra" / "mrode_maternal")
    full = np.array(case["fixed_variances"]["animal,dam"])
    given = {"animal": full[0, 0], "dam": full[1, 1], ("animal", "dam"): full[0, 1],
             "pe": case["fixed_variances"]["pe"], "residual": case["fixed_variances"]["residual"]}
    m = hd.lmm(case["formula"], data, relationships={"animal": ped, "dam": ped},
               covary=[("animal", "dam")], fixed_variances=given)
    ref = case["dense"]["random"]["dam"]
    assert close_to(m.ranef["dam"].loc[ref["ids"]].to_numpy(), ref["values"])


def test_unknown_parent_groups_match_dense_qp_and_report_groups():
    case, data, m = fit_case(DATA / "mrode_3_4")
    groups = m.group_effects
    assert list(groups.index) == ["G1", "G2"]
    # the contrast G2 - G1 is unique whatever the constraint
    g = groups.iloc[:, 0]
    assert g["G2"] - g["G1"] == pytest.approx(case["dense"]["contrasts"]["G2 - G1"], abs=1e-6)
    assert m.design.dropped_groups  # confounded with the intercept: one group set to 0


# ----------------------------------------------------------------- dense twins
def _simulated_two_traits(seed=3, n_base=20, n_off=100, missing=0.2):
    rng = np.random.default_rng(seed)
    ids = [str(i) for i in range(1, n_base + n_off + 1)]
    sire = ["0"] * n_base + [str(rng.integers(1, 11)) for _ in range(n_off)]
    dam = ["0"] * n_base + [str(rng.integers(11, n_base + 1)) for _ in range(n_off)]
    ped = hd.Pedigree(ids, sire, dam)
    A = relationship_matrix_tabular(ped)
    G0, R0 = np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[4.0, 1.5], [1.5, 5.0]])
    n = len(ids)
    a = (np.linalg.cholesky(np.kron(A, G0)) @ rng.standard_normal(2 * n)).reshape(n, 2)
    pos = {k: i for i, k in enumerate(ped.ids)}
    rec = ids[n_base:]
    sex = rng.choice(["F", "M"], len(rec))
    e = rng.standard_normal((len(rec), 2)) @ np.linalg.cholesky(R0).T
    y = np.array([[10.0, 20.0]]) + (sex == "M")[:, None] * np.array([[1.0, -2.0]]) \
        + a[[pos[r] for r in rec]] + e
    y[rng.random(len(rec)) < missing, 1] = np.nan
    data = pd.DataFrame({"animal": rec, "sex": sex, "y1": y[:, 0], "y2": y[:, 1]})
    return data, ped, A, pos


def _dense_reml(V, X, y) -> float:
    """−2 log REML of y ~ N(Xb, V), written without henderson:
    ``(N − p) log 2π + log|V| + log|X'V⁻¹X| + y'Py``."""
    c = scipy.linalg.cho_factor(V, lower=True)
    ViX, Viy = scipy.linalg.cho_solve(c, X), scipy.linalg.cho_solve(c, y)
    XVX = X.T @ ViX
    return ((len(y) - X.shape[1]) * np.log(2 * np.pi) + 2 * np.log(np.diag(c[0])).sum()
            + np.linalg.slogdet(XVX)[1] + y @ Viy - (X.T @ Viy) @ np.linalg.solve(XVX, X.T @ Viy))


def _assert_stationary(m, step=1e-3):
    """No (co)variance parameter moves −2 log L down by ``step`` either way."""
    theta = m.reml_function.params.to_theta(m.matrices)
    for e in np.eye(len(theta)) * step:
        assert min(m.reml_function.objective(theta + e),
                   m.reml_function.objective(theta - e)) > m.objective - 1e-6


def _dense_two_trait_reml(data, A, pos):
    """−2 log REML of ``cbind(y1, y2) ~ sex + (1 | animal)`` from V = ZGZ' + R,
    written without henderson (Cholesky parameters of G0 and R0, log diagonals)."""
    y = data[["y1", "y2"]].to_numpy()
    rows = [(i, t) for i in range(len(y)) for t in range(2) if np.isfinite(y[i, t])]
    N, n = len(rows), A.shape[0]
    yl = np.array([y[i, t] for i, t in rows])
    X, Z = np.zeros((N, 4)), np.zeros((N, 2 * n))
    for r, (i, t) in enumerate(rows):
        X[r, 2 * t] = 1.0
        X[r, 2 * t + 1] = data["sex"].iloc[i] == "M"
        Z[r, pos[data["animal"].iloc[i]] * 2 + t] = 1.0
    trait = np.array([t for _, t in rows])
    record = np.array([i for i, _ in rows])
    same = record[:, None] == record[None, :]

    def matrices(theta):
        out = []
        for a, b, c in (theta[:3], theta[3:]):
            L = np.array([[np.exp(a), 0.0], [b, np.exp(c)]])
            out.append(L @ L.T)
        return out

    def objective(theta):
        G, R = matrices(theta)
        return _dense_reml(Z @ np.kron(A, G) @ Z.T + np.where(same, R[trait][:, trait], 0.0),
                           X, yl)

    return objective, matrices


def _dense_theta(matrix):
    L = np.linalg.cholesky(matrix)
    return np.array([np.log(L[0, 0]), L[1, 0], np.log(L[1, 1])])


def test_two_trait_reml_matches_dense_brute_force():
    data, ped, A, pos = _simulated_two_traits()
    m = hd.lmm("cbind(y1, y2) ~ sex + (1 | animal)", data, relationships={"animal": ped})
    assert m.converged
    objective, matrices = _dense_two_trait_reml(data, A, pos)
    theta = np.concatenate([_dense_theta(M) for M in m.matrices])
    # the criterion itself, at henderson's estimates
    assert objective(theta) == pytest.approx(m.objective, rel=1e-10)
    # the dense optimum from a different start
    best = scipy.optimize.minimize(objective, np.array([0, 0, 0, 1, 0, 1.0]), method="BFGS",
                                   options={"gtol": 1e-8})
    assert m.objective <= best.fun + 1e-6
    G, R = matrices(best.x)
    np.testing.assert_allclose(m.covariances["animal"].to_numpy(), G, rtol=1e-3)
    np.testing.assert_allclose(m.covariances["residual"].to_numpy(), R, rtol=1e-3)
    # SEs from the inverse AI matrix against the dense observed information
    step = 1e-4
    vech = lambda th: np.concatenate([M[np.tril_indices(2)] for M in matrices(th)])
    J = np.column_stack([(vech(theta + step * e) - vech(theta - step * e)) / (2 * step)
                         for e in np.eye(6)])
    H = np.zeros((6, 6))
    for i, ei in enumerate(np.eye(6) * 1e-3):
        for j, ej in enumerate(np.eye(6) * 1e-3):
            H[i, j] = (objective(theta + ei + ej) - objective(theta + ei - ej)
                       - objective(theta - ei + ej) + objective(theta - ei - ej)) / 4e-6
    Jinv = np.linalg.inv(J)
    dense_cov = 2 * np.linalg.inv(Jinv.T @ H @ Jinv)
    se = m.variance_components["std_error"].to_numpy()
    np.testing.assert_allclose(se, np.sqrt(np.diag(dense_cov)), rtol=0.15)
    h2 = m.heritability()
    assert list(h2.index) == ["y1", "y2"] and (h2["std_error"] > 0).all()
    r, r_se = m.genetic_correlation()
    G0 = m.covariances["animal"].to_numpy()
    assert r == pytest.approx(G0[0, 1] / np.sqrt(G0[0, 0] * G0[1, 1])) and r_se > 0


def test_one_trait_general_equations_agree_with_relative_form():
    """cbind of one response goes through the general equations: the same REML fit
    as the relative-form engine (a differential check of both)."""
    data, ped, A, pos = _simulated_two_traits(seed=3, missing=0.0)
    general = hd.lmm("cbind(y1) ~ sex + (1 | animal)", data, relationships={"animal": ped})
    relative = hd.lmm("y1 ~ sex + (1 | animal)", data, relationships={"animal": ped},
                      optimizer="bobyqa")
    assert isinstance(general, BreedingModel)
    assert general.objective == pytest.approx(relative.objective, abs=1e-6)
    np.testing.assert_allclose(general.covariances["animal"].iloc[0, 0],
                               relative.covariances["animal"].iloc[0, 0], rtol=1e-4)
    np.testing.assert_allclose(general.ranef["animal"].iloc[:, 0],
                               relative.ranef["animal"].iloc[:, 0], atol=1e-4)
    np.testing.assert_allclose(general.breeding_values()["pev"],
                               relative.breeding_values()["pev"], rtol=1e-3)


def test_random_regression_ai_reml_agrees_with_bobyqa():
    rng = np.random.default_rng(11)
    ped_frame, records, _ = animal_population(600, 3, seed=4)
    ped = hd.Pedigree.from_dataframe(ped_frame)
    rows = records.loc[records.index.repeat(4)].reset_index(drop=True)
    rows["dim"] = np.tile([5, 100, 200, 300], len(records))
    leg = hd.legendre(rows["dim"], 1, lower=5, upper=300)
    rows = rows.join(leg)
    animal_slope = pd.Series(rng.normal(scale=2.0, size=len(ped_frame)),
                             index=ped_frame["animal"])
    rows["y"] = rows["y"] + animal_slope.loc[rows["animal"]].to_numpy() * rows["leg1"] \
        + rng.normal(scale=3.0, size=len(rows))
    formula = "y ~ sex + leg1 + (0 + leg0 + leg1 | animal)"
    ai = hd.lmm(formula, rows, relationships={"animal": ped})
    assert isinstance(ai, BreedingModel) and ai.converged
    reference = hd.lmm(formula, rows, relationships={"animal": ped}, optimizer="bobyqa")
    assert ai.objective == pytest.approx(reference.objective, abs=1e-4)
    np.testing.assert_allclose(ai.covariances["animal"].to_numpy(),
                               reference.covariances["animal"].to_numpy(), rtol=2e-3, atol=1e-3)


def test_maternal_reml_matches_dense_objective():
    ped_frame, records, truth = maternal_population(1500, 4, seed=2)
    ped = hd.Pedigree.from_dataframe(ped_frame)
    formula = "y ~ sex + (1 | animal) + (1 | dam) + (1 | pe)"
    m = hd.lmm(formula, records, relationships={"animal": ped, "dam": ped},
               covary=[("animal", "dam")])
    assert m.converged
    # dense −2 log REML at the estimates
    A = relationship_matrix_tabular(ped)
    where = pd.Index(ped.ids)
    ia, idam = where.get_indexer(records["animal"]), where.get_indexer(records["dam"])
    n, N = len(ped), len(records)
    Za, Zm = np.zeros((N, n)), np.zeros((N, n))
    Za[np.arange(N), ia] = 1.0
    Zm[np.arange(N), idam] = 1.0
    pe_levels, pe_codes = np.unique(records["pe"], return_inverse=True)
    Zp = np.zeros((N, len(pe_levels)))
    Zp[np.arange(N), pe_codes] = 1.0
    X = np.column_stack([np.ones(N), records["sex"] == "M"]).astype(float)
    G = m.covariances[("animal", "dam")].to_numpy()
    Zam = np.hstack([Za, Zm])
    V = (Zam @ np.kron(G, A) @ Zam.T + m.covariances["pe"].iloc[0, 0] * Zp @ Zp.T
         + m.covariances["residual"].iloc[0, 0] * np.eye(N))
    assert _dense_reml(V, X, records["y"].to_numpy()) == pytest.approx(m.objective, rel=1e-10)
    # and the score is zero there: no (co)variance moves −2 log L down by a step
    _assert_stationary(m)
    h2, se = m.heritability()
    assert 0 < h2 < 1 and se > 0


# ----------------------------------------------------------------- contract and errors
def test_legendre_columns_and_range_errors():
    leg = hd.legendre(pd.Series([4, 157, 310], index=[7, 8, 9]), order=2)
    assert list(leg.columns) == ["leg0", "leg1", "leg2"] and list(leg.index) == [7, 8, 9]
    np.testing.assert_allclose(leg["leg0"], np.sqrt(0.5))
    np.testing.assert_allclose(leg.loc[9, "leg2"], np.sqrt(2.5))
    with pytest.raises(ValueError, match="outside"):
        hd.legendre([1, 400], order=1, lower=4, upper=310)
    with pytest.raises(ValueError, match="order"):
        hd.legendre([1, 2], order=-1)


def test_pedigree_group_errors():
    with pytest.raises(PedigreeError, match="group.*listed as animals"):
        hd.Pedigree(["G1", "2"], ["0", "G1"], ["0", "0"], groups=["G1"])
    ped = hd.Pedigree(["1", "2"], ["G1", "1"], ["G2", "G2"], groups=["G1", "G2"])
    np.testing.assert_allclose(ped.group_contributions(), [[0.5, 0.5], [0.25, 0.75]])
    assert ped.inbreeding.tolist() == [0.0, 0.0]


def test_breeding_model_input_errors():
    case, data, ped = load_case(DATA / "extra" / "mrode_maternal")
    rel = {"animal": ped, "dam": ped}
    with pytest.raises(FormulaError, match="covary"):
        hd.lmm(case["formula"], data, relationships=rel, covary=[("animal", "sire")])
    with pytest.raises(ValueError, match="residual"):
        hd.lmm(case["formula"], data, relationships=rel, covary=[("animal", "dam")],
               fixed_variances={"animal,dam": [[1, 0], [0, 1]], "pe": 1.0})
    with pytest.raises(ValueError, match="positive definite"):
        hd.lmm(case["formula"], data, relationships=rel, covary=[("animal", "dam")],
               fixed_variances={"animal,dam": [[1, 2], [2, 1]], "pe": 1.0, "residual": 1.0})
    mt, mt_data, mt_ped = load_case(DATA / "extra" / "mrode_mt_equal")
    with pytest.raises(FormulaError, match="not found"):
        hd.lmm("cbind(wwg, nope) ~ sex + (1 | animal)", mt_data,
               relationships={"animal": mt_ped})
    with pytest.raises(ValueError, match="REML"):
        hd.lmm(mt["formula"], mt_data, relationships={"animal": mt_ped}, reml=False)


def _grouped_population(seed=7, n_founders=30, n_offspring=200):
    """Founders with unknown parents in groups G1/G2 of different genetic levels."""
    rng = np.random.default_rng(seed)
    ids = [f"a{i}" for i in range(n_founders + n_offspring)]
    group = rng.choice(["G1", "G2"], n_founders)
    sire = list(group) + [ids[rng.integers(0, n_founders // 2)] for _ in range(n_offspring)]
    dam = list(rng.choice(["G1", "G2"], n_founders)) + [
        ids[rng.integers(n_founders // 2, n_founders)] for _ in range(n_offspring)]
    ped = hd.Pedigree(ids, sire, dam, groups=["G1", "G2"])
    level = np.where(group == "G2", 3.0, 0.0)
    bv = np.concatenate([level + rng.normal(scale=1.5, size=n_founders), np.zeros(n_offspring)])
    pos = {k: i for i, k in enumerate(ids)}
    for i in range(n_founders, n_founders + n_offspring):
        bv[i] = 0.5 * (bv[pos[sire[i]]] + bv[pos[dam[i]]]) + rng.normal(scale=1.5 * np.sqrt(0.5))
    rec = ids[n_founders:]
    sex = rng.choice(["F", "M"], len(rec))
    y = 10 + (sex == "M") + bv[n_founders:] + rng.normal(scale=2.0, size=len(rec))
    return ped, pd.DataFrame({"animal": rec, "sex": sex, "y": y})


def test_group_reml_criterion_matches_dense_model_with_groups_as_fixed_covariates():
    """QP transformation: the same REML criterion as groups fitted as fixed covariates
    Z Q (dense, with A of the animals only), and AI-REML at a stationary point."""
    ped, data = _grouped_population()
    m = hd.lmm("y ~ sex + (1 | animal)", data, relationships={"animal": ped})
    assert isinstance(m, BreedingModel) and m.converged
    assert m.group_effects.loc["G2"].iloc[0] - m.group_effects.loc["G1"].iloc[0] > 1.0
    A = relationship_matrix_tabular(ped)
    pos = pd.Index(ped.ids).get_indexer(data["animal"])
    N = len(data)
    Z = np.zeros((N, len(ped)))
    Z[np.arange(N), pos] = 1.0
    ZQ = Z @ ped.group_contributions()
    X = np.column_stack([np.ones(N), data["sex"] == "M", ZQ[:, 0]]).astype(float)  # G2 aliased
    va, ve = m.covariances["animal"].iloc[0, 0], m.covariances["residual"].iloc[0, 0]
    V = va * Z @ A @ Z.T + ve * np.eye(N)
    assert _dense_reml(V, X, data["y"].to_numpy()) == pytest.approx(m.objective, rel=1e-10)
    _assert_stationary(m)


def test_missing_dam_and_pe_mean_no_such_effect():
    """A calf of an unknown dam ("0", and its pe copied from it) has no maternal and
    no pe effect: the BLUPs are those of a dense model with that record's dam and pe
    columns of Z zeroed. A missing level of another factor follows ``missing``."""
    case = hd.datasets.mrode("7.1")
    data = case["data"].astype({"dam": object, "pe": object})
    data.loc[0, ["dam", "pe"]] = "0"
    m = hd.lmm(case["formula"], data, relationships=case["relationships"],
               covary=case["covary"], fixed_variances=case["fixed_variances"])
    ped = case["pedigree"]
    ids = pd.Index(ped.ids)
    N, n = len(data), len(ped)
    Za, Zm = np.zeros((N, n)), np.zeros((N, n))
    Za[np.arange(N), ids.get_indexer(data["animal"])] = 1.0
    Zm[np.arange(1, N), ids.get_indexer(data["dam"][1:])] = 1.0
    pe_levels = sorted(set(data["pe"][1:]), key=int)
    Zp = np.zeros((N, len(pe_levels)))
    Zp[np.arange(1, N), pd.Index(pe_levels).get_indexer(data["pe"][1:])] = 1.0
    X = pd.get_dummies(data[["herd", "pen"]], drop_first=True).astype(float)
    X = np.column_stack([np.ones(N), X])
    Ainv = np.linalg.inv(relationship_matrix_tabular(ped))
    G = np.array(case["fixed_variances"][("animal", "dam")])
    Ginv = np.block([[np.kron(np.linalg.inv(G), Ainv),
                      np.zeros((2 * n, len(pe_levels)))],
                     [np.zeros((len(pe_levels), 2 * n)), np.eye(len(pe_levels)) / 40.0]])
    # the direct and maternal effects stacked member-major: kron(G⁻¹, A⁻¹)
    W = np.hstack([X, Za, Zm, Zp])
    C = W.T @ W / 350.0
    C[X.shape[1]:, X.shape[1]:] += Ginv
    sol = np.linalg.lstsq(C, W.T @ data["bw"].to_numpy() / 350.0, rcond=None)[0]
    p = X.shape[1]
    np.testing.assert_allclose(m.ranef["dam"].loc[list(ped.ids)].to_numpy().ravel(),
                               sol[p + n:p + 2 * n], atol=1e-8)
    np.testing.assert_allclose(m.ranef["pe"].loc[pe_levels].to_numpy().ravel(),
                               sol[p + 2 * n:], atol=1e-8)
    assert "0" not in m.ranef["pe"].index
    nan_pe = case["data"].astype({"pe": object})
    nan_pe.loc[3, "pe"] = np.nan
    with pytest.raises(hd.DataError, match="missing"):
        hd.lmm(case["formula"], nan_pe, relationships=case["relationships"],
               covary=case["covary"], fixed_variances=case["fixed_variances"])


def test_cli_fits_two_traits_and_maternal_models(tmp_path):
    from henderson.cli import main

    case = hd.datasets.mrode("7.1")
    case["data"].to_csv(tmp_path / "calves.csv", index=False)
    hd.datasets.load("mrode_7_1_pedigree").to_csv(tmp_path / "ped.csv", index=False)
    (tmp_path / "fv.json").write_text(json.dumps(
        {"animal,dam": [[150, -40], [-40, 90]], "pe": 40, "residual": 350}))
    code = main(["fit", case["formula"], str(tmp_path / "calves.csv"), "--pedigree",
                 str(tmp_path / "ped.csv"), "--animal", "animal,dam", "--covary", "animal,dam",
                 "--fixed-variances", str(tmp_path / "fv.json"), "--out", str(tmp_path / "out"),
                 "--quiet"])
    assert code == 0
    dam = pd.read_csv(tmp_path / "out" / "ranef_dam.csv", dtype=str)
    ref = json.loads((DATA / "extra" / "mrode_maternal.json").read_text())["dense"]["random"]["dam"]
    got = dam.set_index("dam").loc[ref["ids"], "ebv"].astype(float).to_numpy()
    assert close_to(got, np.array(ref["values"]).ravel())
    covariances = pd.read_csv(tmp_path / "out" / "covariances.csv")
    assert set(covariances["effect"]) == {"animal,dam", "pe", "residual"}


def test_group_model_pevs_are_those_of_the_deviation_from_the_group_means():
    """With groups as fixed covariates Z Q (dense), the PEV of a = a* − Qg is the
    diagonal of C⁻¹ on the animals: henderson's QP equations must give the same, and
    reliabilities in [0, 1]."""
    ped, data = _grouped_population(seed=3, n_offspring=120)
    m = hd.lmm("y ~ sex + (1 | animal)", data, relationships={"animal": ped},
               fixed_variances={"animal": 2.0, "residual": 4.0})
    A = relationship_matrix_tabular(ped)
    pos = pd.Index(ped.ids).get_indexer(data["animal"])
    N, n = len(data), len(ped)
    Z = np.zeros((N, n))
    Z[np.arange(N), pos] = 1.0
    X = np.column_stack([np.ones(N), data["sex"] == "M",
                         (Z @ ped.group_contributions())[:, 0]]).astype(float)
    W = np.hstack([X, Z])
    C = W.T @ W / 4.0
    C[3:, 3:] += np.linalg.inv(A) / 2.0
    pev = np.diag(np.linalg.inv(C))[3:]
    bv = m.breeding_values()
    np.testing.assert_allclose(bv.loc[list(ped.ids), "pev"], pev, rtol=1e-8)
    assert bv["reliability"].between(0, 1).all() and bv["reliability"].max() > 0.2


def test_random_regression_reml_reaches_the_dense_optimum_on_the_boundary():
    """A random regression whose animal covariance is singular at the optimum: the
    floor on the Cholesky diagonals keeps −2ℓ accurate (no cancellation of log|G0|
    and log|C|) and the active set lets AI-REML converge there; a dense optimiser
    started from henderson's estimates finds nothing lower."""
    ped_frame, records, _ = animal_population(300, 3, seed=11)
    ped = hd.Pedigree.from_dataframe(ped_frame)
    rng = np.random.default_rng(5)
    cows = records["animal"].astype(str).unique()[:90]
    rows = [(c, c, d, f"H{rng.integers(0, 4)}") for c in cows
            for d in rng.choice(np.arange(5, 305), 6, replace=False)]
    td = pd.DataFrame(rows, columns=["animal", "pe", "dim", "htd"])
    td = td.join(hd.legendre(td["dim"], 2, lower=5, upper=305))
    A = relationship_matrix_tabular(ped)
    pos = pd.Index(ped.ids).get_indexer(td["animal"])
    G0 = np.array([[4, 1, 0], [1, 1, 0.2], [0, 0.2, 0.5]])
    P0 = np.array([[3, 0.5, 0], [0.5, 1, 0], [0, 0, 0.5]])
    U = np.linalg.cholesky(A + 1e-12 * np.eye(len(A))) @ rng.standard_normal((len(A), 3)) \
        @ np.linalg.cholesky(G0).T
    pe = {c: np.linalg.cholesky(P0) @ rng.standard_normal(3) for c in cows}
    Lg = td[["leg0", "leg1", "leg2"]].to_numpy()
    td["y"] = 20 + np.einsum("ij,ij->i", Lg, U[pos]) \
        + np.array([Lg[i] @ pe[a] for i, a in enumerate(td["animal"])]) \
        + rng.normal(0, 2, len(td))
    m = hd.lmm("y ~ htd + leg1 + leg2 + (0 + leg0 + leg1 + leg2 | animal)"
               " + (0 + leg0 + leg1 + leg2 | pe)", td, relationships={"animal": ped})
    assert isinstance(m, BreedingModel) and m.converged
    X = np.column_stack([np.ones(len(td)), pd.get_dummies(td["htd"], drop_first=True),
                         td["leg1"], td["leg2"]]).astype(float)
    y = td["y"].to_numpy()
    Aa = A[np.ix_(pos, pos)]
    same = td["pe"].to_numpy()[:, None] == td["pe"].to_numpy()[None, :]

    def dense(Ga, Gp, s):
        V = Aa * (Lg @ Ga @ Lg.T) + same * (Lg @ Gp @ Lg.T) + s * np.eye(len(y))
        return _dense_reml(V, X, y)

    Ga, Gp = m.covariances["animal"].to_numpy(), m.covariances["pe"].to_numpy()
    s = m.covariances["residual"].iloc[0, 0]
    assert dense(Ga, Gp, s) == pytest.approx(m.objective, abs=1e-6)

    def unpack(v):
        out = []
        for j in range(2):
            L = np.zeros((3, 3))
            L[np.tril_indices(3)] = v[6 * j:6 * j + 6]
            out.append(L @ L.T)
        return out[0], out[1], v[12] ** 2

    def start(M):
        w, V = np.linalg.eigh(M)
        return np.linalg.cholesky(V @ np.diag(np.maximum(w, 1e-10)) @ V.T)[np.tril_indices(3)]

    v0 = np.concatenate([start(Ga), start(Gp), [np.sqrt(s)]])
    best = scipy.optimize.minimize(lambda v: dense(*unpack(v)), v0, method="BFGS",
                                   options={"maxiter": 60})
    assert m.objective <= best.fun + 1e-3


def test_two_trait_fit_does_not_depend_on_units_or_location():
    data, ped, A, pos = _simulated_two_traits(seed=3)
    base = hd.lmm("cbind(y1, y2) ~ sex + (1 | animal)", data, relationships={"animal": ped})
    moved = data.assign(y2=data["y2"] * 1e4 + 1e8)
    far = hd.lmm("cbind(y1, y2) ~ sex + (1 | animal)", moved, relationships={"animal": ped})
    assert far.converged
    assert far.genetic_correlation()[0] == pytest.approx(base.genetic_correlation()[0], rel=1e-5)
    scale = np.diag([1.0, 1e4])
    np.testing.assert_allclose(far.covariances["animal"].to_numpy(),
                               scale @ base.covariances["animal"].to_numpy() @ scale, rtol=1e-5)
    np.testing.assert_allclose(far.fixef["y2:(Intercept)"],
                               base.fixef["y2:(Intercept)"] * 1e4 + 1e8, rtol=1e-12)
    np.testing.assert_allclose(far.ranef["animal"]["y2"], base.ranef["animal"]["y2"] * 1e4,
                               rtol=1e-4, atol=1e-6 * 1e4)


def test_not_identified_fits_raise():
    data, ped, A, pos = _simulated_two_traits(seed=3)
    collinear = data.assign(y3=2 * data["y1"] + 1)
    with pytest.raises(hd.DataError, match="linearly dependent"):
        hd.lmm("cbind(y1, y3) ~ sex + (1 | animal)", collinear, relationships={"animal": ped})
    with pytest.raises(hd.DataError, match="constant"):
        hd.lmm("cbind(y1, y2) ~ sex + (1 | animal)", data.assign(y2=5.0),
               relationships={"animal": ped})


def test_covary_order_does_not_change_which_member_is_direct():
    case = hd.datasets.mrode("7.1")
    kwargs = dict(relationships=case["relationships"], fixed_variances=case["fixed_variances"])
    forward = hd.lmm(case["formula"], case["data"], covary=[("animal", "dam")], **kwargs)
    backward = hd.lmm(case["formula"], case["data"], covary=[("dam", "animal")], **kwargs)
    # Willham: σ²_p = σ²_a + σ²_m + σ_am + σ²_pe + σ²_e = 150 + 90 − 40 + 40 + 350
    assert forward.heritability()[0] == pytest.approx(150 / 590)
    assert backward.heritability()[0] == pytest.approx(150 / 590)
    np.testing.assert_allclose(backward.breeding_values()["ebv"],
                               forward.breeding_values()["ebv"])
    assert ("dam", "animal") in backward.covariances


def test_labelled_matrices_and_long_outputs_of_two_traits():
    case = hd.datasets.mrode("5.2")
    G = pd.DataFrame([[40, 18], [18, 20]], index=["pwg", "wwg"], columns=["pwg", "wwg"])
    labelled = hd.lmm(case["formula"], case["data"], relationships=case["relationships"],
                      fixed_variances={"animal": G, "residual": [[40, 11], [11, 30]]})
    plain = hd.lmm(case["formula"], case["data"], relationships=case["relationships"],
                   fixed_variances=case["fixed_variances"])
    np.testing.assert_allclose(labelled.ranef["animal"], plain.ranef["animal"])
    y = case["data"].set_index(plain.fitted.index)[["wwg", "pwg"]]
    # y = fitted + residual wherever the trait is recorded, NaN where it is not
    np.testing.assert_allclose((plain.fitted + plain.residuals).to_numpy(), y.to_numpy())
    assert plain.fitted["pwg"].isna().sum() == 2
    with pytest.raises(ValueError, match="labelled"):
        hd.lmm(case["formula"], case["data"], relationships=case["relationships"],
               fixed_variances={"animal": G.set_axis(["a", "b"]).set_axis(["a", "b"], axis=1),
                                "residual": [[40, 11], [11, 30]]})


def test_cli_two_traits_at_known_covariances(tmp_path):
    from henderson.cli import main

    case = hd.datasets.mrode("5.2")
    case["data"].to_csv(tmp_path / "records.csv", index=False)
    hd.datasets.load("mrode_5_2_pedigree").to_csv(tmp_path / "ped.csv", index=False)
    (tmp_path / "fv.json").write_text(json.dumps(
        {"animal": [[20, 18], [18, 40]], "residual": [[40, 11], [11, 30]]}))
    assert main(["fit", case["formula"], str(tmp_path / "records.csv"), "--pedigree",
                 str(tmp_path / "ped.csv"), "--fixed-variances", str(tmp_path / "fv.json"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "out" / "ranef_animal.csv", dtype={"animal": str})
    ref = json.loads((DATA / "extra" / "mrode_mt_missing.json").read_text())["dense"]
    got = table.pivot(index="animal", columns="trait", values="ebv")
    want = pd.DataFrame(ref["random"]["animal"]["values"], index=ref["random"]["animal"]["ids"],
                        columns=ref["random"]["animal"]["columns"])
    np.testing.assert_allclose(got.loc[want.index, want.columns], want, atol=1e-6)


def test_three_traits_with_mixed_missing_patterns_reach_a_stationary_dense_optimum():
    rng = np.random.default_rng(21)
    data, ped, A, pos = _simulated_two_traits(seed=8, n_off=110, missing=0.0)
    data["y3"] = 0.5 * data["y1"] + rng.normal(scale=2.0, size=len(data))
    data.loc[rng.random(len(data)) < 0.25, "y1"] = np.nan
    data.loc[rng.random(len(data)) < 0.25, "y3"] = np.nan
    data = data[data[["y1", "y2", "y3"]].notna().any(axis=1)]
    m = hd.lmm("cbind(y1, y2, y3) ~ sex + (1 | animal)", data, relationships={"animal": ped})
    assert m.converged and len(m.design.patterns) == 4   # y2 is in every record
    y = data[["y1", "y2", "y3"]].to_numpy()
    rows = [(i, t) for i in range(len(y)) for t in range(3) if np.isfinite(y[i, t])]
    N, n = len(rows), A.shape[0]
    trait = np.array([t for _, t in rows])
    record = np.array([i for i, _ in rows])
    X = np.zeros((N, 6))
    Z = np.zeros((N, 3 * n))
    for r, (i, t) in enumerate(rows):
        X[r, 2 * t] = 1.0
        X[r, 2 * t + 1] = data["sex"].iloc[i] == "M"
        Z[r, pos[data["animal"].iloc[i]] * 3 + t] = 1.0
    G, R = m.covariances["animal"].to_numpy(), m.covariances["residual"].to_numpy()
    V = Z @ np.kron(A, G) @ Z.T + np.where(record[:, None] == record[None, :],
                                           R[trait][:, trait], 0.0)
    yl = np.array([y[i, t] for i, t in rows])
    assert _dense_reml(V, X, yl) == pytest.approx(m.objective, rel=1e-10)
    _assert_stationary(m)


def test_groups_confounded_with_the_intercept_are_found_with_a_large_fixed_factor():
    """Three groups on 800 animals with herd-year-seasons: the groups' fractions sum to
    1, so one is aliased with the intercept (it had escaped a Gram-difference test);
    group contrasts and fitted values as the dense model with groups as covariates."""
    pf, records, _ = animal_population(800, seed=3)
    k = np.arange(len(pf))
    for col in ["sire", "dam"]:
        unknown = pf[col] == "0"
        pf.loc[unknown, col] = np.where(k[unknown] < 267, "G1",
                                        np.where(k[unknown] < 533, "G2", "G3"))
    ped = hd.Pedigree.from_dataframe(pf, groups=["G1", "G2", "G3"])
    m = hd.lmm("y ~ sex + hys + (1 | animal)", records, relationships={"animal": ped},
               fixed_variances={"animal": 30.0, "residual": 70.0})
    assert m.design.dropped_groups == ["G3"]
    A = relationship_matrix_tabular(ped)
    N, n = len(records), len(ped)
    Z = np.zeros((N, n))
    Z[np.arange(N), pd.Index(ped.ids).get_indexer(records["animal"])] = 1.0
    Q = ped.group_contributions()
    X = np.column_stack([np.ones(N), pd.get_dummies(records[["sex", "hys"]], drop_first=True),
                         Z @ Q[:, :2]]).astype(float)
    W = np.hstack([X, Z])
    C = W.T @ W / 70.0
    C[X.shape[1]:, X.shape[1]:] += np.linalg.inv(A) / 30.0
    sol = np.linalg.solve(C, W.T @ records["y"].to_numpy() / 70.0)
    p = X.shape[1]
    g = m.group_effects.iloc[:, 0]
    np.testing.assert_allclose([g["G1"], g["G2"], g["G3"]], [*sol[p - 2:p], 0.0], atol=1e-8)
    np.testing.assert_allclose(m.fitted.to_numpy(), W @ sol, atol=1e-8)
    pev = np.diag(np.linalg.inv(C))[p:]
    np.testing.assert_allclose(m.breeding_values().loc[list(ped.ids), "pev"], pev, rtol=1e-8)


def test_traits_eight_orders_of_magnitude_apart_fit_as_one():
    data, ped, A, pos = _simulated_two_traits(seed=3)
    base = hd.lmm("cbind(y1, y2) ~ sex + (1 | animal)", data, relationships={"animal": ped})
    for factor in (1e-6, 1e8):
        far = hd.lmm("cbind(y1, y2) ~ sex + (1 | animal)", data.assign(y2=data["y2"] * factor),
                     relationships={"animal": ped})
        assert far.converged
        scale = np.diag([1.0, factor])
        np.testing.assert_allclose(far.covariances["animal"].to_numpy(),
                                   scale @ base.covariances["animal"].to_numpy() @ scale,
                                   rtol=1e-5)


def test_maternal_edge_cases_of_ids_and_missing_values():
    case = hd.datasets.mrode("7.1")
    data = case["data"].astype({"dam": object, "pe": object})
    data.loc[0, ["dam", "pe"]] = "0"
    kwargs = dict(relationships=case["relationships"], covary=case["covary"],
                  fixed_variances={**case["fixed_variances"], "herd": 10.0})
    # a random term after pe (it had raised KeyError)
    m = hd.lmm("bw ~ pen + (1 | animal) + (1 | dam) + (1 | pe) + (1 | herd)", data, **kwargs)
    assert m.design.T[0].nnz == 3   # animal, herd and the intercept
    # the first term on the pedigree is the records' own animal
    with pytest.raises(hd.DataError, match="first term on a pedigree"):
        hd.lmm("bw ~ herd + pen + (1 | dam) + (1 | animal) + (1 | pe)", data,
               relationships=case["relationships"], covary=case["covary"],
               fixed_variances=case["fixed_variances"])
    # a missing response follows `missing`, as in every one-response model
    gap = case["data"].assign(bw=case["data"]["bw"].where(case["data"].index != 2))
    with pytest.raises(hd.DataError, match="missing"):
        hd.lmm(case["formula"], gap, relationships=case["relationships"],
               covary=case["covary"], fixed_variances=case["fixed_variances"])
    dropped = hd.lmm(case["formula"], gap, relationships=case["relationships"],
                     covary=case["covary"], fixed_variances=case["fixed_variances"],
                     missing="drop")
    assert dropped.nobs == len(gap) - 1
    assert "animal,dam" in hd.lmm(case["formula"], case["data"],
                                  relationships=case["relationships"], covary=case["covary"],
                                  fixed_variances=case["fixed_variances"]).covariances
    with pytest.raises(PedigreeError, match="never used"):
        hd.Pedigree(["1", "2"], ["G1", "1"], ["G1", "0"], groups=["G1", "G9"])
