"""Every case in tests/data/cases against what lme4 1.1-31 printed for it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import henderson as hd

from conftest import CASES, assert_sigma_and_fixed_effects, load_case

_FITS: dict[str, hd.LinearMixedModel] = {}


def fitted(name: str) -> tuple[dict, hd.LinearMixedModel]:
    case = load_case(name)
    if name not in _FITS:
        data = hd.datasets.load(case["data"])
        _FITS[name] = hd.lmm(case["formula"], data, reml=case["REML"],
                             weights=case["weights"])
    return case, _FITS[name]


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


@pytest.mark.parametrize("name", CASES)
def test_objective_and_likelihood(name):
    case, m = fitted(name)
    assert m.nobs == case["nobs"]
    assert rel(m.objective, case["objective"]) < 2e-7
    assert rel(m.loglik, case["logLik"]) < 2e-7
    assert rel(m.aic, case["AIC"]) < 2e-7
    assert rel(m.bic, case["BIC"]) < 2e-7
    assert m.singular == case["singular"]


@pytest.mark.parametrize("name", CASES)
def test_sigma_and_fixed_effects(name):
    case, m = fitted(name)
    assert_sigma_and_fixed_effects(m, case)


@pytest.mark.parametrize("name", CASES)
def test_variance_components(name):
    case, m = fitted(name)
    ref = pd.DataFrame(case["varcorr"])
    vc = m.varcorr
    assert list(vc["grp"]) == list(ref["grp"])
    # lme4's NA is None in both columns of every model (it was NaN in some, issue 16)
    assert list(vc["var1"]) == case["varcorr"]["var1"]
    assert list(vc["var2"]) == case["varcorr"]["var2"]
    assert vc["var2"].dtype == object and vc["var1"].dtype == object
    # variances relative; correlations (bounded by 1) absolute
    is_cov = ref["var2"].notna().to_numpy()
    sdcor = vc["sdcor"].to_numpy()
    ref_sdcor = ref["sd_or_corr"].to_numpy(dtype=float)
    scale = np.where(is_cov, 1.0, np.maximum(np.abs(ref_sdcor), 1e-8))
    assert np.all(np.abs(sdcor - ref_sdcor) / scale < 5e-3)
    var = vc["vcov"].to_numpy()
    ref_var = ref["variance_or_cov"].to_numpy(dtype=float)
    scale = np.maximum(np.abs(ref_var), np.max(ref_var) * 1e-3)
    assert np.all(np.abs(var - ref_var) / scale < 5e-3)


@pytest.mark.parametrize("name", CASES)
def test_blups_and_conditional_sds(name):
    case, m = fitted(name)
    for block in case["ranef"]:
        group = block["group"]
        values = m.ranef[group]
        sds = m.ranef_sd[group]
        assert list(values.columns) == block["terms"]
        assert list(values.index) == block["levels"]
        ref_values = np.array(block["values"], dtype=float)
        ref_sd = np.array(block["cond_sd"], dtype=float)
        # absolute error scaled by each coefficient's spread of BLUPs (BLUPs near 0
        # have no meaningful relative error)
        spread = np.maximum(np.abs(ref_values).max(axis=0), 1e-8)
        assert np.all(np.abs(values.to_numpy() - ref_values) / spread < 5e-3)
        sd_scale = np.maximum(np.abs(ref_sd).max(axis=0), 1e-8)
        assert np.all(np.abs(sds.to_numpy() - ref_sd) / sd_scale < 5e-3)


@pytest.mark.parametrize("name", CASES)
def test_theta(name):
    case, m = fitted(name)
    ref = np.array(case["theta"])
    assert m.theta.shape == ref.shape
    assert np.all(np.abs(m.theta - ref) < 5e-3 * np.maximum(1, np.abs(ref)))
