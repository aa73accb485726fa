"""The optimiser stage: no silent wrong answer.

Every case here ended in a wrong fit reported as converged before the convergence
check, the shifted response and the scaled coordinates (optimize.py, mme.py)."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import DATA

import henderson as hd
from henderson.errors import ConvergenceWarning


def random_intercept_data(seed=1, groups=20, per=10, group_sd=1.0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    frame = pd.DataFrame({"g": g.astype(str), "x": rng.normal(size=groups * per)})
    frame["y"] = frame.x + group_sd * rng.normal(size=groups)[g] + rng.normal(size=len(g))
    return frame


def test_bobyqa_stopped_by_roundoff_returns_its_best_point():
    """nlopt 2.11 raised RoundoffLimited out of hd.lmm on ~4% of fits whose true group
    variance is 0 (lme4 returns a singular fit there)."""
    rng = np.random.default_rng(16)
    d = pd.DataFrame({"g": rng.integers(0, 20, 400), "x": rng.normal(size=400)})
    d["y"] = d.x + rng.normal(size=400)
    m = hd.lmm("y ~ x + (1 | g)", d)
    q = hd.lmm("y ~ x + (1 | g)", d, optimizer="lbfgs")
    assert m.converged and q.converged
    assert m.objective == pytest.approx(q.objective, abs=1e-7)


PATHS = [
    {"optimizer": "bobyqa"},
    {"optimizer": "lbfgs"},
    {"optimizer": "ai"},
    {"optimizer": "bobyqa", "method": "blockdiag"},
    {"optimizer": "bobyqa", "chunked": True},
    {"optimizer": "ai", "chunked": True},
]


def fit(frame, formula="y ~ x + (1 | g)", chunked=False, **options):
    data = hd.chunked(frame, chunk_rows=47) if chunked else frame
    return hd.lmm(formula, data, **options)


@pytest.mark.parametrize("options", PATHS, ids=lambda o: "-".join(map(str, o.values())))
def test_objective_is_invariant_to_a_shift_of_y(options):
    """y + 1e8 gave −inf (θ = 1, σ = 0) and y + 1e7 an objective 15 below the optimum,
    both reported as converged; AI-REML with +3e7 ended at θ = 0.147 instead of 0.97:
    ``y'Wy − sol'·rhs`` cancelled. The response is now shifted by a least-squares fit
    of the fixed effects before any cross-product. What differs at +1e8 is the data
    itself: y + 1e8 keeps only ~8 decimals."""
    frame = random_intercept_data()
    base = fit(frame, **options)
    for shift in (1e6, 1e7, 3e7, 1e8):
        m = fit(frame.assign(y=frame.y + shift), **options)
        assert m.converged
        assert m.objective == pytest.approx(base.objective, abs=1e-6), shift
        np.testing.assert_allclose(m.theta, base.theta, rtol=1e-5)
        assert m.fixef["(Intercept)"] - shift == pytest.approx(base.fixef["(Intercept)"],
                                                               abs=1e-6)


@pytest.mark.parametrize("options", PATHS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_scaling_y_moves_the_objective_by_a_constant(options, factor):
    """σ scales with y, θ does not, the criterion moves by ν·log(a²)."""
    frame = random_intercept_data(seed=2)
    base = fit(frame, **options)
    m = fit(frame.assign(y=frame.y * factor), **options)
    dof = base.nobs - (base.design.n_fixed if base.reml else 0)
    assert m.objective == pytest.approx(base.objective + dof * np.log(factor ** 2), abs=1e-6)
    np.testing.assert_allclose(m.theta, base.theta, rtol=1e-5, atol=1e-7)
    assert m.sigma == pytest.approx(base.sigma * factor, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["bobyqa", "lbfgs", "Nelder-Mead"])
@pytest.mark.parametrize("factor", [1e-4, 1e4])
def test_scaling_a_slope_covariate_changes_nothing_but_its_units(optimizer, factor):
    """θ of a slope scales with 1/a; REML's log|X'V⁻¹X| moves by 2 log a (one scaled
    column of X), ML's criterion not at all. BOBYQA's first step of 0.75 in θ meant
    nothing for a covariate of size 1e4 before the optimisers searched in θ̃."""
    rng = np.random.default_rng(5)
    frame = random_intercept_data(seed=5, groups=25, per=8)
    frame["y"] += 0.5 * rng.normal(size=25)[frame.g.astype(int)] * frame.x
    for reml in (True, False):
        base = hd.lmm("y ~ x + (x | g)", frame, reml=reml, optimizer=optimizer)
        m = hd.lmm("y ~ x + (x | g)", frame.assign(x=frame.x * factor), reml=reml,
                   optimizer=optimizer)
        assert base.converged and m.converged
        shift = 2 * np.log(factor) if reml else 0.0
        assert m.objective == pytest.approx(base.objective + shift, abs=1e-6)
        expected = base.theta / np.array([1.0, factor, factor])  # rows (1, x, x) of Λ
        rtol = 2e-3 if optimizer == "Nelder-Mead" else 1e-4  # scipy's NM stops at xatol 1e-4
        np.testing.assert_allclose(m.theta, expected, rtol=rtol, atol=1e-8 / factor)


@pytest.mark.parametrize("optimizer", ["bobyqa", "lbfgs", "Nelder-Mead", "Powell"])
def test_random_slope_without_group_effect_reaches_the_minimum(optimizer):
    """BOBYQA stopped at 808.2855 (θ = (0, −0.133, 0.095): a zero diagonal of Λ with a
    nonzero column below it, where flipping the column reverses the derivative);
    lme4 and L-BFGS-B reach 807.7865."""
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(30), 10)
    d = pd.DataFrame({"g": g.astype(str), "x": rng.normal(size=300)})
    d["y"] = d.x + rng.normal(size=300)
    m = hd.lmm("y ~ x + (x | g)", d, optimizer=optimizer)
    assert m.converged
    assert m.objective == pytest.approx(807.7864736953, abs=1e-6)


def test_wafer_reaches_lme4s_optimum():
    """nlme's Wafer: BOBYQA ended at −242.081 (lme4: −246.185), reported converged."""
    case = json.loads((DATA / "wafer" / "lme4_wafer.json").read_text())
    wafer = pd.read_csv(DATA / "wafer" / "wafer.csv")
    for optimizer in ("bobyqa", "lbfgs"):
        m = hd.lmm(case["formula"], wafer, optimizer=optimizer)
        assert m.converged
        assert m.objective <= case["objective"] + 1e-6
        assert m.objective == pytest.approx(case["objective"], abs=1e-5)
        np.testing.assert_allclose(m.fixef, case["fixef"], rtol=1e-5)


def test_toeplitz_on_tiny_data_reaches_the_lowest_basin():
    """Found by the many-example differential run: toep(0 + f | g) + (1 | h) on 9 rows,
    ML. BOBYQA and L-BFGS-B stopped at −0.674 (φ₁ = 0.24) and reported convergence;
    Nelder-Mead found −3.511 (SD of f0 = 0, ρ's at the ends of their range). The
    exploration now starts each correlation from φ = ±3 as well as from 0."""
    frame = pd.DataFrame({
        "g": ["g0", "g1", "g2", "g0", "g0", "g0", "g0", "g0", "g0"],
        "h": ["h0", "h1", "h2", "h1", "h1", "h2", "h2", "h1", "h1"],
        "x": [-1.265421, -0.623274, 0.041326, -2.325031, -0.218792, -1.245911, -0.732267,
              -0.544259, -0.316300],
        "y": [-0.856653, 0.081782, 1.250728, -1.727414, 0.629175, -0.079738, 0.999827,
              0.812546, 1.121682],
        "f": pd.Categorical(["f0", "f1", "f2", "f2", "f0", "f2", "f1", "f1", "f2"])})
    formula = "y ~ x + toep(0 + f | g) + (1 | h)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = {opt: hd.lmm(formula, frame, reml=False, optimizer=opt)
                for opt in ("bobyqa", "lbfgs", "Nelder-Mead")}
    # an independent bound on the minimum: the objective at the Nelder-Mead optimum and
    # at a grid of correlation parameters with the rest of θ re-optimised by Powell
    objective = fits["bobyqa"].objective_function
    best_seen = min(m.objective for m in fits.values())
    base = fits["Nelder-Mead"].theta
    for phi in (-3.0, 3.0, 30.0):
        theta = base.copy()
        theta[3] = phi
        best_seen = min(best_seen, float(objective(theta)))
    assert best_seen < -3.5
    for name, m in fits.items():
        assert m.converged, name
        assert m.objective <= best_seen + 1e-6, name


def test_sd_parameters_stop_where_the_objective_is_still_exact():
    """toep over 9 times with one record per subject and time: the structure's
    variances take up the residual variance, and the likelihood rises as σ → 0.
    L-BFGS-B ran θ̃ to 4e6, where the relative-form objective had lost its digits:
    7904.94 computed, 8304.93 the dense value; the fit then failed as if y were fitted
    exactly. The SD parameters now stop at θ̃ = 1e4 (settings.theta_limit)."""
    from test_differential import dense_criterion

    from henderson.optimize import SETTINGS, ScaledProblem, residual_at_limit, theta_scale

    rng = np.random.default_rng(2)
    times, groups = 9, 300
    ar1 = np.linalg.cholesky(0.6 ** np.abs(np.subtract.outer(range(times), range(times))))
    effects = (ar1 @ rng.standard_normal((times, groups))).T
    g, t = np.repeat(np.arange(groups), times), np.tile(np.arange(times), groups)
    frame = pd.DataFrame({"g": [f"g{i}" for i in g], "t": t + 1,
                          "y": effects[g, t] + 0.7 * rng.standard_normal(len(g))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hd.lmm("y ~ 1 + toep(0 + factor(t) | g)", frame, optimizer="lbfgs")
    problem = ScaledProblem(m.objective_function, theta_scale(m.design, m.mme.xp))
    scaled = problem.to_scaled(m.theta)
    lower = m.design.parameter_lower_bounds()
    assert np.all(scaled[np.isfinite(lower)] <= SETTINGS.theta_limit)
    # near the limit the relative form keeps ~7 digits here (2.6e-3 of 8304.9), not
    # the ~13 of an ordinary fit; beyond it, none
    assert m.objective == pytest.approx(dense_criterion(m, reml=True), rel=1e-6)
    assert 8304.92 < m.objective < 8304.94  # the dense limit as σ → 0 is 8304.9335
    # at the limit itself the objective levels off; for y fitted exactly it falls
    ridge = scaled.copy()
    ridge[np.isfinite(lower)] *= SETTINGS.theta_limit / scaled[np.isfinite(lower)].max()
    assert residual_at_limit(problem, ridge, lower) == "levels off"
    sleep = hd.datasets.load("sleepstudy")
    with pytest.raises(hd.DataError, match="residual variance is estimated as 0"):
        hd.lmm("y ~ Days + (1 | Subject)", sleep.assign(y=sleep.Subject.astype(float)))


def test_a_polish_below_the_noise_threshold_that_passes_the_check_is_kept():
    """cs over 9 times, ρ → 1: L-BFGS-B from BOBYQA's point lowered the objective by
    1.8e-9 (below 1e-12 relative, then the threshold for keeping a restart) and there
    the check passed; the fit kept the old point and reported converged=False."""
    rng = np.random.default_rng(2)
    for times in (5, 7, 9):  # the probe's sequence of draws, for its 9-time data
        ar1 = np.linalg.cholesky(0.6 ** np.abs(np.subtract.outer(range(times), range(times))))
        effects = (ar1 @ rng.standard_normal((times, 300))).T
        g, t = np.repeat(np.arange(300), times), np.tile(np.arange(times), 300)
        frame = pd.DataFrame({"g": [f"g{i}" for i in g], "t": t + 1,
                              "y": effects[g, t] + 0.7 * rng.standard_normal(len(g))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = hd.lmm("y ~ 1 + cs(0 + factor(t) | g)", frame)
    assert m.converged
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert m.covariance_parameters["g"]["rho"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("ratio", [1e5, 1e6])
def test_an_sd_far_above_sigma_is_estimated_beyond_the_limit(ratio):
    """Group effects 1e5 and 1e6 times the noise: θ̃ beyond the SD limit of 1e4. The
    limit alone made these a DataError ("the random effects fit y exactly"); the fit
    goes on past it, finds the minimum, and says the objective has fewer digits."""
    from test_differential import dense_criterion

    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(30), 10)
    x = rng.normal(size=300)
    frame = pd.DataFrame({"g": g.astype(str), "x": x,
                          "y": 1 + x + ratio * rng.normal(size=30)[g] + rng.normal(size=300)})
    with pytest.warns(ConvergenceWarning, match="more than 10000 times σ"):
        m = hd.lmm("y ~ x + (1 | g)", frame)
    assert m.theta[0] > 1e4
    assert m.sigma == pytest.approx(1.0, rel=0.1)
    for factor in (0.8, 1.25):  # a minimum along θ
        assert m.objective_function(m.theta * factor) > m.objective + 1.0
    if ratio == 1e5:  # at 1e6 the dense V (entries 1e12 + 1) has lost its digits too
        assert m.objective == pytest.approx(dense_criterion(m, reml=True), rel=1e-6)


def test_refits_of_a_fit_past_the_sd_limit_are_not_held_at_it():
    """An SD 8e4 σ: bootstrap replicates held at θ̃ = 1e4 gave an SD interval
    [226, 345] around an estimate of 827, and profiles of the fixed effects
    collapsed to a point."""
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(30), 10)
    u, x = rng.normal(size=30), rng.normal(size=300)
    frame = pd.DataFrame({"g": g.astype(str), "x": x,
                          "y": 2 + 0.5 * x + 1000 * u[g] + 0.01 * rng.normal(size=300)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hd.lmm("y ~ x + (1 | g)", frame)
        boot = m.confint("bootstrap", n_boot=40, seed=3)
        profile = m.confint("profile")
    sd = m.varcorr.sdcor.iloc[0]
    low, high = boot.loc["sd_(Intercept)|g"]
    assert low < sd < high
    low, high = boot.loc["sigma"]
    assert low < m.sigma < high
    low, high = profile.loc["x"]
    assert high - low > 1e-3 and low < m.fixef["x"] < high


def test_a_minimum_that_cannot_be_reached_is_reported_not_converged():
    """A random slope in a covariate near 5e6: intercept and slope are nearly the same
    column, and the objective is evaluated to ~3 digits there. The fit ended 28
    deviance units above the optimum with no warning (lme4 ends 312 above it and
    warns). Either the optimum (1004.857, the same model with x centred) is reached, or
    the fit says it may not be at a minimum."""
    rng = np.random.default_rng(11)
    g = np.repeat(np.arange(25), 12)
    x = rng.uniform(0, 10, 300)
    d = pd.DataFrame({"g": g.astype(str), "x": x})
    d["y"] = (2 + 0.5 * x + rng.normal(size=25)[g] + 0.3 * rng.normal(size=25)[g] * x
              + rng.normal(size=300))
    centred = hd.lmm("y ~ x + (x | g)", d)
    assert centred.objective == pytest.approx(1004.857304, abs=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = hd.lmm("y ~ x + (x | g)", d.assign(x=x + 5e6))
    at_optimum = m.objective <= centred.objective + 1e-3
    warned = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert at_optimum or (warned and not m.converged)
    if not at_optimum:  # the warning says what to do: centre x (lme4: "Rescale variables?")
        assert "'x' in (x | g) has mean 5e+06" in warned[0] and "centre it" in warned[0]


@pytest.mark.parametrize("optimizer,seed", [("ai", 6), ("ai", 59), ("lbfgs", 8), ("lbfgs", 59)])
def test_variance_on_the_boundary_is_exactly_zero(optimizer, seed):
    """Newton-type optimisers approached the bound where lme4's BOBYQA stops on it
    (θ = 1.4e-5 from AI-REML, 6e-10 from L-BFGS-B on these data): a variance that the
    objective lets be 0 is now exactly 0."""
    rng = np.random.default_rng(seed)
    n = 300
    d = pd.DataFrame({"g": rng.integers(0, 30, n).astype(str),
                      "h": rng.integers(0, 8, n).astype(str), "x": rng.normal(size=n)})
    d["y"] = d.x + rng.normal(size=8)[d.h.astype(int)] + rng.normal(size=n)
    reference = hd.lmm("y ~ x + (1 | g) + (1 | h)", d, optimizer="bobyqa")
    m = hd.lmm("y ~ x + (1 | g) + (1 | h)", d, optimizer=optimizer)
    assert reference.theta[0] == 0.0
    assert m.theta[0] == 0.0 and m.singular
    assert m.objective == pytest.approx(reference.objective, abs=1e-7)


def test_theta_is_in_lme4s_order_when_terms_tie():
    """lme4's mkReTrms orders terms by rev(order(number of levels)) once any term has
    more levels than the one before: equally many levels come in reverse formula order
    ((1|a) + (1|b) + (1|c) with 5, 10, 10 levels is c, b, a in lme4 1.1-31)."""
    rng = np.random.default_rng(1)
    n = 300
    d = pd.DataFrame({"a": rng.integers(0, 5, n), "b": rng.integers(0, 10, n),
                      "c": rng.integers(0, 10, n), "y": rng.normal(size=n)})
    d["y"] += rng.normal(size=10)[d.b] + 0.5 * rng.normal(size=10)[d.c]
    m = hd.lmm("y ~ (1 | a) + (1 | b) + (1 | c)", d)
    assert [t.group for t in m.design.terms] == ["c", "b", "a"]
    assert list(m.varcorr.grp[:3]) == ["c", "b", "a"]
    m = hd.lmm("y ~ (1 | b) + (1 | c) + (1 | a)", d)  # non-increasing: kept as written
    assert [t.group for t in m.design.terms] == ["b", "c", "a"]
    m = hd.lmm("y ~ (1 + a || b) + (1 | a) + (1 | c)", d)
    assert [(t.group, t.coef_names[0]) for t in m.design.terms] == [
        ("c", "(Intercept)"), ("b", "a"), ("b", "(Intercept)"), ("a", "(Intercept)")]


def test_converged_means_the_check_passed():
    m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    assert m.converged and m.optimizer_result.check.passed
    assert np.max(m.optimizer_result.check.scaled_gradient) < 2e-3
    assert m.optimizer_result.check.min_eigenvalue > 0


# ----------------------------------------------------------------------------------
# mid-size fits (5,000-50,000 rows): Newton by default, exploration where it has reason


def _mid_size_problem(formula, data):
    from henderson.fit import theta_scale
    from henderson.mme import MixedModelEquations
    from henderson.objective import Objective
    from henderson.optimize import ScaledProblem

    design = hd.build_design(formula, data)
    mme = MixedModelEquations(design)
    return design, ScaledProblem(Objective(mme, reml=True), theta_scale(design, mme.xp))


def test_mid_size_exploration_is_thorough_only_where_the_minimum_gives_a_reason():
    from henderson.optimize import SETTINGS, _explore_thoroughly
    from henderson.simulate import crossed

    design, problem = _mid_size_problem("y ~ x + (1 + x | g1) + (1 | g2)",
                                        crossed(6_000, 600, 100, seed=2))
    # an interior minimum with many levels: lme4's start only
    interior = problem.to_scaled(np.array([1.0, 0.3, 0.6, 0.7]))
    assert not _explore_thoroughly(problem, interior)
    # Σ_t nearly singular (slope SD ~0 or a correlation near ±1), a scalar variance near 0
    for theta in ([1.0, 0.3, 1e-4, 0.7], [1.0, 5.0, 0.1, 0.7], [1.0, 0.3, 0.6, 1e-6]):
        assert _explore_thoroughly(problem, problem.to_scaled(np.array(theta))), theta
    # few levels, or fewer rows than SETTINGS.explore_all_rows: every start
    _, few_levels = _mid_size_problem("y ~ x + (1 + x | g1) + (1 | g2)",
                                      crossed(6_000, 600, 20, seed=2))
    assert _explore_thoroughly(few_levels, interior)
    _, small = _mid_size_problem("y ~ x + (1 + x | g1) + (1 | g2)",
                                 crossed(SETTINGS.explore_all_rows - 1, 600, 100, seed=2))
    assert _explore_thoroughly(small, small.to_scaled(np.array([1.0, 0.3, 0.6, 0.7])))


@pytest.mark.parametrize("formula", ["y ~ x + (1 + x | g1) + (1 | g2)",
                                     "y ~ x + (1 | g1) + (1 | g2)"])
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_mid_size_default_fit_is_bobyqas_optimum_at_a_fraction_of_the_cost(
        formula, reml, monkeypatch):
    """From 5,000 rows the default is Newton with one check from lme4's start; it must
    reach the optimum of BOBYQA explored from every start (as below 5,000 rows), at a
    fraction of the evaluations (20,000 rows of the slope model: 255 before, 15 now)."""
    import henderson.optimize as optimize
    from henderson.simulate import crossed

    data = crossed(8_000, 800, 100, seed=4)
    default = hd.lmm(formula, data, reml=reml)
    monkeypatch.setattr(optimize, "_explore_thoroughly", lambda *args, **kwargs: True)
    reference = hd.lmm(formula, data, reml=reml, optimizer="bobyqa")
    assert default.converged and default.optimizer_result.method.startswith("newton")
    assert default.objective == pytest.approx(reference.objective, rel=1e-10, abs=1e-6)
    np.testing.assert_allclose(default.theta, reference.theta, rtol=1e-4, atol=1e-5)
    assert default.n_evaluations < reference.n_evaluations / 3
