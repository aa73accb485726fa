"""APY's H⁻¹ as an operator (hd.implicit_single_step) against the explicit H⁻¹ and its
dense twin; BLUP by PCG (hd.solve_blup) against the direct solve of hd.lmm; the PEV
approximation against exact PEVs; the errors."""
import numpy as np
import pandas as pd
import pytest

import henderson as hd
from henderson import DataError, FormulaError
from henderson.simulate import animal_population

from test_single_step import dense_h_inverse


@pytest.fixture(scope="module")
def population():
    frame, records, _ = animal_population(600, n_generations=4, seed=5)
    ped = hd.Pedigree.from_dataframe(frame)
    rng = np.random.default_rng(3)
    genotyped = rng.choice(frame["animal"].to_numpy()[300:], size=60, replace=False)
    counts = rng.binomial(2, rng.uniform(0.05, 0.95, 400), size=(60, 400))
    genotypes = pd.DataFrame(counts, index=genotyped,
                             columns=[f"snp{j}" for j in range(400)])
    return ped, genotypes, records


def _columns(operator, n):
    return np.column_stack([operator(e) for e in np.eye(n)])


@pytest.mark.parametrize("options", [
    dict(), dict(blend=0.0), dict(tune=None, blend=0.2), dict(tau=1.3, omega=0.7),
    dict(omega=0.0),
], ids=["defaults", "no-blend", "no-tune", "tau-omega", "omega-0"])
def test_operator_is_the_explicit_h_inverse(population, options):
    ped, genotypes, _ = population
    H = hd.single_step(ped, genotypes, apy=15, seed=2, **options)
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2, **options)
    assert list(op.core) == list(H.core) and list(op.genotyped) == list(H.genotyped)
    assert op.tuning == pytest.approx(H.tuning, rel=1e-12, abs=1e-14)
    x = np.random.default_rng(0).normal(size=(len(ped), 3))
    expected = H.matrix @ x
    assert np.max(np.abs(op.matvec(x) - expected)) < 1e-10 * np.abs(expected).max()
    assert np.allclose(op.matvec(x[:, 0]), expected[:, 0], rtol=0, atol=1e-10)


def test_operator_equals_the_dense_twin(population):
    """Against the formulas written out in NumPy (dense A, A22⁻¹ by inversion)."""
    ped, genotypes, _ = population
    core_ids = list(genotypes.index[:9])
    op = hd.implicit_single_step(ped, genotypes, apy=core_ids, tau=1.1, omega=0.8)
    slots = op.genotyped.get_indexer(op.core)
    expected, A, pos, G = dense_h_inverse(ped, genotypes, core=slots, tau=1.1, omega=0.8)
    assert np.max(np.abs(_columns(op.matvec, len(ped)) - expected)) < 1e-8
    # G_APY⁻¹'s diagonal and G*'s diagonal, which APY keeps
    from test_single_step import dense_apy_inverse
    assert np.allclose(op.apy_inverse_diagonal(), np.diag(dense_apy_inverse(G, slots)),
                       rtol=1e-10)
    assert np.allclose(op.genomic_diagonal, np.diag(G), rtol=1e-12)
    A22_inverse = np.linalg.inv(A[np.ix_(pos, pos)])
    n = len(pos)
    assert np.allclose(_columns(op.a22_inverse_matvec, n), A22_inverse, atol=1e-9)
    # the preconditioner's bound: A22⁻¹_ii ≥ 1 / A22_ii
    assert np.all(op.diagonal_bound() >= np.diag(expected) - 1e-10)


def test_missing_counts_and_every_animal_in_the_core(population):
    ped, genotypes, _ = population
    with_missing = genotypes.astype(float)
    with_missing.iloc[4, 2] = np.nan
    with_missing.iloc[30, 17] = np.nan
    H = hd.single_step(ped, with_missing, apy=20, seed=1)
    op = hd.implicit_single_step(ped, with_missing, apy=20, seed=1)
    x = np.random.default_rng(1).normal(size=len(ped))
    assert np.allclose(op.matvec(x), H.matrix @ x, rtol=0, atol=1e-9)
    everyone = hd.implicit_single_step(ped, genotypes, apy=len(genotypes))
    assert np.allclose(everyone.matvec(x), hd.single_step(ped, genotypes).matrix @ x,
                       rtol=0, atol=1e-9)


def test_pcg_blup_equals_the_direct_solve(population):
    ped, genotypes, records = population
    H = hd.single_step(ped, genotypes, apy=15, seed=2)
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    variances = {"animal": 30.0, "residual": 70.0}
    formula = "y ~ sex + (1 | animal)"
    direct = hd.lmm(formula, records, relationships={"animal": H}, fixed_variances=variances)
    blup = hd.solve_blup(formula, records, {"animal": op}, variances, tol=1e-12)
    assert blup.relative_residual < 1e-12 and blup.iterations > 1
    expected = direct.ranef["animal"].iloc[:, 0].reindex(blup.ebv.index)
    assert np.max(np.abs(blup.ebv - expected)) < 1e-8 * np.abs(expected).max()
    assert np.allclose(blup.fixed_effects, direct.fixef, rtol=1e-8)
    assert list(blup.fixed_effects.index) == list(direct.fixef.index)
    # prior weights reach the equations
    weights = np.random.default_rng(4).uniform(0.5, 2.0, len(records))
    direct_w = hd.lmm(formula, records, weights=weights, relationships={"animal": H},
                      fixed_variances=variances)
    blup_w = hd.solve_blup(formula, records, {"animal": op}, variances, weights=weights,
                           tol=1e-12)
    expected_w = direct_w.ranef["animal"].iloc[:, 0].reindex(blup_w.ebv.index)
    assert np.max(np.abs(blup_w.ebv - expected_w)) < 1e-8 * np.abs(expected_w).max()


def test_approximate_pevs_are_exact_with_own_records_only(population):
    """Records on genotyped animals only and no fixed effect: the data's information
    is diagonal, and with ω = 1 the genotyped animals' approximate PEVs are exact."""
    ped, genotypes, _ = population
    rng = np.random.default_rng(6)
    records = pd.DataFrame({"animal": np.repeat(genotypes.index.to_numpy(), 2),
                            "y": rng.normal(size=2 * len(genotypes))})
    H = hd.single_step(ped, genotypes, apy=15, seed=2)
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    variances = {"animal": 30.0, "residual": 70.0}
    exact = hd.lmm("y ~ 0 + (1 | animal)", records, relationships={"animal": H},
                   fixed_variances=variances).breeding_values()
    approx = hd.solve_blup("y ~ 0 + (1 | animal)", records, {"animal": op}, variances,
                           tol=1e-12).breeding_values()
    genotyped = approx["genotyped"].to_numpy()
    assert genotyped.sum() == len(genotypes)
    exact = exact.reindex(approx.index)
    assert np.allclose(approx["pev"][genotyped], exact["pev"][genotyped], rtol=2e-3)
    assert np.allclose(approx["ebv"], exact["ebv"], rtol=1e-8, atol=1e-8)


def test_approximate_pevs_are_close_on_a_breeding_population():
    """Records on most animals, fixed effects, genotypes following the pedigree: PEVs
    within 3% and reliabilities within 0.02 on average (measured: 1.7% and 0.010 for
    the genotyped, 0.7% and 0.004 for the others; docs/genomics.md)."""
    frame, records, _ = animal_population(4000, n_generations=6, seed=8)
    ped = hd.Pedigree.from_dataframe(frame)
    rng = np.random.default_rng(9)
    genotyped = rng.choice(frame["animal"].to_numpy()[2000:], size=300, replace=False)
    # genotypes that follow the pedigree: parents' alleles passed down (unlinked SNPs)
    n_snps = 600
    frequency = rng.uniform(0.1, 0.9, n_snps)
    alleles = np.zeros((len(ped), 2, n_snps), dtype=np.int8)
    for i in range(len(ped)):
        for h, parent in enumerate((ped.sire[i], ped.dam[i])):
            if parent < 0:
                alleles[i, h] = rng.random(n_snps) < frequency
            else:
                pick = rng.integers(0, 2, n_snps)
                alleles[i, h] = alleles[parent, pick, np.arange(n_snps)]
    positions = ped.ids.get_indexer(pd.Index(genotyped).astype(str))
    genotypes = pd.DataFrame(alleles[positions].sum(axis=1), index=ped.ids[positions])
    H = hd.single_step(ped, genotypes, apy=100, seed=1)
    op = hd.implicit_single_step(ped, genotypes, apy=100, seed=1)
    variances = {"animal": 30.0, "residual": 70.0}
    exact = hd.lmm("y ~ sex + hys + (1 | animal)", records, relationships={"animal": H},
                   fixed_variances=variances).breeding_values()
    approx = hd.solve_blup("y ~ sex + hys + (1 | animal)", records, {"animal": op},
                           variances).breeding_values()
    exact = exact.reindex(approx.index)
    genotyped = approx["genotyped"].to_numpy()
    # the same definition as hd.lmm's on single-step's H⁻¹
    assert np.allclose(approx["reliability"], np.clip(1 - approx["pev"] / 30.0, 0, 1))
    for mask in (genotyped, ~genotyped):
        pev, exact_pev = approx["pev"][mask], exact["pev"][mask]
        assert np.abs(pev / exact_pev - 1).mean() < 0.03
        assert np.abs(approx["reliability"][mask] - exact["reliability"][mask]).mean() < 0.02
        assert np.corrcoef(pev, exact_pev)[0, 1] > 0.95
    assert np.corrcoef(approx["ebv"], exact["ebv"])[0, 1] > 1 - 1e-10


# ---------------------------------------------------------------- errors
def test_an_implicit_h_is_refused_by_lmm_with_the_way_out(population):
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    with pytest.raises(DataError, match="solve_blup"):
        hd.lmm("y ~ 1 + (1 | animal)", records, relationships={"animal": op})


def test_solve_blup_errors(population):
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    H = hd.single_step(ped, genotypes)
    good = {"animal": 30.0, "residual": 70.0}
    with pytest.raises(DataError, match="operator"):
        hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": H}, good)
    with pytest.raises(DataError, match="variances"):
        hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op}, {"animal": 30.0})
    with pytest.raises(DataError, match="positive"):
        hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op},
                      {"animal": 0.0, "residual": 70.0})
    with pytest.raises(DataError, match="did not converge"):
        hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op}, good,
                      max_iterations=2)
    with pytest.raises(FormulaError, match="one random term"):
        hd.solve_blup("y ~ 1 + (1 | animal) + (1 | hys)", records, {"animal": op}, good)
    stranger = records.assign(animal=records["animal"].astype(str))
    stranger.loc[stranger.index[0], "animal"] = "not-in-pedigree"
    with pytest.raises(DataError, match="not-in-pedigree"):
        hd.solve_blup("y ~ 1 + (1 | animal)", stranger, {"animal": op}, good)


def test_implicit_single_step_errors(population):
    ped, genotypes, _ = population
    with pytest.raises(DataError, match="APY core"):
        hd.implicit_single_step(ped, genotypes, apy=None)
    with pytest.raises(DataError, match="between 1"):
        hd.implicit_single_step(ped, genotypes, apy=0)
    # a non-core animal with the genotypes of a core animal: its conditional variance
    # given the core is 0 without a blend
    twin = genotypes.copy()
    twin.iloc[1] = twin.iloc[0]
    with pytest.raises(DataError, match="conditional variance"):
        hd.implicit_single_step(ped, twin, apy=[twin.index[0]], blend=0.0)
    with pytest.raises(TypeError, match="Pedigree"):
        hd.implicit_single_step("ped", genotypes, apy=5)


def test_progress_lines_on_stderr(population, capsys):
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2, progress=True)
    hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op},
                  {"animal": 30.0, "residual": 70.0}, progress=True)
    err = capsys.readouterr().err
    assert "implicit_single_step: G_core_rows" in err and "(" in err
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2, progress=False)
    assert capsys.readouterr().err == ""


def test_tol_max_iterations_and_progress_are_checked(population):
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    good = {"animal": 30.0, "residual": 70.0}
    for tol in (0, 0.0, -1e-8, 1.0, np.nan, "1e-8", None, True):
        with pytest.raises(DataError, match="tol"):
            hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op}, good, tol=tol)
    for bad in (0, -1, 2.5, None, True):
        with pytest.raises(DataError, match="max_iterations"):
            hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op}, good,
                          max_iterations=bad)
    with pytest.raises(DataError, match="progress"):
        hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": op}, good, progress="yes")
    with pytest.raises(DataError, match="seed"):
        hd.implicit_single_step(ped, genotypes, apy=15, seed="x")


def test_a_zero_response_and_a_constant_one(population):
    """y = 0: the solution is 0 with residual 0 (not NaN); a constant y still has PEVs
    (they do not depend on y)."""
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    good = {"animal": 30.0, "residual": 70.0}
    zero = hd.solve_blup("y ~ sex + (1 | animal)", records.assign(y=0.0), {"animal": op}, good)
    assert zero.relative_residual == 0.0 and np.all(zero.ebv == 0.0)
    constant = hd.solve_blup("y ~ sex + (1 | animal)", records.assign(y=5.0),
                             {"animal": op}, good)
    varying = hd.solve_blup("y ~ sex + (1 | animal)", records, {"animal": op}, good)
    assert np.allclose(constant.breeding_values()["pev"], varying.breeding_values()["pev"],
                       rtol=1e-10)
    assert constant.calibration["rounds"] >= 1


def test_missing_values_drop_and_the_data_as_it_was(population):
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    good = {"animal": 30.0, "residual": 70.0}
    with_nan = records.copy()
    with_nan.loc[with_nan.index[:5], "y"] = np.nan
    with pytest.raises(DataError):
        hd.solve_blup("y ~ sex + (1 | animal)", with_nan, {"animal": op}, good)
    dropped = hd.solve_blup("y ~ sex + (1 | animal)", with_nan, {"animal": op}, good,
                            missing="drop")
    clean = hd.solve_blup("y ~ sex + (1 | animal)", records.iloc[5:], {"animal": op}, good)
    assert np.allclose(dropped.ebv, clean.ebv, atol=1e-9)
    expected = clean.breeding_values()["pev"]
    # changing the caller's data after the solve does not change the PEVs
    column = with_nan.columns.get_loc("animal")
    with_nan.iloc[5:200, column] = with_nan["animal"].iloc[300]
    assert np.allclose(dropped.breeding_values()["pev"], expected, rtol=1e-10)
    frame = dropped.breeding_values()
    frame["ebv"] = 999.0
    assert not (dropped.breeding_values()["ebv"] == 999.0).any()


def test_an_unreachable_tol_is_an_error_not_an_answer(population):
    """Variances that make the equations too ill-conditioned for the recursion's
    residual to be the solution's: restarts, then a DataError, never a solution whose
    residual is above tol."""
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    try:
        blup = hd.solve_blup("y ~ sex + (1 | animal)", records, {"animal": op},
                             {"animal": 1e-300, "residual": 66.0})
    except DataError as exc:
        assert "converge" in str(exc)
    else:
        assert blup.relative_residual < 1e-10
    with pytest.raises(DataError, match="float64"):
        hd.solve_blup("y ~ sex + (1 | animal)", records, {"animal": op},
                      {"animal": 30.0, "residual": 70.0}, tol=1e-30)


def test_matvec_checks_and_aligns_its_input(population):
    ped, genotypes, _ = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    x = np.random.default_rng(3).normal(size=len(ped))
    with pytest.raises(DataError, match="rows"):
        op.matvec(x[:-1])
    shuffled = pd.Series(x, index=ped.ids)[::-1]
    assert np.allclose(op.matvec(shuffled), op.matvec(x))
    with pytest.raises(DataError, match="indexed"):
        op.matvec(pd.Series(x[:-1], index=ped.ids[:-1]))


def test_kernels_against_numpy():
    from henderson.apy import _relationship_sum, _weighted_row_squares
    from henderson.single_step import _add_row_products, a22, prune_to_ancestors
    rng = np.random.default_rng(5)
    P = np.asfortranarray(rng.normal(size=(7, 11)))
    w = rng.uniform(0.1, 2.0, 11)
    assert np.allclose(_weighted_row_squares(P, w), (P ** 2 * w).sum(axis=1))
    block = rng.integers(0, 3, size=(9, 13)).astype(np.int8)
    weights = rng.uniform(0, 2, 13)
    out = np.ones(9)
    _add_row_products(block, weights, out)
    assert np.allclose(out, 1.0 + block.astype(float) @ weights)
    frame, _, _ = animal_population(300, n_generations=4, seed=2)
    ped = hd.Pedigree.from_dataframe(frame)
    chosen = np.sort(rng.choice(np.arange(150, 300), size=40, replace=False))
    (sire, dam, d), genotyped = prune_to_ancestors(ped, chosen)
    assert _relationship_sum(sire, dam, d, genotyped) == pytest.approx(
        a22(sire, dam, d, genotyped).sum(), rel=1e-12)


def test_a_heritability_near_one_warns(population):
    ped, genotypes, records = population
    op = hd.implicit_single_step(ped, genotypes, apy=15, seed=2)
    with pytest.warns(hd.SingularFitWarning, match="nearly singular"):
        try:
            hd.solve_blup("y ~ sex + (1 | animal)", records, {"animal": op},
                          {"animal": 1e8, "residual": 1.0})
        except DataError:
            pass   # or no convergence: either way no silent answer
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", hd.SingularFitWarning)
        hd.solve_blup("y ~ sex + (1 | animal)", records, {"animal": op},
                      {"animal": 30.0, "residual": 70.0})
