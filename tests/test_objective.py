"""The objective, its analytic gradient and the optimisers that use them."""
import numpy as np
import pytest

import henderson as hd
from henderson.mme import MixedModelEquations
from henderson.objective import Objective, objective_gradient
from conftest import CASES, load_case

MODELS = [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy", None),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "penicillin", None),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy_weighted", "w"),
    ("strength ~ 1 + (1|batch/cask)", "pastes", None),
]


@pytest.mark.parametrize("formula,data,weights", MODELS)
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("dense_fixed", [True, False])
def test_gradient_matches_finite_differences(formula, data, weights, reml, dense_fixed):
    design = hd.build_design(formula, hd.datasets.load(data), weights=weights)
    objective = Objective(MixedModelEquations(design, dense_fixed=dense_fixed), reml)
    rng = np.random.default_rng(5)
    theta = design.theta_start() * rng.uniform(0.3, 1.2, design.n_theta) + 0.1
    value, gradient = objective_gradient(objective, theta)
    assert value == pytest.approx(objective(theta), rel=1e-12)
    h = 1e-5
    numeric = np.array([(objective(theta + h * e) - objective(theta - h * e)) / (2 * h)
                        for e in np.eye(len(theta))])
    assert np.allclose(gradient, numeric, rtol=1e-5, atol=1e-5 * np.abs(numeric).max())


@pytest.mark.parametrize("name", [c for c in CASES if not c.startswith("insteval")])
def test_quasi_newton_reaches_lme4_optimum(name):
    case = load_case(name)
    m = hd.lmm(case["formula"], hd.datasets.load(case["data"]), reml=case["REML"],
               weights=case["weights"], optimizer="lbfgs")
    assert m.converged
    assert abs(m.objective - case["objective"]) < 2e-7 * abs(case["objective"])
    assert np.allclose(m.theta, case["theta"], atol=5e-3)


def test_profiled_sigma_is_the_minimiser_of_the_unprofiled_criterion(sleepstudy):
    design = hd.build_design("Reaction ~ Days + (Days | Subject)", sleepstudy)
    objective = Objective(MixedModelEquations(design), reml=True)
    theta = np.array([0.9, 0.02, 0.2])
    evaluation = objective.evaluate(theta)
    sigma2 = objective.sigma(evaluation) ** 2
    assert objective.at_sigma(evaluation, sigma2) == pytest.approx(evaluation.objective, rel=1e-12)
    for factor in (0.9, 1.1):
        assert objective.at_sigma(evaluation, sigma2 * factor) > evaluation.objective


@pytest.mark.parametrize("strategy", ["cholmod", "schur"])
def test_non_finite_theta_is_an_error_not_a_nan_objective(sleepstudy, strategy):
    """CHOLMOD factored C(NaN) silently: every log-determinant and solution was NaN."""
    from henderson.mme import NotPositiveDefiniteError

    design = hd.build_design("Reaction ~ Days + (Days | Subject)", sleepstudy)
    mme = MixedModelEquations(design) if strategy == "cholmod" \
        else MixedModelEquations(design, strategy="schur")
    with pytest.raises(NotPositiveDefiniteError, match="θ"):
        mme.factorize(np.array([np.nan, 0.1, 0.2]))
    assert Objective(mme, reml=True)(np.array([np.inf, 0.1, 0.2])) == np.inf


@pytest.mark.parametrize("formula,data,weights", [m for m in MODELS if "(Days |" not in m[0]])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("schur", [True, False])
def test_one_coefficient_gradient_equals_the_general_formula(formula, data, weights, reml,
                                                             schur, monkeypatch):
    """``2 (q_t − tr C⁻¹_tt) / θ_t`` from the diagonal of C⁻¹ against the general
    gradient over the whole pattern of C, on both kinds of equations."""
    import henderson.objective as objective_module

    design = hd.build_design(formula, hd.datasets.load(data), weights=weights)
    assert objective_module.scalar_terms(design)
    equations = MixedModelEquations(design, strategy="schur") if schur \
        else MixedModelEquations(design)
    objective = Objective(equations, reml)
    theta = np.linspace(0.4, 1.7, design.n_theta)
    value, fast = objective_gradient(objective, theta)
    monkeypatch.setattr(objective_module, "scalar_terms", lambda design: False)
    general_value, general = objective_gradient(objective, theta)
    assert value == general_value
    assert np.allclose(fast, general, rtol=1e-9, atol=1e-9 * np.abs(general).max())


@pytest.mark.parametrize("formula,data,weights", MODELS + [
    ("y ~ x + (1 + x | g1) + (1 | g2)", "crossed", None)])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("strategy", ["schur", "cholmod"])
def test_interior_gradient_equals_the_general_formula_and_finite_differences(
        formula, data, weights, reml, strategy, monkeypatch):
    """Inside the parameter space the gradient takes only the diagonal blocks of C⁻¹
    per level; the selected-inverse formula (on the whole pattern of C) and central
    differences must give the same numbers, for vector-valued and scalar terms."""
    from henderson import objective as objective_module
    from henderson.simulate import crossed

    frame = crossed(1500, 150, 12, seed=7) if data == "crossed" else hd.datasets.load(data)
    design = hd.build_design(formula, frame, weights=weights)
    objective = Objective(MixedModelEquations(design, strategy=strategy), reml)
    rng = np.random.default_rng(11)
    theta = design.theta_start() * rng.uniform(0.4, 1.3, design.n_theta) + 0.1 * (
        design.theta_start() != 0) + 0.05 * rng.normal(size=design.n_theta) * (
        design.theta_start() == 0)
    assert objective_module.interior_applies(design, objective.mme.relative_factors(theta))
    evaluation, interior = objective_module.interior_parts(
        objective, theta, objective.mme.relative_factors(theta))
    monkeypatch.setattr(objective_module, "interior_applies", lambda *args: False)
    monkeypatch.setattr(objective_module, "scalar_terms", lambda design: False)
    value, general = objective_gradient(objective, theta)
    assert evaluation.objective == pytest.approx(value, rel=1e-13)
    np.testing.assert_allclose(interior, general, rtol=1e-7, atol=1e-8 * np.abs(general).max())
    h = 1e-5
    numeric = np.array([(objective(theta + h * e) - objective(theta - h * e)) / (2 * h)
                        for e in np.eye(len(theta))])
    np.testing.assert_allclose(interior, numeric, rtol=1e-5, atol=1e-5 * np.abs(numeric).max())


def test_interior_gradient_is_not_used_at_a_singular_factor():
    from henderson import objective as objective_module

    design = hd.build_design("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    mme = MixedModelEquations(design)
    assert objective_module.interior_applies(design, mme.relative_factors(np.array([1.0, 0.1, 0.2])))
    assert not objective_module.interior_applies(design, mme.relative_factors(np.array([1.0, 0.1, 0.0])))
    # the gradient there is the selected-inverse one, and still matches differences
    objective = Objective(mme, reml=True)
    theta = np.array([1.0, 0.1, 0.0])
    _, gradient = objective_gradient(objective, theta)
    h = 1e-6
    numeric = (objective(theta + h * np.eye(3)[0]) - objective(theta - h * np.eye(3)[0])) / (2 * h)
    assert gradient[0] == pytest.approx(numeric, rel=1e-5)
