"""Chunked (out-of-core) and Dask fits: the same cross-products and fit as in memory."""
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import CASES, DATA, assert_sigma_and_fixed_effects, load_case

import henderson as hd
from henderson.design import build_design
from henderson.errors import DataError, FormulaError, RankDeficiencyWarning
from henderson.mme import CrossProducts
from henderson.streaming import chunked_design

MODELS = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", {}),
    ("sleepstudy", "Reaction ~ Days + (Days || Subject)", {"reml": False}),
    ("insteval", "y ~ service * dept + (1 | s) + (1 | d)", {}),
    ("pastes", "strength ~ 1 + (1 | batch/cask)", {}),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", {}),
    ("sleepstudy_weighted", "Reaction ~ Days + (Days | Subject)", {"weights": "w"}),
]


def assert_same_crossproducts(a: CrossProducts, b: CrossProducts, rtol=1e-12):
    scale = max(abs(a.yy), 1.0)
    for x, y in zip(a.diagonal + a.zy, b.diagonal + b.zy):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)
    for (pa, ba), (pb, bb) in zip(a.zx, b.zx):
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_allclose(ba, bb, rtol=rtol, atol=rtol * scale)
    assert a.crossed.keys() == b.crossed.keys()
    for key in a.crossed:
        np.testing.assert_array_equal(a.crossed[key][0], b.crossed[key][0])
        np.testing.assert_allclose(a.crossed[key][1], b.crossed[key][1], rtol=rtol)
    xx_a = a.xx.toarray() if sp.issparse(a.xx) else a.xx
    xx_b = b.xx.toarray() if sp.issparse(b.xx) else b.xx
    np.testing.assert_allclose(xx_a, xx_b, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(a.xy, b.xy, rtol=rtol, atol=rtol * scale)
    assert a.yy == pytest.approx(b.yy, rel=rtol)
    assert a.n_obs == b.n_obs
    np.testing.assert_array_equal(a.x_nonzeros, b.x_nonzeros)
    assert a.sum_log_weights == pytest.approx(b.sum_log_weights, rel=rtol, abs=1e-12)


def shifted_alike(memory, crossproducts: CrossProducts) -> CrossProducts:
    """The in-memory fit's cross-products of y − Xβ₀ with the chunked fit's β₀ (from its
    first chunk; the in-memory fit takes its own from all rows)."""
    return CrossProducts.from_design(memory.design, crossproducts.shift)


@pytest.mark.parametrize("name,formula,options", MODELS, ids=[m[0] + ":" + m[1] for m in MODELS])
def test_chunked_fit_equals_in_memory_fit(name, formula, options):
    data = hd.datasets.load(name)
    chunk_rows = max(len(data) // 7, 5)  # uneven chunks; some levels absent from some
    memory = hd.lmm(formula, data, **options)
    streamed = hd.lmm(formula, hd.chunked(data, chunk_rows=chunk_rows), **options)
    assert streamed.nobs == memory.nobs
    assert streamed.design.fixed_names == memory.design.fixed_names
    assert abs(streamed.objective - memory.objective) <= 1e-10 * abs(memory.objective)
    np.testing.assert_allclose(streamed.fixef, memory.fixef, rtol=1e-5, atol=1e-8)
    for group, table in memory.ranef.items():
        pd.testing.assert_index_equal(streamed.ranef[group].index, table.index)
    # at the same θ everything the MME give is the same to rounding
    at_memory_theta = streamed.objective_function.evaluate(memory.theta)
    assert at_memory_theta.objective == pytest.approx(memory.objective, rel=1e-12)
    assert_same_crossproducts(streamed.mme.xp, shifted_alike(memory, streamed.mme.xp))


def test_cross_products_add_over_row_blocks():
    data = hd.datasets.load("penicillin")
    formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    first, second = data.iloc[::2], data.iloc[1::2]
    # the halves see different (plate, sample) pairs: the sum must merge them
    encoded_first = chunked_design(formula, hd.chunked([first, second]))[1]
    whole = CrossProducts.from_design(build_design(formula, data), encoded_first.shift)
    assert_same_crossproducts(encoded_first, whole)


def test_parquet_and_csv_files_stream_to_the_in_memory_fit(tmp_path):
    data = hd.datasets.load("insteval").iloc[:20_000]
    formula = "y ~ service + (1 | s) + (1 | d)"
    memory = hd.lmm(formula, data)
    parquet = tmp_path / "ie.parquet"
    data.to_parquet(parquet, row_group_size=3_000)
    csv = tmp_path / "ie.csv"
    data.to_csv(csv, index=False)
    from_parquet = hd.lmm(formula, str(parquet))  # a path streams the file
    from_csv = hd.lmm(formula, hd.chunked(csv, chunk_rows=4_000))
    for model in (from_parquet, from_csv):
        assert model.objective == pytest.approx(memory.objective, rel=1e-10)
        assert model.nobs == len(data)
    # CSV reads the codes as integers; the levels are the same labels
    assert list(from_csv.ranef["d"].index.astype(str)) == list(memory.ranef["d"].index)


def test_missing_rows_dropped_or_named_per_chunk():
    data = hd.datasets.load("sleepstudy").copy()
    data.loc[[5, 100, 150], "Reaction"] = np.nan
    formula = "Reaction ~ Days + (Days | Subject)"
    memory = hd.lmm(formula, data, missing="drop")
    streamed = hd.lmm(formula, hd.chunked(data, chunk_rows=40), missing="drop")
    assert streamed.nobs == 177
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-10)
    with pytest.raises(DataError, match=r"1 row\(s\).*'Reaction'.*first at row 5 of chunk 0"):
        hd.lmm(formula, hd.chunked(data, chunk_rows=40))


def test_aliased_fixed_column_dropped_as_in_memory():
    data = hd.datasets.load("sleepstudy").assign(
        Weeks=lambda d: d.Days / 7.0, Phase=lambda d: np.where(d.Days < 5, "a", "b"))
    formula = "Reaction ~ Days + Weeks + Phase + (1 | Subject)"
    with pytest.warns(RankDeficiencyWarning, match="Weeks"):
        memory = hd.lmm(formula, data)
    with pytest.warns(RankDeficiencyWarning, match="Weeks"):
        streamed = hd.lmm(formula, hd.chunked(data, chunk_rows=25))
    assert streamed.design.fixed_names == memory.design.fixed_names == [
        "(Intercept)", "Days", "Phaseb"]
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-10)


def test_categories_unseen_in_the_first_chunk_encode_as_in_memory():
    data = hd.datasets.load("insteval").iloc[:6000].sort_values("dept")
    formula = "y ~ dept + (1 | s)"
    memory = hd.lmm(formula, data)
    streamed = hd.lmm(formula, hd.chunked(data, chunk_rows=500))
    assert streamed.design.fixed_names == memory.design.fixed_names
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-10)


def test_chunked_animal_model_equals_in_memory():
    frame = pd.read_csv(DATA / "animal" / "animal_visible_pedigree.csv", dtype=str,
                        keep_default_na=False)
    ped = hd.Pedigree.from_dataframe(frame)
    data = pd.read_csv(DATA / "animal" / "animal_visible_data.csv")
    formula = "y ~ sex + hy + (1 | animal)"
    memory = hd.lmm(formula, data, relationships={"animal": ped}, optimizer="bobyqa")
    streamed = hd.lmm(formula, hd.chunked(data, chunk_rows=97), relationships={"animal": ped})
    # AI-REML works in the space of the equations: chunks, which have no rows, take it
    assert streamed.optimizer_result.method == "ai-reml"
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-10)
    in_memory_ai = hd.lmm(formula, data, relationships={"animal": ped}, optimizer="ai")
    np.testing.assert_allclose(streamed.variance_components.to_numpy(),
                               in_memory_ai.variance_components.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(streamed.breeding_values()["pev"],
                               memory.breeding_values()["pev"], rtol=1e-5)


def test_chunked_fit_has_no_rows_and_says_so():
    data = hd.datasets.load("sleepstudy")
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.chunked(data, chunk_rows=60))
    for attribute in ("fitted", "residuals", "Z", "R"):
        with pytest.raises(DataError, match="chunked or Dask fit does not keep"):
            getattr(model, attribute)
    np.testing.assert_allclose(model.predict(data), hd.lmm(
        "Reaction ~ Days + (Days | Subject)", data).fitted, rtol=1e-6)


@pytest.mark.parametrize("case,error,message", [
    ("missing column", FormulaError, "'nope' not found"),
    ("one level", DataError, "single level"),
    ("missing file", DataError, "not found"),
    ("all rows missing", DataError, "no rows left"),
    ("stateful transform", FormulaError, "stateful transforms"),
])
def test_chunked_bad_input(case, error, message, tmp_path):
    data = hd.datasets.load("sleepstudy")
    formula, source, options = "Reaction ~ Days + (1 | Subject)", None, {}
    if case == "missing column":
        formula, source = "Reaction ~ nope + (1 | Subject)", hd.chunked(data)
    elif case == "one level":
        source = hd.chunked(data.assign(Subject="s1"), chunk_rows=50)
    elif case == "stateful transform":
        formula, source = "Reaction ~ center(Days) + (1 | Subject)", hd.chunked(data, 50)
    elif case == "missing file":
        source = str(tmp_path / "absent.parquet")
    else:
        source = hd.chunked(data.assign(Reaction=np.nan), chunk_rows=50)
        options = {"missing": "drop"}
    with pytest.raises(error, match=message):
        hd.lmm(formula, source, **options)


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                                           processes=True, dashboard_address=None)
        client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.parametrize("name,formula,options", [MODELS[0], MODELS[2], MODELS[3], MODELS[5]],
                         ids=["sleepstudy", "insteval", "pastes", "weighted"])
def test_dask_fit_on_local_cluster_equals_in_memory_fit(dask_client, name, formula, options):
    dd = pytest.importorskip("dask.dataframe")
    data = hd.datasets.load(name)
    memory = hd.lmm(formula, data, **options)
    from distributed import get_task_stream

    frame = dd.from_pandas(data, npartitions=5)
    with get_task_stream(dask_client) as stream:
        distributed = hd.lmm(formula, frame, **options)
    assert abs(distributed.objective - memory.objective) <= 1e-10 * abs(memory.objective)
    assert_same_crossproducts(distributed.mme.xp, shifted_alike(memory, distributed.mme.xp))
    # both passes ran on the cluster: one task per partition each, then the reductions
    names = [task["key"].split("-")[0] if isinstance(task["key"], str) else
             str(task["key"][0]).split("-")[0] for task in stream.data]
    assert names.count("scan") == 5 and names.count("products") == 5
    assert names.count("_combine_all") >= 2


def test_chunked_sparse_fixed_effects_are_ordered_as_in_memory():
    """The density of each fixed column decides whether it enters the fill-reducing
    ordering; a chunked design has no X to count it in (it used to read 0 for every
    column, the intercept included), so it comes with the cross-products. AMD is named:
    "auto" picks among orderings by timing their factorisations, which need not choose
    the same one twice."""
    frame = pd.read_csv(DATA / "animal" / "animal_visible_pedigree.csv", dtype=str,
                        keep_default_na=False)
    ped = hd.Pedigree.from_dataframe(frame)
    data = pd.read_csv(DATA / "animal" / "animal_visible_data.csv")
    options = {"relationships": {"animal": ped}, "sparse_fixed": True,
               "fixed_variances": {"animal": 30.0, "residual": 70.0}, "ordering": "amd"}
    memory = hd.lmm("y ~ sex + hy + (1 | animal)", data, **options)
    streamed = hd.lmm("y ~ sex + hy + (1 | animal)", hd.chunked(data, chunk_rows=150),
                      **options)
    assert not memory.mme.dense_fixed
    np.testing.assert_array_equal(streamed.mme.perm, memory.mme.perm)
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-10)
    assert_same_crossproducts(streamed.mme.xp, shifted_alike(memory, streamed.mme.xp))


@pytest.mark.parametrize("name", CASES)
def test_chunked_fit_reproduces_lme4_reference(name):
    """Every lme4 reference case fitted from chunks (sevenths of the rows) against the
    numbers lme4 printed, with the tolerances of test_reference."""
    case = load_case(name)
    data = hd.datasets.load(case["data"])
    m = hd.lmm(case["formula"], hd.chunked(data, chunk_rows=max(len(data) // 7, 2)),
               reml=case["REML"], weights=case["weights"])
    assert abs(m.objective - case["objective"]) < 2e-7 * abs(case["objective"])
    ref_theta = np.array(case["theta"])
    assert np.all(np.abs(m.theta - ref_theta) < 5e-3 * np.maximum(1, np.abs(ref_theta)))
    assert_sigma_and_fixed_effects(m, case)


@pytest.mark.parametrize("with_pedigree", [False, True])
def test_late_chunk_with_missing_group_reads_as_the_same_levels(tmp_path, with_pedigree):
    """A CSV chunk whose grouping column has a NaN is read by pandas as floats (12.0),
    while earlier chunks read integers (12): with missing="drop" the fit failed with a
    message about a relationship matrix the model did not have. Grouping columns are
    now read as text, and levels match as R labels them."""
    rng = np.random.default_rng(4)
    n = 400
    frame = pd.DataFrame({"g": rng.integers(1, 41, n).astype(float), "x": rng.normal(size=n)})
    frame["y"] = frame.x + rng.normal(size=41)[frame.g.astype(int)] + rng.normal(size=n)
    frame.loc[350, "g"] = np.nan
    frame.to_csv(tmp_path / "d.csv", index=False)
    options = {}
    if with_pedigree:
        ids = [str(i) for i in range(1, 41)]
        options["relationships"] = {"g": hd.Pedigree.from_dataframe(pd.DataFrame(
            {"animal": ids, "sire": "0", "dam": "0"}))}
    memory = hd.lmm("y ~ x + (1 | g)", frame, missing="drop", **options)
    chunked = hd.lmm("y ~ x + (1 | g)", hd.chunked(tmp_path / "d.csv", chunk_rows=100),
                     missing="drop", **options)
    assert chunked.nobs == memory.nobs == n - 1
    assert chunked.objective == pytest.approx(memory.objective, rel=1e-10)
    assert list(chunked.ranef["g"].index) == list(memory.ranef["g"].index)
