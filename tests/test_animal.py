"""Animal models against the dense brute-force REML fit and Mrode's Example 3.1."""
import numpy as np
import pandas as pd
import pytest

import henderson as hd
from conftest import DATA, load_json


@pytest.fixture(scope="module")
def visible():
    frame = pd.read_csv(DATA / "animal" / "animal_visible_pedigree.csv", dtype=str,
                        keep_default_na=False)
    ped = hd.Pedigree.from_dataframe(frame)
    data = pd.read_csv(DATA / "animal" / "animal_visible_data.csv")
    return ped, frame, data, load_json("animal", "animal_visible.json")


@pytest.fixture(scope="module")
def visible_fit(visible):
    ped, _, data, _ = visible
    return hd.lmm("y ~ sex + hy + (1 | animal)", data, relationships={"animal": ped})


def test_ai_reml_matches_brute_force_reml(visible, visible_fit):
    _, _, _, ref = visible
    m = visible_fit
    assert m.optimizer_result.method == "ai-reml" and m.converged
    assert len(m.optimizer_result.history) <= 8
    assert m.objective == pytest.approx(ref["reml_criterion"], rel=1e-6)
    vc = m.variance_components["variance"]
    assert vc["animal"] == pytest.approx(ref["sigma2_animal"], rel=1e-3)
    assert vc["Residual"] == pytest.approx(ref["sigma2_residual"], rel=1e-3)
    h2, se = m.heritability()
    assert h2 == pytest.approx(ref["h2"], rel=1e-3) and 0 < se < 0.2
    assert np.allclose(m.fixef.to_numpy(), ref["fixef"], rtol=1e-4)


def test_ebv_pev_reliability_match_reference(visible, visible_fit):
    _, frame, _, ref = visible
    bv = visible_fit.breeding_values().loc[frame["animal"]]
    assert len(bv) == ref["n_animals"]
    ebv, pev = np.array(ref["ebv"]), np.array(ref["pev"])
    scale = np.maximum(np.abs(ebv), 1e-2 * np.abs(ebv).max())
    assert np.max(np.abs(bv["ebv"] - ebv) / scale) < 1e-4
    assert np.max(np.abs(bv["pev"] - pev) / pev) < 1e-4
    sigma_a = ref["sigma2_animal"]
    F = np.array(ref["inbreeding"])
    assert np.allclose(bv["reliability"], 1 - pev / ((1 + F) * sigma_a), atol=1e-3)
    assert np.allclose(bv["inbreeding"], F, atol=1e-12)


def test_ai_reml_equals_derivative_free_optimum(visible, visible_fit):
    ped, _, data, _ = visible
    m = hd.lmm("y ~ sex + hy + (1 | animal)", data, relationships={"animal": ped},
               optimizer="bobyqa")
    assert m.objective == pytest.approx(visible_fit.objective, rel=1e-10)
    assert np.allclose(m.theta, visible_fit.theta, rtol=1e-4)


def test_sparse_fixed_effects_give_the_same_fit(visible, visible_fit):
    ped, _, data, _ = visible
    m = hd.lmm("y ~ sex + hy + (1 | animal)", data, relationships={"animal": ped},
               sparse_fixed=True)
    assert not m.mme.dense_fixed
    assert m.objective == pytest.approx(visible_fit.objective, rel=1e-10)
    assert np.allclose(m.fixef, visible_fit.fixef, rtol=1e-8)
    assert np.allclose(np.diag(m.vcov), np.diag(visible_fit.vcov), rtol=1e-8)
    ml_sparse = hd.lmm("y ~ sex + hy + (1 | animal)", data, relationships={"animal": ped},
                       sparse_fixed=True, reml=False)
    ml_dense = hd.lmm("y ~ sex + hy + (1 | animal)", data, relationships={"animal": ped},
                      reml=False)
    assert ml_sparse.objective == pytest.approx(ml_dense.objective, rel=1e-10)


def test_mrode_example_3_1_known_variances():
    ref = load_json("animal", "mrode.json")["example_3_1"]
    p = ref["pedigree"]
    ped = hd.Pedigree(p["animal"], p["sire"], p["dam"])
    records = pd.DataFrame(ref["records"])
    records["sex"] = pd.Categorical(records["sex"], categories=["M", "F"])
    m = hd.lmm("wwg ~ 0 + sex + (1 | animal)", records, relationships={"animal": ped},
               fixed_variances={"animal": ref["sigma2_animal"], "residual": ref["sigma2_residual"]})
    assert m.fixef["sexM"] == pytest.approx(ref["sex_solutions"]["M"], abs=1e-6)
    assert m.fixef["sexF"] == pytest.approx(ref["sex_solutions"]["F"], abs=1e-6)
    bv = m.breeding_values().loc[p["animal"]]
    assert np.allclose(bv["ebv"], ref["ebv"], atol=1e-6)
    diag = np.array(ref["diag_Cinv_alpha_scaled"]) * ref["sigma2_residual"]
    assert np.allclose(bv["pev"], diag[2:], atol=5e-3)
    assert np.allclose(np.diag(m.vcov), diag[:2], atol=5e-3)
    assert bv.loc["1", "reliability"] == pytest.approx(0.058, abs=5e-4)
    restricted = ref["reml_at_these_variances"]["restricted_loglik_including_(n-p)log2pi"]
    assert m.loglik == pytest.approx(restricted, abs=1e-5)


def test_gblup_with_grm_equals_relationship_dataframe():
    rng = np.random.default_rng(7)
    n, markers = 120, 400
    genotypes = pd.DataFrame(rng.binomial(2, rng.uniform(0.1, 0.9, markers), (n, markers)),
                             index=[f"g{i}" for i in range(n)])
    G = hd.grm(genotypes, blend=0.05)
    # VanRaden method 1 by hand
    M = genotypes.to_numpy(float)
    freq = M.mean(0) / 2
    W = M - 2 * freq
    expected = W @ W.T / (2 * np.sum(freq * (1 - freq)))
    assert np.allclose(G.matrix, 0.95 * expected + 0.05 * np.eye(n))
    u = np.linalg.cholesky(G.matrix) @ rng.normal(size=n) * 2.0
    data = pd.DataFrame({"id": np.repeat(genotypes.index, 3), "x": rng.normal(size=3 * n)})
    data["y"] = 1 + 0.5 * data["x"] + np.repeat(u, 3) + rng.normal(size=3 * n) * 2.0
    a = hd.lmm("y ~ x + (1 | id)", data, relationships={"id": G})
    b = hd.lmm("y ~ x + (1 | id)", data, relationships={
        "id": pd.DataFrame(G.matrix, index=genotypes.index, columns=genotypes.index)},
        optimizer="bobyqa")
    assert a.objective == pytest.approx(b.objective, rel=1e-9)
    # the objective includes log|G|: brute force with V = σ²_g G ⊗ 11' + σ²_e I
    s2g, s2e = a.variance_components["variance"]
    Z = np.kron(np.eye(n), np.ones((3, 1)))
    V = s2g * Z @ G.matrix @ Z.T + s2e * np.eye(3 * n)
    X = np.column_stack([np.ones(3 * n), data["x"]])
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    P = Vi - Vi @ X @ np.linalg.solve(XtViX, X.T @ Vi)
    y = data["y"].to_numpy()
    reml = (np.linalg.slogdet(V)[1] + np.linalg.slogdet(XtViX)[1] + y @ P @ y
            + (3 * n - 2) * np.log(2 * np.pi))
    assert a.objective == pytest.approx(reml, rel=1e-8)


def test_records_for_animals_missing_from_pedigree_are_named(visible):
    ped, _, data, _ = visible
    bad = data.copy()
    bad.loc[0, "animal"] = "NOPE"
    with pytest.raises(hd.DataError, match="NOPE"):
        hd.lmm("y ~ sex + (1 | animal)", bad, relationships={"animal": ped})
    with pytest.raises(hd.FormulaError, match="'sire'"):
        hd.lmm("y ~ sex + (1 | animal)", data, relationships={"sire": ped})


def test_repeatability_and_maternal_terms_ai_equals_bobyqa(visible):
    ped, _, data, _ = visible
    data = data.copy()
    data["pe"] = data["animal"]
    # repeatability: animal (pedigree) + permanent environment (identity)
    ai = hd.lmm("y ~ sex + hy + (1 | animal) + (1 | pe)", data, relationships={"animal": ped})
    dfo = hd.lmm("y ~ sex + hy + (1 | animal) + (1 | pe)", data, relationships={"animal": ped},
                 optimizer="bobyqa")
    assert ai.optimizer_result.method == "ai-reml"
    assert ai.objective == pytest.approx(dfo.objective, rel=1e-9)
    assert list(ai.variance_components.index) == ["animal", "pe", "Residual"]
    # maternal genetic effect on the dam, with the same pedigree
    frame = pd.read_csv(DATA / "animal" / "animal_visible_pedigree.csv", dtype=str,
                        keep_default_na=False).set_index("animal")
    data["dam"] = frame.loc[data["animal"], "dam"].to_numpy()
    maternal = data[data["dam"] != "0"]
    ai = hd.lmm("y ~ sex + (1 | animal) + (1 | dam)", maternal,
                relationships={"animal": ped, "dam": ped})
    dfo = hd.lmm("y ~ sex + (1 | animal) + (1 | dam)", maternal,
                 relationships={"animal": ped, "dam": ped}, optimizer="bobyqa")
    assert ai.objective == pytest.approx(dfo.objective, rel=1e-9)
    assert len(ai.breeding_values("dam")) == len(ped)


def test_em_steps_are_taken_when_ai_steps_fail(visible, monkeypatch):
    """Force every AI step to be rejected: EM-REML steps alone still climb."""
    import henderson.aireml as aireml

    ped, _, data, ref = visible
    real_solve = np.linalg.solve
    monkeypatch.setattr(aireml.np.linalg, "solve",
                        lambda a, b: np.full_like(b, np.nan) if a.shape == (2, 2) else real_solve(a, b))
    design = hd.build_design("y ~ sex + hy + (1 | animal)", data, relationships={"animal": ped})
    objective = hd.Objective(hd.MixedModelEquations(design), reml=True)
    from dataclasses import replace

    from henderson.optimize import SETTINGS
    result = aireml.optimize_ai_reml(objective, np.array([0.3]),
                                     settings=replace(SETTINGS, ai_max_iterations=5))
    kinds = [h[1] for h in result.history]
    values = [h[2] for h in result.history]
    assert kinds == ["EM"] * 5
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
    assert values[-1] < objective(np.array([0.3]))


def _dense_average_information(design, phi):
    """Score and AI of the REML log-likelihood from the dense V: ``V = Σ_t φ_t Z_t K_t
    Z_t' + φ_e W⁻¹``, ``P = V⁻¹ − V⁻¹X(X'V⁻¹X)⁻¹X'V⁻¹``, ``s_i = −½(tr PV̇_i − y'PV̇_iPy)``
    and ``AI_ij = ½ y'PV̇_iPV̇_jPy``."""
    X, y = np.asarray(design.X.todense() if hasattr(design.X, "todense") else design.X), design.y
    derivatives = []
    for term in design.terms:
        Z = term.z_matrix().toarray()
        K = (np.eye(term.n_levels) if term.level_precision is None
             else np.linalg.inv(term.level_precision.toarray()))
        derivatives.append(Z @ K @ Z.T)
    derivatives.append(np.diag(1.0 / design.weights))
    V = sum(p * D for p, D in zip(phi, derivatives))
    Vinv = np.linalg.inv(V)
    VX = Vinv @ X
    P = Vinv - VX @ np.linalg.solve(X.T @ VX, VX.T)
    Py = P @ y
    score = np.array([-0.5 * (np.trace(P @ D) - Py @ D @ Py) for D in derivatives])
    ai = np.array([[0.5 * Py @ Di @ P @ Dj @ Py for Dj in derivatives] for Di in derivatives])
    return score, ai


@pytest.mark.parametrize("case", ["penicillin", "weighted", "animal"])
def test_average_information_equals_the_dense_formulas(case, visible):
    """The AI matrix and score, computed in the space of the equations (products with
    C and one solve, no rows), against the dense textbook formulas on V."""
    from henderson.aireml import AverageInformation
    from henderson.mme import MixedModelEquations
    from henderson.objective import Objective

    if case == "penicillin":
        design = hd.build_design("diameter ~ 1 + (1|plate) + (1|sample)",
                                 hd.datasets.load("penicillin"))
    elif case == "weighted":
        design = hd.build_design("Reaction ~ Days + (1|Subject)",
                                 hd.datasets.load("sleepstudy_weighted"), weights="w")
    else:
        ped, _, data, _ = visible
        design = hd.build_design("y ~ sex + hy + (1 | animal)", data,
                                 relationships={"animal": ped})
    theta = np.linspace(0.6, 1.3, design.n_theta)
    state = AverageInformation(Objective(MixedModelEquations(design))).at(theta)
    score, ai = _dense_average_information(design, state.phi)
    np.testing.assert_allclose(state.ai, ai, rtol=1e-8, atol=1e-10 * np.abs(ai).max())
    np.testing.assert_allclose(state.score, score, rtol=1e-7, atol=1e-8 * np.abs(score).max())
