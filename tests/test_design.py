import zlib

import numpy as np
import pandas as pd
import scipy.sparse as sp
import pytest

import henderson as hd
from henderson import DataError, FormulaError, RankDeficiencyWarning, build_design


def test_sleepstudy_design_shapes_and_Z_structure(sleepstudy):
    d = build_design("Reaction ~ Days + (Days | Subject)", sleepstudy)
    assert d.X.shape == (180, 2) and d.fixed_names == ["(Intercept)", "Days"]
    Z = d.Z.toarray()
    assert Z.shape == (180, 36)
    # row i has 1 and Days_i in the two columns of its subject
    codes = d.terms[0].level_codes
    rows = np.arange(180)
    assert np.all(Z[rows, 2 * codes] == 1.0)
    assert np.allclose(Z[rows, 2 * codes + 1], sleepstudy["Days"])
    assert np.count_nonzero(Z) == 180 + np.count_nonzero(sleepstudy["Days"])


def test_terms_sorted_by_decreasing_levels():
    d = build_design("diameter ~ 1 + (1|sample) + (1|plate)", hd.datasets.load("penicillin"))
    assert [t.group for t in d.terms] == ["plate", "sample"]


def test_categorical_reference_level_and_names():
    d = build_design("height ~ moisture + (1|pot)", hd.datasets.load("plants"))
    assert d.fixed_names == ["(Intercept)", "moisture2"]
    df = hd.datasets.load("plants")
    df["moisture"] = df["moisture"].cat.reorder_categories(["2", "1"])
    assert build_design("height ~ moisture + (1|pot)", df).fixed_names == [
        "(Intercept)", "moisture1"]


def test_interaction_grouping_levels_first_factor_slowest():
    d = build_design("strength ~ 1 + (1|batch/cask)", hd.datasets.load("pastes"))
    cask = [t for t in d.terms if t.group == "cask:batch"][0]
    assert list(cask.levels[:3]) == ["a:A", "a:B", "a:C"]
    assert cask.n_levels == 30


def test_unknown_column_is_named(sleepstudy):
    with pytest.raises(FormulaError, match="'Dayz'"):
        build_design("Reaction ~ Dayz + (1 | Subject)", sleepstudy)
    with pytest.raises(FormulaError, match="'Subj'"):
        build_design("Reaction ~ Days + (1 | Subj)", sleepstudy)
    with pytest.raises(FormulaError, match="weights column 'ww'"):
        build_design("Reaction ~ Days + (1 | Subject)", sleepstudy, weights="ww")


def test_missing_values_raise_or_drop(sleepstudy):
    df = sleepstudy.copy()
    df["Days"] = df["Days"].astype(float)
    df.loc[5, "Reaction"] = np.nan
    df.loc[7, "Days"] = np.inf
    with pytest.raises(DataError, match="'Reaction', 'Days'"):
        build_design("Reaction ~ Days + (1 | Subject)", df)
    d = build_design("Reaction ~ Days + (1 | Subject)", df, missing="drop")
    assert d.n_obs == 178 and 5 not in d.row_index and 7 not in d.row_index


def test_single_level_factor_is_an_error(sleepstudy):
    df = sleepstudy.copy()
    df["one"] = "a"
    with pytest.raises(DataError, match="'one' has a single level"):
        build_design("Reaction ~ Days + (1 | one)", df)


def test_too_many_random_effects_is_an_error(sleepstudy):
    df = sleepstudy.copy()
    df["row"] = np.arange(len(df))
    with pytest.raises(DataError, match="number of random effects"):
        build_design("Reaction ~ Days + (1 | row)", df)


def test_no_random_term_and_bad_data(sleepstudy):
    with pytest.raises(FormulaError, match="no random term"):
        build_design("Reaction ~ Days", sleepstudy)
    with pytest.raises(DataError, match="no rows"):
        build_design("Reaction ~ Days + (1|Subject)", sleepstudy.iloc[:0])
    with pytest.raises(DataError, match="positive"):
        build_design("Reaction ~ Days + (1|Subject)", sleepstudy, weights=np.zeros(180))


def test_rank_deficient_columns_are_dropped_by_name(sleepstudy):
    df = sleepstudy.copy()
    df["Days2"] = 2 * df["Days"]
    with pytest.warns(RankDeficiencyWarning, match="Days2"):
        d = build_design("Reaction ~ Days + Days2 + (1 | Subject)", df)
    assert d.fixed_names == ["(Intercept)", "Days"] and d.dropped_fixed == ["Days2"]


def test_near_aliasing_is_decided_by_projection_not_by_the_gram_screen(sleepstudy):
    """X'X screens out the clearly independent designs; a column close to the others
    (relative residual 1e-5, inside the screen's 1e-3 but above the 1e-7 tolerance)
    is decided by projecting it, and kept; one at 1e-9 is dropped, as R's qr() would."""
    import warnings

    rng = np.random.default_rng(3)
    df = sleepstudy.copy()
    noise = rng.normal(size=len(df))
    for size, kept in ((1e-5, True), (1e-9, False)):
        df["near"] = 2 * df["Days"] + size * np.linalg.norm(2 * df["Days"]) * noise / \
            np.linalg.norm(noise)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = build_design("Reaction ~ Days + near + (1 | Subject)", df)
        assert ("near" in d.fixed_names) is kept
        assert any(issubclass(w.category, RankDeficiencyWarning) for w in caught) is not kept


def test_theta_bounds_and_relative_factor(sleepstudy):
    term = build_design("Reaction ~ Days + (Days | Subject)", sleepstudy).terms[0]
    assert np.array_equal(term.theta_lower_bounds(), [0, -np.inf, 0])
    lam = term.relative_factor(np.array([1.0, 2.0, 3.0]))
    assert np.array_equal(lam, [[1, 0], [2, 3]])


def test_interaction_of_many_columns_does_not_overflow():
    """(1 | a:b:c:d:e) coded levels as a product of category counts, which wrapped past
    2⁶³ (9000⁵ here) and gave wrong level labels."""
    rng = np.random.default_rng(0)
    n = 3000
    frame = pd.DataFrame({c: rng.integers(0, 9000, n) for c in "abcde"})
    frame["y"] = rng.normal(size=n)
    from henderson.design import _grouping_factor
    from henderson.formula import RandomBar

    codes, levels = _grouping_factor(frame, RandomBar("1", "a:b:c:d:e", tuple("abcde")))
    labels = frame[list("abcde")].astype(str).agg(":".join, axis=1).to_numpy()
    np.testing.assert_array_equal(levels.to_numpy()[codes], labels)
    # levels are in R's order: the first factor varies slowest, each by value
    order = frame[list("abcde")].drop_duplicates().sort_values(list("abcde"))
    assert list(levels) == order.astype(str).agg(":".join, axis=1).tolist()


def test_levels_are_r_labels_so_equal_labels_are_one_level():
    """An object column holding 5 and "5" made two levels labelled "5"; 2.0 and 2
    likewise. R's factor levels are strings: one level each."""
    frame = pd.DataFrame({"g": pd.Series([5, "5", 2.0, 2, "x", "x"], dtype=object),
                          "y": [1.0, 2.0, 3.0, 4.5, 5.0, 6.5]})
    from henderson.design import _grouping_factor
    from henderson.formula import RandomBar

    codes, levels = _grouping_factor(frame, RandomBar("1", "g", ("g",)))
    assert list(levels) == ["2", "5", "x"]
    np.testing.assert_array_equal(codes, [1, 1, 0, 0, 2, 2])


def test_aliased_columns_of_a_sparse_x_are_dropped_as_in_a_dense_one():
    """A sparse X (a fixed factor with >100 levels) was never checked for aliasing: a
    factor nested in another gave a raw CHOLMOD error."""
    rng = np.random.default_rng(0)
    n = 2000
    herd = rng.integers(0, 150, n)
    frame = pd.DataFrame({"herd": herd.astype(str), "hys": (herd * 2 + rng.integers(0, 2, n)).astype(str),
                          "g": rng.integers(0, 50, n).astype(str), "y": rng.normal(size=n)})
    with pytest.warns(RankDeficiencyWarning, match="dropping 149 column"):
        both = hd.lmm("y ~ herd + hys + (1 | g)", frame)
    assert sp.issparse(both.design.X)
    alone = hd.lmm("y ~ hys + (1 | g)", frame)
    assert both.objective == pytest.approx(alone.objective, rel=1e-10)
    with pytest.warns(RankDeficiencyWarning):
        dense = hd.lmm("y ~ herd + hys + (1 | g)", frame.iloc[:400], sparse_fixed=False)
    with pytest.warns(RankDeficiencyWarning):
        sparse = hd.lmm("y ~ herd + hys + (1 | g)", frame.iloc[:400], sparse_fixed=True)
    assert sparse.design.dropped_fixed == dense.design.dropped_fixed
    assert sparse.objective == pytest.approx(dense.objective, rel=1e-9)


@pytest.mark.parametrize("response", ["constant", "linear", "group constant"])
def test_a_response_without_residual_variation_is_an_error(response):
    """A constant y gave objective −inf, converged=True (and the CLI wrote -Infinity
    into JSON with exit code 0); y fitted exactly by the random effects ran θ to 5e6."""
    d = hd.datasets.load("sleepstudy")
    y = {"constant": np.full(len(d), 3.0), "linear": 2 * d.Days + 1,
         "group constant": d.Subject.astype(float)}[response]
    with pytest.raises(hd.DataError, match="response|residual variance"):
        hd.lmm("y ~ Days + (1 | Subject)", d.assign(y=y))


def test_text_ids_written_as_floats_are_read_as_r_writes_them():
    from henderson.design import text_labels

    frame = pd.DataFrame({"g": ["12.0", "001", "1.5", "-3.00", None, "1.05", "12.0x"]})
    assert text_labels(frame, ["g"]).g.tolist()[:4] == ["12", "001", "1.5", "-3"]
    assert text_labels(frame, ["g"]).g.tolist()[5:] == ["1.05", "12.0x"]


PLAIN_SPECS = ["x + f", "0 + x + f", "x * f", "f * g", "x:z + f:g:x", "x * z * f",
               "f + g - 1", "1", "z + x:f"]
NOT_PLAIN_SPECS = ["log(z) + f", "C(f) + x", "I(x ** 2) + g", "poly(x, 2)"]


def _design_frame(rng, n, levels=(3, 4)):
    """Numbers (float and integer) and two categoricals of R's level order."""
    frame = pd.DataFrame({
        "x": rng.normal(size=n) * rng.choice([1.0, -1.0, 0.0], size=n),   # −0.0 too
        "z": rng.integers(1, 9, size=n),                                   # integers
        "f": pd.Categorical(rng.choice([f"a{i}" for i in range(levels[0])], size=n)),
        "g": pd.Categorical(rng.choice([f"b{i}" for i in range(levels[1])], size=n)),
    })
    return frame


@pytest.mark.parametrize("spec", PLAIN_SPECS + NOT_PLAIN_SPECS)
def test_reused_model_spec_gives_formulaic_matrix_bit_for_bit(spec):
    """A plain spec's model matrix is built without formulaic from the spec of an
    earlier fit: on new rows (other values, other categories) it must be formulaic's
    own matrix to the bit, with its names and its column-major layout; a spec with
    functions is never reused."""
    import formulaic

    from henderson.design import PLAIN_SPECS as reused, PlainSpecs, _model_matrix, _r_numbers
    from henderson.formula import R_FUNCTIONS

    rng = np.random.default_rng(zlib.crc32(spec.encode()))
    for levels in [(3, 4), (3, 4), (2, 5), (3, 4)]:
        frame = _design_frame(rng, int(rng.integers(20, 60)), levels)
        _model_matrix(spec, frame)  # a spec is learnt the second time formulaic builds it
        values, names, model_spec = _model_matrix(spec, frame)
        numbers = _r_numbers(spec, frame)
        truth = formulaic.model_matrix(spec, numbers, na_action="raise", context=R_FUNCTIONS)
        np.testing.assert_array_equal(values, np.asarray(truth, dtype=np.float64))
        assert np.array_equal(np.signbit(values), np.signbit(np.asarray(truth, dtype=float)))
        assert values.flags.f_contiguous
        assert names == [hd.design.lme4_column_name(c) for c in truth.model_spec.column_names]
        assert list(model_spec.column_names) == list(truth.model_spec.column_names)
        stored = reused._plans.get(PlainSpecs.key(spec, numbers))
        assert (stored is not None) == (spec in PLAIN_SPECS)


def test_reused_spec_reports_missing_values_as_formulaic_does():
    from henderson.design import PLAIN_SPECS, PlainSpecs, _model_matrix

    frame = _design_frame(np.random.default_rng(1), 30)
    _model_matrix("x + f", frame)
    _model_matrix("x + f", frame)                      # the plan is stored the 2nd time
    key = PlainSpecs.key("x + f", frame)
    assert PLAIN_SPECS._plans.get(key) is not None
    frame.loc[3, "x"] = np.nan
    with pytest.raises(FormulaError):
        _model_matrix("x + f", frame)


def test_a_repeated_fit_is_identical_bit_for_bit():
    """The second fit of a model reuses the first's model specs (and the process's
    caches): every number must be the first fit's, and a fit with the reuse emptied."""
    from henderson.design import PLAIN_SPECS as reused

    data = hd.datasets.load("orthodont")
    formula = "distance ~ age + Sex + (age | Subject)"
    first, second = hd.lmm(formula, data), hd.lmm(formula, data)
    reused._plans.clear()
    third = hd.lmm(formula, data)
    for other in (second, third):
        assert other.objective == first.objective
        np.testing.assert_array_equal(other.theta, first.theta)
        np.testing.assert_array_equal(other.fixef, first.fixef)
        np.testing.assert_array_equal(other.vcov, first.vcov)
        np.testing.assert_array_equal(other.ranef["Subject"], first.ranef["Subject"])
        np.testing.assert_array_equal(other.design.X, first.design.X)
        np.testing.assert_array_equal(other.design.terms[0].z, first.design.terms[0].z)
