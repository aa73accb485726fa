"""Shared fixtures: the reference results of lme4 1.1-31 (copied under tests/data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
CASES = sorted(p.stem for p in (DATA / "cases").glob("*.json"))


def load_case(name: str) -> dict:
    return json.loads((DATA / "cases" / f"{name}.json").read_text())


def assert_sigma_and_fixed_effects(model, case: dict) -> None:
    """σ to 1e-3, fixed effects to 1e-4 and their SEs to 2e-3 of what lme4 printed
    (relative; estimates near 0 on the scale of the largest)."""
    assert abs(model.sigma - case["sigma"]) / case["sigma"] < 1e-3
    fixef = case["fixef"]
    assert list(model.fixef.index) == fixef["names"]
    estimate = np.array(fixef["estimate"])
    scale = np.maximum(np.abs(estimate), 1e-8 * np.max(np.abs(estimate)))
    assert np.all(np.abs(model.fixef.to_numpy() - estimate) / scale < 1e-4)
    se = np.sqrt(np.diag(model.vcov.to_numpy()))
    assert np.all(np.abs(se - fixef["std_error"]) / np.array(fixef["std_error"]) < 2e-3)


def covariance_from_parameters(name: str, k: int, params: dict) -> np.ndarray:
    """Σ written out from the definitions (glmmTMB 1.1), not from the module's Λ."""
    sd = np.atleast_1d(np.asarray(params["sd"], dtype=float))
    sd = np.full(k, sd[0]) if len(sd) == 1 else sd
    lag = np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
    if name == "us":
        corr = np.asarray(params["corr"])
    elif name == "diag":
        corr = np.eye(k)
    elif name == "cs":
        rho = params["rho"] if k > 1 else 0.0
        corr = np.where(lag == 0, 1.0, rho)
    elif name == "ar1":
        rho = params["rho"] if k > 1 else 0.0
        corr = rho ** lag
    else:
        corr = np.concatenate([[1.0], params["rho"]])[lag]
    return np.nan_to_num(np.outer(sd, sd) * corr)  # a correlation with a zero SD: no term


def load_json(*parts: str) -> dict:
    return json.loads(DATA.joinpath(*parts).read_text())


@pytest.fixture(scope="session")
def sleepstudy():
    import henderson as hd

    return hd.datasets.load("sleepstudy")

# scripts that made reference data (one needs FaST-LMM) are not tests
collect_ignore_glob = ["data/*"]
