"""Animal-breeding benchmarks on a simulated population (1M animals at full scale)."""
import numpy as np
import pytest

import henderson as hd
from henderson.simulate import animal_population

from conftest import run_once


@pytest.fixture(scope="module")
def population(sizes):
    return animal_population(sizes["animals"], n_generations=8, seed=1)


def test_pedigree_inbreeding_and_ainverse(benchmark, population):
    pedigree_frame = population[0]

    def build():
        ped = hd.Pedigree.from_dataframe(pedigree_frame)
        return ped, ped.inverse()

    ped, ainv = run_once(benchmark, build)
    assert ainv.shape == (len(pedigree_frame),) * 2 and ped.inbreeding.max() > 0
    benchmark.extra_info.update(animals=len(ped), ainv_nnz=int(ainv.nnz),
                                max_inbreeding=float(ped.inbreeding.max()))


def test_blup_known_variances(benchmark, population):
    pedigree_frame, records, true_values = population
    ped = hd.Pedigree.from_dataframe(pedigree_frame)
    m = run_once(benchmark, hd.lmm, "y ~ sex + hys + (1 | animal)", records,
                 relationships={"animal": ped},
                 fixed_variances={"animal": 30.0, "residual": 70.0})
    ebv = m.ranef["animal"].iloc[:, 0]
    accuracy = np.corrcoef(ebv, true_values.loc[ebv.index])[0, 1]
    assert accuracy > 0.5
    benchmark.extra_info.update(records=len(records), accuracy=float(accuracy),
                                **{k: round(v, 3) for k, v in m.timings.items()})


def test_ai_reml_with_pev(benchmark, population):
    pedigree_frame, records, _ = population
    ped = hd.Pedigree.from_dataframe(pedigree_frame)

    def fit():
        m = hd.lmm("y ~ sex + hys + (1 | animal)", records, relationships={"animal": ped})
        return m, m.breeding_values()

    m, bv = run_once(benchmark, fit)
    assert m.converged and bv["pev"].notna().all()
    h2, se = m.heritability()
    assert 0.2 < h2 < 0.4
    benchmark.extra_info.update(h2=h2, h2_se=se, iterations=len(m.optimizer_result.history),
                                **{k: round(v, 3) for k, v in m.timings.items()})
