"""Every bad input is a named error: one row per case (issue 11's list and a prober's
finds). A row passes when the call raises a henderson error (FormulaError, DataError,
PedigreeError) or a ValueError/TypeError whose message matches the row's pattern
(the argument, column or value at fault) — never a raw exception from numpy, pandas,
pyarrow, nlopt or CHOLMOD, and never a fit. The command line's table is in
tests/test_cli.py."""
import numpy as np
import pandas as pd
import pytest

import henderson as hd

F = "Reaction ~ Days + (Days | Subject)"
F1 = "Reaction ~ Days + (1 | Subject)"


@pytest.fixture(scope="module")
def s():
    return hd.datasets.load("sleepstudy")


@pytest.fixture(scope="module")
def m(s):
    return hd.lmm(F, s)


@pytest.fixture(scope="module")
def known(s):
    return hd.lmm(F1, s, fixed_variances={"Subject": 600.0, "residual": 650.0})


def _files(tmp_path, s):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("Reaction,Days,Subject\n")
    s.to_parquet(tmp_path / "parquet_bytes.csv")
    s.to_parquet(tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    return tmp_path


CASES = [
    # (id, call(s, m, known, files), pattern the message must match)
    ("formula None", lambda s, m, k, f: hd.lmm(None, s), "formula"),
    ("formula bytes", lambda s, m, k, f: hd.lmm(F.encode(), s), "formula"),
    ("formula int", lambda s, m, k, f: hd.lmm(3, s), "formula"),
    ("formula without ~", lambda s, m, k, f: hd.lmm("Reaction Days", s), "~"),
    ("formula with .", lambda s, m, k, f: hd.lmm("Reaction ~ . + (1 | Subject)", s), r"'\.'"),
    ("unknown function", lambda s, m, k, f: hd.lmm("Reaction ~ foo(Days) + (1|Subject)", s),
     "foo"),
    ("unknown column", lambda s, m, k, f: hd.lmm("Reaction ~ Dayz + (1 | Subject)", s), "Dayz"),
    ("structure without a bar", lambda s, m, k, f: hd.lmm("Reaction ~ Days + cs(Days)", s),
     "grouping factor"),
    ("dispformula with a bar, no colour codes in the message",
     lambda s, m, k, f: hd.lmm(F1, s, dispformula="~ (1 | Subject)"), r"^[^\x1b]*$"),
    ("response on the right", lambda s, m, k, f: hd.lmm("Reaction ~ Reaction + (1|Subject)", s),
     "Reaction"),
    ("data a list", lambda s, m, k, f: hd.lmm(F1, [1, 2, 3]), "data|chunked"),
    ("empty data", lambda s, m, k, f: hd.lmm(F1, s.iloc[:0]), "no rows"),
    ("column named Intercept",
     lambda s, m, k, f: hd.lmm("Reaction ~ Intercept + (1 | Subject)",
                               s.assign(Intercept=np.arange(180.0))), "Intercept"),
    ("duplicated column names",
     lambda s, m, k, f: hd.lmm(F1, pd.concat([s, s[["Days"]]], axis=1)), "Days"),
    ("timedelta covariate",
     lambda s, m, k, f: hd.lmm("Reaction ~ t + (1 | Subject)",
                               s.assign(t=pd.to_timedelta(s.Days, unit="D"))), "'t'"),
    ("datetime covariate",
     lambda s, m, k, f: hd.lmm("Reaction ~ t + (1 | Subject)",
                               s.assign(t=pd.Timestamp("2020-01-01")
                                        + pd.to_timedelta(s.Days, unit="D"))), "'t'"),
    ("complex covariate",
     lambda s, m, k, f: hd.lmm("Reaction ~ c + (1 | Subject)", s.assign(c=s.Days + 1j)), "'c'"),
    ("list column", lambda s, m, k, f: hd.lmm("Reaction ~ L + (1 | Subject)",
                                              s.assign(L=[[1, 2]] * 180)), "'L'"),
    ("string response", lambda s, m, k, f: hd.lmm(F1, s.assign(Reaction="a")), "Reaction"),
    ("response with inf",
     lambda s, m, k, f: hd.lmm(F1, s.assign(Reaction=np.r_[np.inf, s.Reaction[1:]])),
     "Reaction"),
    ("response too large", lambda s, m, k, f: hd.lmm(F1, s.assign(Reaction=s.Reaction * 1e200)),
     "Reaction|rescale"),
    ("covariate too large", lambda s, m, k, f: hd.lmm(F1, s.assign(Days=s.Days * 1e300)),
     "rescale"),
    ("constant response", lambda s, m, k, f: hd.lmm(F1, s.assign(Reaction=3.0)), "constant"),
    ("one-level group", lambda s, m, k, f: hd.lmm(F1, s.assign(Subject="a")), "Subject"),
    ("weights a string column",
     lambda s, m, k, f: hd.lmm(F1, s.assign(w="a"), weights="w"), "weights"),
    ("weights absent column", lambda s, m, k, f: hd.lmm(F1, s, weights="w"), "'w'"),
    ("weight 0", lambda s, m, k, f: hd.lmm(F1, s.assign(w=np.r_[0.0, np.ones(179)]), weights="w"),
     "weights"),
    ("weight 1e300",
     lambda s, m, k, f: hd.lmm(F1, s.assign(w=np.r_[1e300, np.ones(179)]), weights="w"),
     "weights"),
    ("weights wrong length", lambda s, m, k, f: hd.lmm(F1, s, weights=np.ones(3)), "weights"),
    ("5 and '5' collide in a:b",
     lambda s, m, k, f: hd.lmm("Reaction ~ Days + (1 | a:b)",
                               s.assign(a=["p:q", "p"] * 90, b=["r", "q:r"] * 90)), "collide"),
    ("fixed_variances NaN",
     lambda s, m, k, f: hd.lmm(F1, s, fixed_variances={"Subject": np.nan, "residual": 1.0}),
     "fixed_variances"),
    ("fixed_variances inf residual",
     lambda s, m, k, f: hd.lmm(F1, s, fixed_variances={"Subject": 1.0, "residual": np.inf}),
     "residual"),
    ("fixed_variances negative",
     lambda s, m, k, f: hd.lmm(F1, s, fixed_variances={"Subject": -1.0, "residual": 1.0}),
     "fixed_variances"),
    ("fixed_variances unknown term",
     lambda s, m, k, f: hd.lmm(F1, s, fixed_variances={"Subjekt": 1.0, "residual": 1.0}),
     "fixed_variances"),
    ("fixed_variances asymmetric",
     lambda s, m, k, f: hd.lmm(F, s, fixed_variances={"Subject": [[1.0, 0.5], [0.0, 1.0]],
                                                      "residual": 1.0}), "symmetric"),
    ("fixed_variances a list", lambda s, m, k, f: hd.lmm(F1, s, fixed_variances=[1.0]),
     "fixed_variances"),
    ("relationships a list", lambda s, m, k, f: hd.lmm(F1, s, relationships=[1]),
     "relationships"),
    ("relationships unknown group",
     lambda s, m, k, f: hd.lmm(F1, s, relationships={"nosuch": np.eye(2)}), "nosuch"),
    ("reml 'no'", lambda s, m, k, f: hd.lmm(F1, s, reml="no"), "reml"),
    ("optimizer bogus", lambda s, m, k, f: hd.lmm(F1, s, optimizer="bogus"), "optimizer"),
    ("ordering bogus", lambda s, m, k, f: hd.lmm(F1, s, ordering="bogus"), "ordering"),
    ("ordering bogus with cholmod",
     lambda s, m, k, f: hd.lmm(F1, s, ordering="bogus", strategy="cholmod"), "ordering"),
    ("strategy bogus", lambda s, m, k, f: hd.lmm(F1, s, strategy="bogus"), "strategy"),
    ("method bogus", lambda s, m, k, f: hd.lmm(F1, s, method="bogus"), "method"),
    ("missing bogus", lambda s, m, k, f: hd.lmm(F1, s, missing="x"), "missing"),
    ("verbose bogus", lambda s, m, k, f: hd.lmm(F1, s, verbose="x"), "verbose"),
    ("sparse_fixed bogus", lambda s, m, k, f: hd.lmm(F1, s, sparse_fixed="x"), "sparse_fixed"),
    ("offset wrong length", lambda s, m, k, f: hd.lmm(F1, s, offset=np.ones(3)), "offset"),
    ("offset text column", lambda s, m, k, f: hd.lmm(F1, s.assign(o="a"), offset="o"), "offset"),
    ("offset NaN", lambda s, m, k, f: hd.lmm(F1, s, offset=np.full(180, np.nan)), "offset"),
    ("chunk_rows 0", lambda s, m, k, f: hd.chunked(s, chunk_rows=0), "chunk_rows"),
    ("chunk_rows text", lambda s, m, k, f: hd.chunked(s, chunk_rows="x"), "chunk_rows"),
    ("chunked None", lambda s, m, k, f: hd.chunked(None), "chunked"),
    ("empty CSV", lambda s, m, k, f: hd.lmm(F1, str(f / "empty.csv")), "empty"),
    ("header-only CSV", lambda s, m, k, f: hd.lmm(F1, str(f / "header.csv")), "no rows"),
    ("Parquet bytes named .csv", lambda s, m, k, f: hd.lmm(F1, str(f / "parquet_bytes.csv")),
     "CSV"),
    ("truncated Parquet", lambda s, m, k, f: hd.lmm(F1, str(f / "truncated.parquet")),
     "Parquet"),
    ("a folder as data", lambda s, m, k, f: hd.lmm(F1, str(f)), "folder|directory"),
    ("missing data file", lambda s, m, k, f: hd.lmm(F1, str(f / "absent.csv")), "not found"),
    ("chunk lacks a column",
     lambda s, m, k, f: hd.lmm(F1, hd.chunked([s.iloc[:90], s.iloc[90:].drop(columns="Days")])),
     "Days"),
    ("timestamp covariate in chunks",
     lambda s, m, k, f: hd.lmm("Reaction ~ t + (1 | Subject)",
                               hd.chunked(s.assign(t=pd.Timestamp("2020-01-01")
                                                   + pd.to_timedelta(s.Days, unit="D")),
                                          chunk_rows=50)), "'t'"),
    ("anova with a string", lambda s, m, k, f: hd.anova(m, "x"), "argument 2"),
    ("anova of one model", lambda s, m, k, f: hd.anova(m), "two models"),
    ("anova refit 'x'", lambda s, m, k, f: hd.anova(m, m, refit="x"), "refit"),
    ("test with NaN", lambda s, m, k, f: m.test([[np.nan, 1.0]]), "contrasts"),
    ("test wrong shape", lambda s, m, k, f: m.test([[1.0, 0.0, 0.0]]), "contrasts"),
    ("test strings", lambda s, m, k, f: m.test([["a", "b"]]), "contrasts"),
    ("test all zero", lambda s, m, k, f: m.test([[0.0, 0.0]]), "contrasts"),
    ("confint level 1.5", lambda s, m, k, f: m.confint(level=1.5), "level"),
    ("confint level text", lambda s, m, k, f: m.confint(level="x"), "level"),
    ("confint method bogus", lambda s, m, k, f: m.confint(method="bogus"), "method"),
    ("confint profile, known variances", lambda s, m, k, f: k.confint("profile"), "wald"),
    ("confint bootstrap, known variances", lambda s, m, k, f: k.confint("bootstrap"), "wald"),
    ("predict a list", lambda s, m, k, f: m.predict([1, 2]), "newdata"),
    ("predict re 'no'", lambda s, m, k, f: m.predict(s.head(1), re="no"), "re"),
    ("predict missing column", lambda s, m, k, f: m.predict(s[["Subject"]]), "Days"),
    ("predict new level", lambda s, m, k, f: m.predict(s.head(1).assign(Subject=999)),
     "allow_new_levels"),
    ("predict NaN covariate", lambda s, m, k, f: m.predict(s.head(1).assign(Days=np.nan)),
     "Days|missing|NaN"),
    ("summary ddf bogus", lambda s, m, k, f: m.summary(ddf="bogus"), "ddf"),
    ("coefficients ddf bogus", lambda s, m, k, f: m.coefficients(ddf="bogus"), "ddf"),
    ("simulate n -1", lambda s, m, k, f: m.simulate(-1), "simulate"),
    ("breeding_values unknown group", lambda s, m, k, f: m.breeding_values("nosuch"), "nosuch"),
    ("heritability of the residual", lambda s, m, k, f: k.heritability("Residual"),
     "Residual"),
    ("plot_ranef unknown group", lambda s, m, k, f: m.plot_ranef("nosuch"), "nosuch"),
    ("save into a missing folder", lambda s, m, k, f: m.save(f / "nope" / "m.npz"), "folder"),
    ("save onto a folder", lambda s, m, k, f: m.save(f), "folder"),
    ("save None", lambda s, m, k, f: m.save(None), "path"),
    ("load None", lambda s, m, k, f: hd.load(None), "path"),
    ("load garbage", lambda s, m, k, f: hd.load(f / "empty.csv"), "not a saved henderson"),
    ("pedigree loop", lambda s, m, k, f: hd.Pedigree.from_dataframe(pd.DataFrame(
        {"animal": ["a", "b"], "sire": ["b", "a"], "dam": ["0", "0"]})), "a|b"),
    ("empty pedigree", lambda s, m, k, f: hd.Pedigree.from_dataframe(pd.DataFrame(
        {"animal": [], "sire": [], "dam": []})), "no animals"),
    ("grm of letters", lambda s, m, k, f: hd.grm(np.array([["AA", "AB"], ["BB", "AA"]])),
     "0, 1|genotype|letters|numbers|code"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_error(case, s, m, known, tmp_path):
    _, call, pattern = case
    files = _files(tmp_path, s)
    with pytest.raises((hd.HendersonError, ValueError, TypeError), match=pattern) as caught:
        call(s, m, known, files)
    # a henderson error, or a plain ValueError/TypeError raised by henderson itself
    module = caught.traceback[-1].frame.f_globals.get("__name__", "")
    assert isinstance(caught.value, hd.HendersonError) or module.startswith("henderson"), \
        f"raised by {module}: {caught.value!r}"


def test_known_variance_tests_are_wald_tests(known):
    """Satterthwaite gave DenDF 294 > nobs for a model whose variances were given."""
    assert known.test([0.0, 1.0])["DenDF"] == np.inf
    table = known.coef_table
    assert np.all(np.isinf(table["df"]))
    z = table.loc["Days", "t value"]
    from scipy import stats
    assert table.loc["Days", "Pr(>|t|)"] == pytest.approx(2 * stats.norm.sf(abs(z)))


def test_object_column_holding_5_and_text_5_is_one_level(s):
    """As a fixed factor it gave two columns both named f5."""
    f = pd.Series([5, "5", "6"] * 60, dtype=object)
    m = hd.lmm("Reaction ~ f + (1 | Subject)", s.assign(f=f))
    text = hd.lmm("Reaction ~ f + (1 | Subject)", s.assign(f=f.astype(str)))
    assert list(m.fixef.index) == ["(Intercept)", "f6"]
    assert m.objective == pytest.approx(text.objective, rel=1e-12)


def test_names_r_quotes_or_dots_are_columns(s):
    """(1 | `my subj`) was refused and x.1 read as x."""
    base = hd.lmm(F1, s)
    frame = s.assign(**{"my subj": s.Subject, "x.1": s.Days, "my y": s.Reaction})
    for formula in ("Reaction ~ Days + (1 | `my subj`)", "Reaction ~ x.1 + (1 | Subject)",
                    "`my y` ~ Days + (1 | Subject)"):
        assert hd.lmm(formula, frame).objective == pytest.approx(base.objective, rel=1e-12)
    assert list(hd.lmm("Reaction ~ x.1 + I(x.1^2) + (1 | Subject)", frame).fixef.index) == [
        "(Intercept)", "x.1", "I(x.1^2)"]


def test_text_column_with_missing_values_dropped_is_a_factor():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"g": rng.integers(0, 10, 100).astype(str), "y": rng.normal(size=100),
                          "t": pd.array([None] + ["u", "v"] * 49 + ["u"], dtype="string")})
    m = hd.lmm("y ~ t + (1 | g)", frame, missing="drop")
    assert list(m.fixef.index) == ["(Intercept)", "tv"] and m.nobs == 99


def test_offset_column_may_also_be_a_covariate(s):
    a = hd.lmm(F1, s, offset="Days")
    b = hd.lmm("Reaction ~ Days + offset(Days) + (1 | Subject)", s)
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
