"""AI-REML's Newton steps in θ for vector-valued terms (``optimizer="newton"``): the
average-information Hessian against a dense computation, the optimum against BOBYQA's,
and the moment start for slopes."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import henderson as hd
from henderson.aireml import newton_state, vector_moment_start
from henderson.mme import MixedModelEquations
from henderson.objective import Objective
from henderson.simulate import crossed


def _three_coefficients(seed):
    rng = np.random.default_rng(seed)
    n, levels = 1200, 60
    g = rng.integers(0, levels, n)
    x, z = rng.normal(size=n), rng.uniform(-1, 1, n)
    b = rng.multivariate_normal([0, 0, 0], [[1.0, 0.2, 0.1], [0.2, 0.4, 0.0],
                                            [0.1, 0.0, 0.3]], size=levels)
    y = 1 + 0.3 * x + b[g, 0] + b[g, 1] * x + b[g, 2] * z + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "z": z, "g": pd.Categorical(g)})


DESIGNS = {
    "slopes crossed": ("y ~ x + (1 + x | g1) + (1 | g2)", lambda: crossed(2000, 200, 20, seed=3)),
    "slopes crossed, other seed": ("y ~ x + (1 + x | g1) + (1 | g2)",
                                   lambda: crossed(3000, 150, 30, seed=8)),
    "independent slopes": ("y ~ x + (1 + x || g1) + (1 | g2)", lambda: crossed(2000, 200, 20, seed=5)),
    "three coefficients": ("y ~ x + (1 + x + z | g)", lambda: _three_coefficients(2)),
    "intercepts only": ("y ~ x + (1 | g1) + (1 | g2)", lambda: crossed(2000, 200, 20, seed=6)),
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", lambda: hd.datasets.load("sleepstudy")),
}


def _dense_hessian(design, theta, reml):
    """2 AI in (θ, σ²) with σ² profiled out, from V, P and the working variates."""
    y = design.y
    X = np.asarray(design.X.toarray() if sp.issparse(design.X) else design.X)
    Zs = [t.z_matrix().toarray() for t in design.terms]
    lams = [t.relative_factor(theta[sl]) for t, sl in zip(design.terms, design.theta_slices())]
    V = np.eye(len(y)) + sum(Z @ np.kron(np.eye(t.n_levels), lam @ lam.T) @ Z.T
                             for Z, t, lam in zip(Zs, design.terms, lams))
    Vinv = np.linalg.inv(V)
    beta = np.linalg.solve(X.T @ Vinv @ X, X.T @ Vinv @ y)
    r = y - X @ beta
    dof = len(y) - X.shape[1] if reml else len(y)
    sigma2 = float(r @ Vinv @ r) / dof
    Vinv = Vinv / sigma2
    # REML's projection for ML too: with β profiled, the mean of ML's observed and
    # expected information is ½ y'PV_iPV_jPy (not y'PV_iV⁻¹V_jPy)
    P = Vinv - Vinv @ X @ np.linalg.solve(X.T @ Vinv @ X, X.T @ Vinv)
    Py = Vinv @ r
    derivatives = []
    for Z, t, lam, sl in zip(Zs, design.terms, lams, design.theta_slices()):
        for D in t.structure.factor_jacobian(theta[sl]):
            derivatives.append(sigma2 * Z @ np.kron(np.eye(t.n_levels), D @ lam.T + lam @ D.T) @ Z.T)
    derivatives.append(V)                          # ∂(σ² V)/∂σ², V relative here
    f = np.column_stack([Vi @ Py for Vi in derivatives])
    ai = 0.5 * f.T @ P @ f
    n = len(theta)
    return 2.0 * (ai[:n, :n] - np.outer(ai[:n, n], ai[n, :n]) / ai[n, n])


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case", ["slopes crossed", "three coefficients", "sleepstudy"])
def test_newton_hessian_is_the_dense_average_information(case, reml):
    formula, frame = DESIGNS[case]
    data = frame()
    if len(data) > 1200:
        data = data.iloc[:600]
    design = hd.build_design(formula, data)
    objective = Objective(MixedModelEquations(design), reml=reml)
    rng = np.random.default_rng(4)
    start = design.theta_start()
    theta = start * rng.uniform(0.5, 1.2, design.n_theta) + 0.1 * (start == 0)
    state = newton_state(objective, theta)
    np.testing.assert_allclose(state.hessian, _dense_hessian(design, theta, reml),
                               rtol=1e-7, atol=1e-9 * np.abs(state.hessian).max())
    assert state.objective == pytest.approx(objective(theta), rel=1e-13)
    # a singular Λ: no Newton state (the optimiser hands over to L-BFGS-B)
    theta[0] = 0.0
    assert newton_state(objective, theta) is None


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case", list(DESIGNS))
def test_newton_reaches_the_default_optimisers_optimum(case, reml):
    formula, frame = DESIGNS[case]
    data = frame()
    newton = hd.lmm(formula, data, reml=reml, optimizer="newton")
    reference = hd.lmm(formula, data, reml=reml, optimizer="bobyqa")
    assert newton.converged and newton.optimizer_result.method.startswith("newton")
    assert newton.objective == pytest.approx(reference.objective, rel=1e-9)
    np.testing.assert_allclose(newton.theta, reference.theta, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(newton.fixef, reference.fixef, rtol=1e-4, atol=1e-6)


def test_newton_hands_a_boundary_optimum_to_lbfgs():
    """A slope with no variance: Λ becomes singular on the way and L-BFGS-B, which
    handles bounds, finishes at BOBYQA's optimum."""
    rng = np.random.default_rng(3)
    n, levels = 3000, 100
    g = rng.integers(0, levels, n)
    x = rng.normal(size=n)
    y = 1 + x + rng.normal(size=levels)[g] + rng.normal(size=n)
    data = pd.DataFrame({"y": y, "x": x, "g": pd.Categorical(g)})
    newton = hd.lmm("y ~ x + (1 + x | g)", data, optimizer="newton")
    reference = hd.lmm("y ~ x + (1 + x | g)", data, optimizer="bobyqa")
    assert newton.objective == pytest.approx(reference.objective, rel=1e-9, abs=1e-7)
    np.testing.assert_allclose(newton.theta, reference.theta, atol=2e-3)


def test_moment_start_for_slopes_is_near_the_optimum():
    data = crossed(20_000, 2_000, 100, seed=2)
    design = hd.build_design("y ~ x + (1 + x | g1) + (1 | g2)", data)
    mme = MixedModelEquations(design)
    start = vector_moment_start(design, mme.xp)
    optimum = hd.lmm("y ~ x + (1 + x | g1) + (1 | g2)", data, optimizer="newton").theta
    np.testing.assert_allclose(start, optimum, rtol=0.1, atol=0.03)
    # one-coefficient terms keep fit.moment_start; known level covariances none
    assert vector_moment_start(hd.build_design("y ~ x + (1 | g1)", data), mme.xp) is None


def test_auto_optimizer_is_newton_for_slopes_from_50000_rows():
    data = crossed(50_000, 5_000, 100, seed=9)
    m = hd.lmm("y ~ x + (1 + x | g1) + (1 | g2)", data)
    assert m.optimizer_result.method == "newton" and m.converged
    assert m.mme.n_factorizations <= 6
    reference = hd.lmm("y ~ x + (1 + x | g1) + (1 | g2)", data, optimizer="lbfgs")
    assert m.objective == pytest.approx(reference.objective, rel=1e-11)
    np.testing.assert_allclose(m.theta, reference.theta, rtol=1e-4)


def test_newton_rejects_designs_it_does_not_handle():
    sleepstudy = hd.datasets.load("sleepstudy")
    with pytest.raises(ValueError, match="needs method='mme'"):
        hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy, optimizer="newton",
               method="blockdiag")
    with pytest.raises(ValueError, match="dispformula"):
        hd.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy, optimizer="newton",
               dispformula="~ Days")
