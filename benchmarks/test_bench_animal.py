"""Animal-breeding benchmarks on a simulated population (1M animals at full scale)."""
import numpy as np
import pytest

import henderson as hd
from henderson.simulate import animal_population, maternal_population, multi_trait_population

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


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def test_two_trait_ai_reml_with_pev(benchmark, sizes):
    """Issue 13: two traits, 20% of the second missing; AI-REML to convergence and the
    PEVs of every animal for both traits."""
    pedigree_frame, records, truth = multi_trait_population(sizes["animals"], n_generations=8,
                                                            seed=1)
    ped = hd.Pedigree.from_dataframe(pedigree_frame)

    def fit():
        m = hd.lmm("cbind(y1, y2) ~ sex + hys + (1 | animal)", records,
                   relationships={"animal": ped})
        return m, m.breeding_values()

    m, bv = run_once(benchmark, fit)
    assert m.converged and bv["pev"].notna().all() and len(bv) == 2 * len(pedigree_frame)
    G0 = m.covariances["animal"].to_numpy()
    assert 20 < G0[0, 0] < 40 and 0.3 < m.genetic_correlation()[0] < 0.6
    y1 = bv[bv["trait"] == "y1"]["ebv"]
    accuracy = np.corrcoef(y1, truth.loc[y1.index, "y1"])[0, 1]
    benchmark.extra_info.update(
        records=len(records), iterations=m.optimizer_result.iterations,
        genetic=G0.round(3).tolist(), accuracy_y1=float(accuracy),
        peak_rss_gb=round(_peak_rss_gb(), 2), **{k: round(v, 3) for k, v in m.timings.items()})


def test_maternal_ai_reml_with_pev(benchmark, sizes):
    """Issue 13: direct and maternal genetic effects (correlated) and maternal
    permanent environment; AI-REML and the PEVs of every animal."""
    pedigree_frame, calves, truth = maternal_population(sizes["animals"], n_generations=8,
                                                        seed=1)
    ped = hd.Pedigree.from_dataframe(pedigree_frame)

    def fit():
        m = hd.lmm("y ~ sex + hys + (1 | animal) + (1 | dam) + (1 | pe)", calves,
                   relationships={"animal": ped, "dam": ped}, covary=[("animal", "dam")])
        return m, m.breeding_values("dam")

    m, bv = run_once(benchmark, fit)
    assert m.converged and bv["pev"].notna().all()
    G = m.covariances[("animal", "dam")].to_numpy()
    assert G[0, 1] < 0 and 15 < G[0, 0] < 45
    benchmark.extra_info.update(
        records=len(calves), iterations=m.optimizer_result.iterations,
        genetic=G.round(3).tolist(), peak_rss_gb=round(_peak_rss_gb(), 2),
        **{k: round(v, 3) for k, v in m.timings.items()})
