"""Formula forms without an lme4 reference case, checked against a dense REML twin."""
import numpy as np
import pandas as pd
import pytest

import henderson as hd


def dense_reml(m) -> float:
    """−2 restricted log-likelihood from V = Z G Z' + R in dense NumPy."""
    X, Z = m.X, m.Z.toarray()
    V = Z @ m.G.toarray() @ Z.T + m.R.toarray()
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    P = Vi - Vi @ X @ np.linalg.solve(XtViX, X.T @ Vi)
    y = m.design.y
    n, p = X.shape
    return float(np.linalg.slogdet(V)[1] + np.linalg.slogdet(XtViX)[1] + y @ P @ y
                 + (n - p) * np.log(2 * np.pi))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    n = 400
    frame = pd.DataFrame({
        "a": rng.choice(list("PQRS"), n),
        "b": rng.choice(list("xyz"), n),
        "f": pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"]),
        "x": rng.normal(size=n),
        "g": rng.integers(0, 25, n).astype(str),
    })
    g_effect = dict(zip(sorted(frame["g"].unique()), rng.normal(size=25)))
    frame["y"] = (1 + 0.5 * frame["x"] + frame["g"].map(g_effect) * (1 + frame["x"])
                  + (frame["f"] == "hi") * 0.7 + rng.normal(size=n))
    return frame


@pytest.mark.parametrize("formula", [
    "y ~ x + (0 + x | g)",
    "y ~ x + (1 | a:b)",
    "y ~ x + f + (0 + f | a)",
    "y ~ x * f + (1 + x | g) + (1 | a)",
    "y ~ 0 + f + (1 | g) + (0 + x | g)",
    "y ~ x + (1 | g) + (1 | a) + (1 | b)",
])
def test_fit_equals_dense_reml_at_its_optimum(data, formula):
    m = hd.lmm(formula, data)
    assert m.converged
    assert m.objective == pytest.approx(dense_reml(m), rel=1e-9)
    # and it is an optimum: BOBYQA and the gradient-based optimiser agree
    q = hd.lmm(formula, data, optimizer="lbfgs")
    assert q.objective == pytest.approx(m.objective, rel=1e-7)


def test_names_of_random_coefficients(data):
    m = hd.lmm("y ~ x + f + (0 + f | a)", data)
    assert list(m.ranef["a"].columns) == ["flo", "fmid", "fhi"]
    m = hd.lmm("y ~ x + (1 | a:b)", data)
    assert m.ranef["a:b"].index[0] == "P:x" and len(m.ranef["a:b"]) == 12
