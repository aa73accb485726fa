import numpy as np
import pytest

import henderson as hd
from henderson.bootstrap import _with_response, parameter_vector
from henderson.objective import Objective
from conftest import load_json


@pytest.fixture(scope="module")
def model():
    return hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))


@pytest.mark.parametrize("strategy", ["schur", "cholmod"])
def test_refit_with_the_same_response_reuses_the_factor_and_reproduces_the_fit(strategy):
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"),
                   strategy=strategy)
    clone = _with_response(model.mme, model.design.y.copy())
    assert clone.indices is model.mme.indices           # the pattern of C is shared
    assert clone.factorization is model.mme.factorization  # and the symbolic analysis
    value = Objective(clone, reml=True)(model.theta)
    assert value == pytest.approx(model.objective, rel=1e-12)
    shifted = _with_response(model.mme, model.design.y + 100.0)
    assert Objective(shifted, reml=True)(model.theta) == pytest.approx(model.objective,
                                                                        rel=1e-9)


def test_simulated_responses_have_the_model_moments(model):
    y = model.simulate(4000, seed=3)
    mean = np.asarray(model.X @ model.fixef.to_numpy())
    assert np.allclose(y.mean(axis=1), mean, atol=4 * np.sqrt(model.Sigma.diagonal().max() / 4000))
    # covariance of two days of one subject and across subjects
    S = model.Sigma.toarray()
    emp = np.cov(y[[0, 5, 10]])
    assert emp[0, 1] == pytest.approx(S[0, 5], rel=0.1)
    assert abs(emp[0, 2]) < 0.1 * S[0, 0]  # rows 0 and 10 belong to different subjects


def test_bootstrap_intervals_cover_the_estimates_and_resemble_profile_ones(model):
    ci = model.confint("bootstrap", n_boot=60, seed=2)
    est = parameter_vector(model)
    assert list(ci.index) == load_json("inference", "lme4_inference.json")[
        "sleepstudy_profile_ci"]["params"]
    assert np.all(ci.iloc[:, 0] < est) and np.all(est < ci.iloc[:, 1])
    wald = model.confint("wald")
    se = np.sqrt(np.diag(model.vcov))
    assert np.allclose(wald.loc[["(Intercept)", "Days"]].iloc[:, 1] - model.fixef, 1.959964 * se)
    with pytest.raises(ValueError):
        model.confint("likelihood")


def test_profile_intervals_match_lme4(model):
    ref = load_json("inference", "lme4_inference.json")["sleepstudy_profile_ci"]
    ci = model.confint("profile")
    assert list(ci.index) == ref["params"]
    assert np.allclose(ci.iloc[:, 0], ref["lower"], rtol=1e-3)
    assert np.allclose(ci.iloc[:, 1], ref["upper"], rtol=1e-3)


@pytest.mark.parametrize("strategy", ["schur", "cholmod"])
def test_parallel_bootstrap_equals_sequential(strategy):
    from henderson.bootstrap import bootstrap

    model = hd.lmm("diameter ~ 1 + (1|plate) + (1|sample)", hd.datasets.load("penicillin"),
                   strategy=strategy)
    one = bootstrap(model, 12, seed=5, n_jobs=1)
    two = bootstrap(model, 12, seed=5, n_jobs=2)
    assert np.allclose(one.to_numpy(), two.to_numpy(), rtol=1e-10)
    # the model itself is untouched by its replicates
    assert model.objective == pytest.approx(Objective(model.mme, reml=True)(model.theta),
                                            rel=1e-12)
