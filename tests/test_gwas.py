"""GWAS scans (gwas.py): FaST-LMM's own scans of its test data, held out, and a dense
NumPy twin (V = σ²(h²K + (1 − h²)I) written out, GLS per variant, the variance ratio
found by a separate optimiser)."""
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.optimize
import scipy.stats

import henderson as hd
from henderson.errors import DataError, FormulaError
from henderson.plink import read_plink
from henderson.simulate import gwas_panel

DATA = Path(__file__).parent / "data" / "gwas"


# ----------------------------------------------------------------- FaST-LMM, held out
@pytest.fixture(scope="module")
def toydata():
    genotypes = read_plink(DATA / "toydata.5chrom")
    phe = pd.read_csv(DATA / "toydata.phe", sep=r"\s+", header=None, names=["fid", "iid", "y"])
    cov = pd.read_csv(DATA / "toydata.cov", sep=r"\s+", header=None, names=["fid", "iid", "c1"])
    # rows in another order than the .fam: matched by id
    data = phe.merge(cov[["iid", "c1"]], on="iid").sample(frac=1.0, random_state=3)
    return genotypes, data


@pytest.mark.parametrize("reference, formula, loco", [
    ("fastlmm_toydata.csv", "y ~ 1", False),
    ("fastlmm_toydata_covar.csv", "y ~ c1", False),
    ("fastlmm_toydata_loco.csv", "y ~ c1", True),
], ids=["intercept", "covariate", "loco"])
def test_wald_scan_matches_fastlmm_single_snp(toydata, reference, formula, loco):
    """FaST-LMM 0.6.13's single_snp on its own toydata (500 x 10,000, 5 chromosomes),
    K0 = the test SNPs (unit-standardised kernel), REML h²: the issue asks for
    |Δlog10 p| <= 1e-3; we hold the scan to 1e-5 and h² to 1e-5."""
    genotypes, data = toydata
    expected = pd.read_csv(DATA / reference)
    result = hd.gwas(formula, data, genotypes, id="iid", grm="standardized", blend=0.0,
                     loco=loco, progress=False)
    assert list(result["snp"]) == list(genotypes.variants["snp"])
    merged = result.merge(expected, left_on="snp", right_on="SNP", validate="1:1")
    difference = np.abs(np.log10(merged["pvalue"]) - np.log10(merged["PValue"]))
    assert difference.max() < 1e-5
    # SnpWeight is per standardised variant: beta x sd and se x sd
    assert np.allclose(np.abs(merged["beta"] / merged["se"]),
                       np.abs(merged["SnpWeight"] / merged["SnpWeightSE"]), rtol=1e-4, atol=1e-6)
    null = pd.DataFrame(result.attrs["null"])
    h2 = expected.groupby("Chr")["Nullh2"].first() if loco else expected["Nullh2"].iloc[:1]
    assert np.allclose(np.sort(null["h2"]), np.sort(h2.to_numpy()), atol=1e-5)
    assert len(null) == (5 if loco else 1)


# ----------------------------------------------------------------- the dense twin
def _dense_grm(counts: np.ndarray, blend: float) -> np.ndarray:
    """VanRaden 1 from a (samples x variants) array with NaN, mean-imputed."""
    mean = np.nanmean(counts, axis=0)
    keep = np.nanvar(counts, axis=0) > 0
    M = np.where(np.isnan(counts), 0.0, counts - mean)[:, keep]
    p = mean[keep] / 2
    return (1 - blend) * M @ M.T / (2 * np.sum(p * (1 - p))) + blend * np.eye(len(counts))


def _dense_minus2ll(h2, K, y, X, reml):
    n, p = X.shape
    H = h2 * K + (1 - h2) * np.eye(n)
    Hinv = np.linalg.inv(H)
    XtHX = X.T @ Hinv @ X
    beta = np.linalg.solve(XtHX, X.T @ Hinv @ y)
    r = y - X @ beta
    rss = r @ Hinv @ r
    dof = n - p if reml else n
    value = dof * (np.log(2 * np.pi * rss / dof) + 1) + np.linalg.slogdet(H)[1]
    return value + (np.linalg.slogdet(XtHX)[1] if reml else 0.0)


def _dense_h2(K, y, X, reml):
    grid = np.linspace(0, 1 - 1e-6, 41)
    values = [_dense_minus2ll(h, K, y, X, reml) for h in grid]
    best = int(np.argmin(values))
    bounds = (grid[max(best - 1, 0)], grid[min(best + 1, 40)])
    fit = scipy.optimize.minimize_scalar(_dense_minus2ll, bounds=bounds, method="bounded",
                                         args=(K, y, X, reml), options={"xatol": 1e-10})
    return fit.x, fit.fun


def _dense_scan(K, y, X, G, test, reml):
    """beta, se, stat, p per column of G (mean-imputed) by dense GLS."""
    n, p = X.shape
    h2, null_value = _dense_h2(K, y, X, reml)
    H = h2 * K + (1 - h2) * np.eye(n)
    Hinv = np.linalg.inv(H)
    rows = []
    for g in G.T[:12] if test == "lrt" else G.T:
        g = np.where(np.isnan(g), np.nanmean(g), g)
        if test == "lrt":
            Xg = np.column_stack([X, g])
            fit = scipy.optimize.minimize_scalar(_dense_minus2ll, bounds=(0, 1 - 1e-6),
                                                 method="bounded", args=(K, y, Xg, False),
                                                 options={"xatol": 1e-10})
            grid = np.linspace(0, 1 - 1e-6, 21)
            values = [_dense_minus2ll(h, K, y, Xg, False) for h in grid]
            h_alt = fit.x if fit.fun <= min(values) else grid[int(np.argmin(values))]
            Ha = np.linalg.inv(h_alt * K + (1 - h_alt) * np.eye(n))
            C = np.linalg.inv(Xg.T @ Ha @ Xg)
            b = C @ Xg.T @ Ha @ y
            r = y - Xg @ b
            se = np.sqrt(r @ Ha @ r / (n - p - 1) * C[-1, -1])
            stat = max(null_value - min(fit.fun, min(values)), 0.0)
            rows.append((b[-1], se, stat, scipy.stats.chi2.sf(stat, 1)))
            continue
        Xg = np.column_stack([X, g])
        C = np.linalg.inv(Xg.T @ Hinv @ Xg)
        b = C @ Xg.T @ Hinv @ y
        if test == "wald":
            r = y - Xg @ b
            sigma2 = r @ Hinv @ r / (n - p - 1)
            se = np.sqrt(sigma2 * C[-1, -1])
            stat = (b[-1] / se) ** 2
            rows.append((b[-1], se, stat, scipy.stats.f.sf(stat, 1, n - p - 1)))
        else:
            b0 = np.linalg.solve(X.T @ Hinv @ X, X.T @ Hinv @ y)
            r0 = y - X @ b0
            sigma2 = r0 @ Hinv @ r0 / ((n - p) if reml else n)
            P = Hinv - Hinv @ X @ np.linalg.solve(X.T @ Hinv @ X, X.T @ Hinv)
            stat = (g @ P @ y) ** 2 / (sigma2 * (g @ P @ g))
            rows.append((b[-1], np.sqrt(sigma2 / (g @ P @ g)), stat, scipy.stats.chi2.sf(stat, 1)))
    return h2, np.array(rows)


@pytest.fixture(scope="module")
def panel():
    return gwas_panel(120, 60, n_chromosomes=3, family_size=2, missing=0.02, seed=11)


@pytest.mark.parametrize("test, reml", [("wald", True), ("wald", False), ("score", True),
                                        ("score", False), ("lrt", False)])
def test_scan_equals_dense_gls(panel, test, reml):
    genotypes, pheno = panel
    counts = genotypes.read()
    K = _dense_grm(counts, 0.01)
    X = np.column_stack([np.ones(len(pheno)), pheno["age"], pheno["sex"]])
    h2, expected = _dense_scan(K, pheno["y"].to_numpy(), X, counts, test, reml)
    result = hd.gwas("y ~ age + sex", pheno, genotypes, test=test, reml=reml, progress=False)
    assert pd.DataFrame(result.attrs["null"])["h2"].iloc[0] == pytest.approx(h2, abs=1e-6)
    got = result[["beta", "se", "stat", "pvalue"]].to_numpy()[:len(expected)]
    assert np.allclose(got[:, :3], expected[:, :3], rtol=1e-5, atol=1e-8)
    assert np.allclose(np.log10(got[:, 3]), np.log10(expected[:, 3]), atol=1e-5)


def test_loco_uses_the_other_chromosomes_grm(panel):
    genotypes, pheno = panel
    counts = genotypes.read()
    chrom = genotypes.variants["chrom"].to_numpy()
    X = np.column_stack([np.ones(len(pheno)), pheno["age"], pheno["sex"]])
    result = hd.gwas("y ~ age + sex", pheno, genotypes, loco=True, progress=False)
    for c in np.unique(chrom):
        on = chrom == c
        _, expected = _dense_scan(_dense_grm(counts[:, ~on], 0.01), pheno["y"].to_numpy(), X,
                                  counts[:, on], "wald", True)
        assert np.allclose(result.loc[on, "pvalue"], expected[:, 3], rtol=1e-5)


def test_rows_in_any_order_and_ungenotyped_rows(panel):
    genotypes, pheno = panel
    base = hd.gwas("y ~ age + sex", pheno, genotypes, progress=False)
    extra = pd.DataFrame({"iid": ["nobody"], "age": [40.0], "sex": [1], "y": [0.0], "y2": [0.0]})
    shuffled = pd.concat([pheno.sample(frac=1.0, random_state=1), extra])
    with pytest.warns(UserWarning, match="1 row.*no genotypes.*'nobody'"):
        again = hd.gwas("y ~ age + sex", shuffled, genotypes, progress=False)
    pd.testing.assert_frame_equal(base, again, rtol=1e-6)


def test_several_phenotypes_equal_separate_scans(panel):
    genotypes, pheno = panel
    both = hd.gwas("cbind(y, y2) ~ age", pheno, genotypes, test="score", progress=False)
    for name in ("y", "y2"):
        alone = hd.gwas(f"{name} ~ age", pheno, genotypes, test="score", progress=False)
        part = both[both["phenotype"] == name].drop(columns="phenotype").reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone, rtol=1e-9)
    null = pd.DataFrame(both.attrs["null"])
    assert null["n"].tolist() == [120, int(pheno["y2"].notna().sum())]


def test_results_streamed_to_files(panel, tmp_path):
    genotypes, pheno = panel
    for name in ("scan.csv", "scan.tsv", "scan.parquet"):
        result = hd.gwas("y ~ age", pheno, genotypes, out=tmp_path / name, block=25,
                         progress=False)
        if name.endswith("parquet"):
            written = pd.read_parquet(tmp_path / name)
        else:
            written = pd.read_csv(tmp_path / name, sep="\t" if name.endswith("tsv") else ",",
                                  dtype={"chrom": str, "pos": "Int64"})
        assert len(written) == len(result) == genotypes.n_variants
        assert np.allclose(written["pvalue"], result["pvalue"], rtol=1e-8)


def test_single_precision_rotation_is_close(panel):
    genotypes, pheno = panel
    double = hd.gwas("y ~ age", pheno, genotypes, progress=False)
    single = hd.gwas("y ~ age", pheno, genotypes, precision="single", progress=False)
    assert np.abs(np.log10(double["pvalue"]) - np.log10(single["pvalue"])).max() < 1e-3


def test_sparse_grm_scan_equals_the_dense_route(panel):
    """The same K (thresholded) through the sparse Cholesky route and the eigen route."""
    genotypes, pheno = panel
    sparse_K = hd.grm(genotypes, cutoff=0.1)
    assert sparse_K.matrix.nnz < 0.5 * genotypes.n_samples ** 2
    dense_K = hd.RelationshipMatrix(sparse_K.matrix.toarray(), sparse_K.labels)
    for test in ("wald", "score"):
        a = hd.gwas("y ~ age", pheno, genotypes, grm=sparse_K, test=test, progress=False)
        b = hd.gwas("y ~ age", pheno, genotypes, grm=dense_K, test=test, progress=False)
        h2_sparse, h2_dense = (pd.DataFrame(r.attrs["null"])["h2"].iloc[0] for r in (a, b))
        assert h2_sparse == pytest.approx(h2_dense, abs=1e-6)
        assert np.allclose(a[["beta", "se", "stat"]], b[["beta", "se", "stat"]], rtol=1e-5)


def test_sparse_grm_keeps_entries_above_the_cutoff(panel):
    genotypes, _ = panel
    dense = hd.grm(genotypes, blend=0.01).matrix
    sparse = hd.grm(genotypes, blend=0.01, cutoff=0.05).matrix.toarray()
    expected = np.where(dense > 0.05, dense, 0.0)
    np.fill_diagonal(expected, np.diag(dense))
    assert np.allclose(sparse, expected, atol=1e-6)
    # siblings (families of 2) are kept, unrelated pairs are not
    assert np.allclose(np.diag(sparse, 1)[::2], np.diag(dense, 1)[::2], atol=1e-6)


def test_grm_of_a_plink_set_equals_the_table_route(panel):
    genotypes, _ = panel
    counts = genotypes.read()
    assert np.allclose(hd.grm(genotypes).matrix, _dense_grm(counts, 0.01), atol=1e-6)
    complete = genotypes.read()[:, ~np.isnan(counts).any(axis=0)]
    table = pd.DataFrame(complete, index=genotypes.samples["iid"])
    from_table = hd.grm(table).matrix
    from_blocks = hd.grm(hd.Genotypes.from_frame(table)).matrix
    assert np.allclose(from_table, from_blocks, atol=1e-12)  # exact: integer float32 sums


# ----------------------------------------------------------------- refusals
def test_bad_inputs_are_refused(panel):
    genotypes, pheno = panel
    with pytest.raises(DataError, match="id column 'person'"):
        hd.gwas("y ~ age", pheno, genotypes, id="person")
    with pytest.raises(ValueError, match="lrt.*reml=False"):
        hd.gwas("y ~ age", pheno, genotypes, test="lrt")
    with pytest.raises(ValueError, match="test must be one of"):
        hd.gwas("y ~ age", pheno, genotypes, test="t")
    with pytest.raises(FormulaError, match="covariates only"):
        hd.gwas("y ~ age + (1 | iid)", pheno, genotypes)
    with pytest.raises(DataError, match="repeats 'p1'"):
        hd.gwas("y ~ age", pd.concat([pheno, pheno.iloc[:1]]), genotypes)
    with pytest.raises(DataError, match="'height'"):
        hd.gwas("height ~ age", pheno, genotypes)
    small = hd.grm(genotypes.read()[:50, :][:, ~np.isnan(genotypes.read()[:50]).any(axis=0)])
    with pytest.raises(DataError, match="lacks 120 analysed sample"):
        hd.gwas("y ~ age", pheno, genotypes, grm=small)
    with pytest.raises(ValueError, match="loco=True builds"):
        hd.gwas("y ~ age", pheno, genotypes, grm=hd.grm(genotypes), loco=True)
    with pytest.raises(DataError, match="none of the"):
        hd.gwas("y ~ age", pheno.assign(iid="x" + pheno["iid"]), genotypes)


def test_command_line_scan_equals_the_python_api(tmp_path, capsys):
    from henderson.cli import main

    phe = pd.read_csv(DATA / "toydata.phe", sep=r"\s+", header=None, names=["fid", "iid", "y"])
    phe.to_csv(tmp_path / "pheno.csv", index=False)
    code = main(["gwas", "y ~ 1", str(tmp_path / "pheno.csv"), "--bfile",
                 str(DATA / "toydata.5chrom"), "--out", str(tmp_path / "scan.tsv"),
                 "--grm", "standardized", "--blend", "0", "--top", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "null_576" in printed and "10,000 rows written" in printed
    written = pd.read_csv(tmp_path / "scan.tsv", sep="\t")
    expected = pd.read_csv(DATA / "fastlmm_toydata.csv")
    assert np.abs(np.log10(written["pvalue"]) - np.log10(expected["PValue"])).max() < 1e-5
    assert main(["gwas", "y ~ 1", str(tmp_path / "pheno.csv"), "--bfile",
                 str(tmp_path / "absent"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------- the kernels
def test_tridiagonal_route_equals_the_dense_forms():
    """dsytrd's reflectors applied by _apply_reflectors, and the tridiagonal LDL' forms,
    against log|H| and [y X]' H⁻¹ [y X] written out."""
    import scipy.linalg.lapack as lapack

    from henderson.gwas import _apply_reflectors, _profile_from_forms, _tridiagonal_forms

    rng = np.random.default_rng(2)
    n = 40
    A = rng.normal(size=(n, 60))
    K = A @ A.T / 60
    R = rng.normal(size=(n, 3))
    reflectors, d, e, tau, info = lapack.dsytrd(K, lower=1)
    assert info == 0
    rotated = _apply_reflectors(np.asfortranarray(reflectors), tau, R)
    for h2 in (0.0, 0.3, 0.97):
        H = h2 * K + (1 - h2) * np.eye(n)
        logdet, forms = _tridiagonal_forms(h2, d, e, rotated)
        assert logdet == pytest.approx(np.linalg.slogdet(H)[1], abs=1e-9)
        assert np.allclose(forms, R.T @ np.linalg.solve(H, R), atol=1e-9)
        value = _profile_from_forms(logdet, forms, n, True)
        y, X = R[:, 0], R[:, 1:]
        assert value == pytest.approx(_dense_minus2ll(h2, K, y, X, True), abs=1e-8)
    # an indefinite H is refused, not mis-factored
    assert np.isinf(_tridiagonal_forms(2.0, d - 10, e, rotated)[0])


def test_tridiagonal_reduction_is_scipys_dsytrd():
    """The GIL-free dsytrd (ctypes into SciPy's LAPACK) returns what SciPy's wrapper
    does, bit for bit, alone and two at a time on two threads."""
    import scipy.linalg.lapack as lapack

    from henderson.gwas import reduce_side_by_side
    from henderson.linalg import _lapack_routine, tridiagonal_reduction
    from henderson.threads import blas_threads

    assert _lapack_routine("dsytrd") is not None  # the route that releases the GIL
    rng = np.random.default_rng(5)
    matrices = []
    for n in (2, 7, 150, 401):
        A = rng.normal(size=(n, n + 3))
        K = A @ A.T / n
        matrices.append(K)
        lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
        reflectors, d, e, tau, info = lapack.dsytrd(K, lower=1, lwork=max(lwork, 1))
        ours = tridiagonal_reduction(K)
        assert info == 0 and ours[0].flags.f_contiguous
        assert np.array_equal(np.tril(ours[0], -1), np.tril(reflectors, -1))
        for a, b in zip(ours[1:], (d, e, tau)):
            assert np.array_equal(a, b)
        assert np.array_equal(K, K.T)  # the input is left alone
    with blas_threads(1):  # as reduce_side_by_side runs each (threads change the bits)
        one_at_a_time = [tridiagonal_reduction(K) for K in matrices[2:]]
    side_by_side = reduce_side_by_side(matrices[2:])
    for a, b in zip(one_at_a_time, side_by_side):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_loco_reductions_side_by_side_change_nothing(panel, monkeypatch):
    """LOCO's K₋c reduced a few at a time gives the scan of one at a time, bit for bit."""
    import importlib

    gwas_module = importlib.import_module("henderson.gwas")  # hd.gwas is the function
    genotypes, pheno = panel
    scans = {}
    for batch in (1, 2):  # 2: a batch of two and a remainder of one
        monkeypatch.setattr(gwas_module, "side_by_side_reductions",
                            lambda order, count, batch=batch: min(batch, count))
        scans[batch] = hd.gwas("y ~ age + sex", pheno, genotypes, loco=True,
                               progress=False)
    assert genotypes.variants["chrom"].nunique() == 3
    pd.testing.assert_frame_equal(scans[1], scans[2], check_exact=True)
    assert scans[1].attrs["null"] == scans[2].attrs["null"]


def test_side_by_side_reductions_are_capped_by_threads_and_memory(monkeypatch):
    import importlib

    from henderson.threads import fit_threads

    gwas_module = importlib.import_module("henderson.gwas")
    monkeypatch.setattr(gwas_module, "available_memory", lambda: 1e12)
    with fit_threads(2):
        assert gwas_module.side_by_side_reductions(5_000, 22) == 2
        assert gwas_module.side_by_side_reductions(5_000, 1) == 1
    with fit_threads(1):
        assert gwas_module.side_by_side_reductions(5_000, 22) == 1
    # three n² doubles each within half the free memory: 20,000² needs 9.6 GB each
    monkeypatch.setattr(gwas_module, "available_memory", lambda: 25e9)
    with fit_threads(2):
        assert gwas_module.side_by_side_reductions(20_000, 22) == 1
        assert gwas_module.side_by_side_reductions(5_000, 22) == 2


def _gls_at(h2, K, y, X, G, test, reml):
    """Dense GLS statistics per column of G (mean-imputed) at a given h² (a NumPy twin
    of the scan, without the variance-ratio search)."""
    n, p = X.shape
    Hinv = np.linalg.inv(h2 * K + (1 - h2) * np.eye(n))
    P = Hinv - Hinv @ X @ np.linalg.solve(X.T @ Hinv @ X, X.T @ Hinv)
    G = np.where(np.isnan(G), np.nanmean(G, axis=0), G)
    gPg, gPy, yPy = np.einsum("ij,ij->j", G, P @ G), G.T @ P @ y, y @ P @ y
    beta = gPy / gPg
    if test == "score":
        sigma2 = yPy / ((n - p) if reml else n)
        return beta, np.sqrt(sigma2 / gPg), gPy ** 2 / (sigma2 * gPg)
    se = np.sqrt((yPy - gPy ** 2 / gPg) / (n - p - 1) / gPg)
    return beta, se, (beta / se) ** 2


@pytest.mark.parametrize("formula, test, reml", [
    ("y ~ age + sex", "score", True), ("y ~ age", "wald", False),
    ("y ~ 0 + age + sex", "score", True)], ids=["score-reml", "wald-ml", "no-intercept"])
def test_sparse_grm_scan_equals_dense_gls(panel, formula, test, reml):
    """The fused kernel (packed .bed bytes decoded, L⁻¹P applied, products summed) on a
    subset of the people in another order, with missing genotypes, against dense GLS
    with the same thresholded K: at the package's h² to 1e-9, and its h² against a
    separate optimiser's."""
    genotypes, pheno = panel
    K = hd.grm(genotypes, cutoff=0.1)
    data = pheno.sample(frac=0.85, random_state=5)
    result = hd.gwas(formula, data, genotypes, grm=K, test=test, reml=reml, progress=False)
    h2 = pd.DataFrame(result.attrs["null"])["h2"].iloc[0]
    rows = pd.Index(genotypes.samples["iid"]).get_indexer(data["iid"])
    dense_K = K.matrix.toarray()[np.ix_(rows, rows)]
    X = data[["age", "sex"]].to_numpy(dtype=float) if "sex" in formula else data[["age"]].to_numpy()
    if "0 +" not in formula:
        X = np.column_stack([np.ones(len(data)), X])
    y, G = data["y"].to_numpy(), genotypes.read()[rows]
    # a thresholded K may be indefinite: only the h² where H is positive definite count
    smallest = np.linalg.eigvalsh(dense_K)[0]
    upper = min(1 - 1e-6, 1 / (1 - smallest) - 1e-9) if smallest < 0 else 1 - 1e-6
    grid = np.linspace(0, upper, 81)
    best = int(np.argmin([_dense_minus2ll(h, dense_K, y, X, reml) for h in grid]))
    separate = scipy.optimize.minimize_scalar(
        _dense_minus2ll, bounds=(grid[max(best - 1, 0)], grid[min(best + 1, 80)]),
        method="bounded", args=(dense_K, y, X, reml), options={"xatol": 1e-10}).x
    assert h2 == pytest.approx(separate, abs=1e-6)
    beta, se, stat = _gls_at(h2, dense_K, y, X, G, test, reml)
    np.testing.assert_allclose(result["beta"], beta, rtol=1e-9)
    np.testing.assert_allclose(result["se"], se, rtol=1e-9)
    np.testing.assert_allclose(result["stat"], stat, rtol=1e-9)
    np.testing.assert_allclose(result["af"], np.nanmean(G, axis=0) / 2, rtol=1e-12)


def test_sparse_scan_kernel_equals_its_numpy_twin():
    """``_sparse_whitened_products`` on random packed bytes, a random sparse lower
    factor and samples in any order, against decoding, imputing and a dense
    triangular solve in NumPy."""
    import scipy.linalg
    import scipy.sparse as sp

    from henderson.gwas import _sparse_whitened_products
    from henderson.plink import encode_bed_block

    rng = np.random.default_rng(31)
    n_all, n, k, p = 23, 17, 9, 3
    counts = rng.integers(0, 3, size=(n_all, k)).astype(float)
    counts[rng.random(counts.shape) < 0.15] = np.nan
    counts[:, 4] = np.nan  # nothing observed: mean 0
    packed = np.frombuffer(encode_bed_block(counts), dtype=np.uint8).reshape(k, -1)
    samples = rng.permutation(n_all)[:n]
    lower = sp.tril(sp.random(n, n, density=0.2, random_state=4), k=-1) + sp.diags(
        rng.uniform(0.5, 2.0, n))
    lower = sp.csc_matrix(lower)
    lower.sort_indices()
    Xw, yw = rng.normal(size=(n, p)), rng.normal(size=n)
    for centre in (True, False):
        gg, Xg, yg, freq = _sparse_whitened_products(
            packed, samples.astype(np.int64), centre, lower.indptr.astype(np.int64),
            lower.indices.astype(np.int64), lower.data, Xw, yw)
        x = counts[samples]
        mean = np.where(np.isnan(x).all(axis=0), 0.0, np.nanmean(np.where(
            np.isnan(x).all(axis=0), 0.0, x), axis=0))
        x = np.where(np.isnan(x), mean, x) - (mean if centre else 0.0)
        g = scipy.linalg.solve_triangular(lower.toarray(), x, lower=True)
        np.testing.assert_allclose(gg, np.sum(g * g, axis=0), rtol=1e-12)
        np.testing.assert_allclose(Xg, Xw.T @ g, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(yg, yw @ g, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(freq, mean / 2, rtol=1e-12)
