import numpy as np
import pytest

import henderson as hd
from henderson.blockdiag import BlockDiagonalObjective, outermost_grouping
from henderson.errors import FormulaError
from henderson.mme import MixedModelEquations
from henderson.objective import Objective

CASES = [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy", None),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy_weighted", "w"),
    ("strength ~ 1 + (1 | batch/cask)", "pastes", None),
    ("height ~ moisture + (1 | pot)", "plants", None),
]


@pytest.mark.parametrize("formula,data,weights", CASES)
@pytest.mark.parametrize("reml", [True, False])
def test_block_diagonal_path_equals_mme(formula, data, weights, reml):
    d = hd.build_design(formula, hd.datasets.load(data), weights=weights)
    block = BlockDiagonalObjective(d, reml=reml)
    mme = Objective(MixedModelEquations(d), reml=reml)
    rng = np.random.default_rng(0)
    for _ in range(3):
        theta = np.abs(rng.normal(size=d.n_theta)) + 0.05
        assert abs(block(theta) - mme(theta)) < 1e-8 * abs(mme(theta))


def test_blockdiag_fit_matches_mme_fit():
    df = hd.datasets.load("sleepstudy")
    a = hd.lmm("Reaction ~ Days + (Days | Subject)", df, method="blockdiag")
    b = hd.lmm("Reaction ~ Days + (Days | Subject)", df)
    assert abs(a.objective - b.objective) < 1e-8 * b.objective
    assert np.allclose(a.theta, b.theta, atol=1e-4)


def test_crossed_design_is_rejected():
    d = hd.build_design("diameter ~ 1 + (1|plate) + (1|sample)", hd.datasets.load("penicillin"))
    with pytest.raises(FormulaError, match="nest"):
        outermost_grouping(d)
