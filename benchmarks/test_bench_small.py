"""Small models (issue 15): the fixed cost of one fit. Orthodont's
``distance ~ age + Sex + (age | Subject)`` (108 rows, 27 subjects, BOBYQA and the
convergence check: ~125 evaluations of the objective), one objective evaluation, and
the design alone. ``benchmarks/small_fits.py`` times the 100-fit loop against lme4's in
fresh processes, with import and first-fit times."""
import numpy as np

import henderson as hd

FORMULA = "distance ~ age + Sex + (age | Subject)"


def test_small_fit(benchmark):
    data = hd.datasets.load("orthodont")
    hd.lmm(FORMULA, data)                     # kernels loaded, model specs stored
    m = benchmark(hd.lmm, FORMULA, data)
    assert abs(m.objective - 435.2338574) < 1e-6     # lme4 1.1-31's REML criterion
    benchmark.extra_info.update(evaluations=m.n_evaluations,
                                **{k: round(v, 5) for k, v in m.timings.items()})


def test_small_objective_evaluation(benchmark):
    data = hd.datasets.load("orthodont")
    m = hd.lmm(FORMULA, data)
    objective = m.objective_function
    points = [m.theta * (1 + 1e-6 * i) for i in range(64)]
    state = {"i": 0}

    def evaluate():      # a new θ every call: the factor is refreshed each time
        state["i"] = (state["i"] + 1) % len(points)
        return objective(points[state["i"]])

    value = benchmark(evaluate)
    assert np.isfinite(value) and abs(value - m.objective) < 1e-3
    objective.history.clear()


def test_small_design(benchmark):
    data = hd.datasets.load("orthodont")
    hd.build_design(FORMULA, data)
    design = benchmark(hd.build_design, FORMULA, data)
    assert design.fixed_names == ["(Intercept)", "age", "SexFemale"]
