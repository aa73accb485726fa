"""The covariance structures (covariance.py) against their definitions: Λ Λ' is the
structure's covariance written out from its reported parameters, dΛ/dθ agrees with
finite differences, θ ↔ covariance round-trips, and every unconstrained parameter
gives a positive semi-definite covariance."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import covariance_from_parameters

from henderson.covariance import STRUCTURES, structure


def random_theta(s, rng):
    theta = s.start() + rng.normal(size=s.n_theta)
    return np.where(np.isfinite(s.lower_bounds()), np.abs(theta), theta)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(STRUCTURES), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_factor_is_the_structures_covariance(name, k, seed):
    s = structure(name, k)
    theta = random_theta(s, np.random.default_rng(seed))
    lam = s.relative_factor(theta)
    assert np.allclose(lam, np.tril(lam))
    expected = covariance_from_parameters(name, k, s.parameters(theta, sigma=1.0))
    np.testing.assert_allclose(lam @ lam.T, expected, atol=1e-10)
    assert np.linalg.eigvalsh(lam @ lam.T).min() > -1e-10


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(STRUCTURES), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_factor_jacobian_agrees_with_finite_differences(name, k, seed):
    s = structure(name, k)
    theta = random_theta(s, np.random.default_rng(seed)) + 0.05 * np.isfinite(s.lower_bounds())
    jacobian = s.factor_jacobian(theta)
    assert jacobian.shape == (s.n_theta, k, k)
    for j in range(s.n_theta):
        step = np.zeros(s.n_theta)
        step[j] = 1e-6
        numeric = (s.relative_factor(theta + step) - s.relative_factor(theta - step)) / 2e-6
        np.testing.assert_allclose(jacobian[j], numeric, atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(STRUCTURES), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_theta_round_trips_through_the_covariance(name, k, seed):
    s = structure(name, k)
    theta = random_theta(s, np.random.default_rng(seed)) + 0.05 * np.isfinite(s.lower_bounds())
    covariance = s.relative_covariance(theta)
    back = s.theta_from_covariance(covariance)
    np.testing.assert_allclose(s.relative_covariance(back), covariance, atol=1e-9)


def test_toeplitz_lag_correlations_are_those_of_the_partial_autocorrelations():
    """Durbin–Levinson against the definition: κ_j is the last coefficient of the
    best linear predictor of order j, solved from the Toeplitz system directly."""
    rng = np.random.default_rng(1)
    s = structure("toep", 5)
    kappa = rng.uniform(-0.9, 0.9, 4)
    rho = s.lag_correlations(kappa)
    full = np.concatenate([[1.0], rho])
    for j in range(1, 5):
        R = full[np.abs(np.subtract.outer(np.arange(j), np.arange(j)))]
        coefficients = np.linalg.solve(R, full[1:j + 1])
        assert coefficients[-1] == pytest.approx(kappa[j - 1], abs=1e-12)


def test_covariances_of_another_structure_are_refused():
    with pytest.raises(ValueError, match="cs"):
        structure("cs", 3).theta_from_covariance(np.diag([1.0, 2.0, 3.0]) + 0.1)
    with pytest.raises(ValueError, match="ar1"):
        structure("ar1", 3).theta_from_covariance(np.diag([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="diag"):
        structure("diag", 2).theta_from_covariance([[1.0, 0.5], [0.5, 1.0]])
    with pytest.raises(ValueError, match="unknown covariance structure"):
        structure("ou", 2)


def test_number_of_parameters():
    assert [structure(n, 4).n_theta for n in STRUCTURES] == [10, 4, 5, 2, 7]
