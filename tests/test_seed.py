"""The seed lecture's Example 1: plants in 4 pots (3, 2, 3, 2 seedlings)."""
import numpy as np
import scipy.sparse as sp

import henderson as hd


def test_plants_matrices_are_those_of_the_lecture():
    df = hd.datasets.load("plants")
    m = hd.lmm("height ~ moisture + (1 | pot)", df)
    assert m.X.shape == (10, 2) and sp.issparse(m.Z) and m.Z.format == "csc"
    Z = m.Z.toarray()
    assert Z.shape == (10, 4)
    assert np.array_equal(Z.sum(axis=0), [3, 2, 3, 2]) and np.all(Z.sum(axis=1) == 1)
    sigma_p2 = m.varcorr.loc[0, "vcov"]
    sigma_e2 = m.sigma ** 2
    assert np.allclose(m.G.toarray(), sigma_p2 * np.eye(4))
    assert np.allclose(m.R.toarray(), sigma_e2 * np.eye(10))
    Sigma = m.Sigma.toarray()
    assert np.allclose(Sigma, sigma_p2 * Z @ Z.T + sigma_e2 * np.eye(10))
    blocks = m.sigma_blocks()
    assert list(blocks) == ["p11", "p12", "p21", "p22"]
    for size, block in zip([3, 2, 3, 2], blocks.values()):
        assert np.allclose(block, sigma_e2 * np.eye(size) + sigma_p2 * np.ones((size, size)))
    # Σ is block diagonal: no covariance between seedlings of different pots
    same_pot = Z @ Z.T > 0
    assert np.all(Sigma[~same_pot] == 0)


def test_fitted_plus_residuals_is_y_and_blups_sum_to_zero_by_moisture():
    df = hd.datasets.load("plants")
    m = hd.lmm("height ~ moisture + (1 | pot)", df)
    assert np.allclose(m.fitted + m.residuals, df["height"])
    # E(y) = X β: fitted equals X β + Z b
    b = m.ranef["pot"]["(Intercept)"].to_numpy()
    assert np.allclose(m.fitted, m.X @ m.fixef.to_numpy() + m.Z @ b)
