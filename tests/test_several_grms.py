"""Several relationship matrices on one grouping factor (GCTA's --mgrm): one variance
component each, against a dense REML of V = σ1² K1 + σ2² K2 + σe² I."""
import numpy as np
import pandas as pd
import pytest
import scipy.optimize

import henderson as hd
from henderson.errors import FormulaError
from henderson.simulate import gwas_panel


@pytest.fixture(scope="module")
def two_grms():
    genotypes, pheno = gwas_panel(150, 600, n_chromosomes=2, family_size=3, seed=5)
    K1 = hd.grm(genotypes, variants=np.arange(300))
    K2 = hd.grm(genotypes, variants=np.arange(300, 600))
    return pheno, K1, K2


def _dense_reml(pheno, K1, K2):
    y = pheno["y"].to_numpy()
    X = np.column_stack([np.ones(len(y)), pheno["age"], pheno["sex"]])
    order = K1.labels.get_indexer(pheno["iid"])
    A, B = K1.matrix[np.ix_(order, order)], K2.matrix[np.ix_(order, order)]
    n, p = X.shape

    def criterion(log_variances):
        s1, s2, se = np.exp(log_variances)
        V = s1 * A + s2 * B + se * np.eye(n)
        Vinv = np.linalg.inv(V)
        XtVX = X.T @ Vinv @ X
        P = Vinv - Vinv @ X @ np.linalg.solve(XtVX, X.T @ Vinv)
        return (np.linalg.slogdet(V)[1] + np.linalg.slogdet(XtVX)[1] + y @ P @ y
                + (n - p) * np.log(2 * np.pi))

    fit = scipy.optimize.minimize(criterion, np.log([0.3, 0.3, 0.4]), method="BFGS",
                                  options={"gtol": 1e-9})
    return np.exp(fit.x), fit.fun


def test_two_grms_on_one_factor_equal_the_dense_reml(two_grms):
    pheno, K1, K2 = two_grms
    m = hd.lmm("y ~ age + sex + (1 | iid)", pheno, relationships={"iid": [K1, K2]})
    expected, objective = _dense_reml(pheno, K1, K2)
    vc = m.variance_components
    assert list(vc.index) == ["iid.1", "iid.2", "Residual"]
    assert np.allclose(vc["variance"], expected, rtol=2e-3, atol=1e-4)
    assert m.objective == pytest.approx(objective, abs=1e-4)
    assert vc["std_error"].notna().all()
    # heritability of each and of both together, with delta-method SEs
    h1, se1 = m.heritability("iid.1")
    both, se_both = m.heritability(["iid.1", "iid.2"])
    assert h1 == pytest.approx(expected[0] / expected.sum(), rel=5e-3)
    assert both == pytest.approx(expected[:2].sum() / expected.sum(), rel=5e-3)
    assert 0 < se1 < 1 and 0 < se_both < 1


def test_named_matrices_and_refusals(two_grms):
    pheno, K1, K2 = two_grms
    m = hd.lmm("y ~ age + (1 | iid)", pheno, relationships={"iid": {"snp": K1, "dom": K2}})
    assert list(m.variance_components.index) == ["iid.snp", "iid.dom", "Residual"]
    with pytest.raises(FormulaError, match="intercept-only"):
        hd.lmm("y ~ age + (age | iid)", pheno, relationships={"iid": [K1, K2]})
