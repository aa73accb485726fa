import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from henderson import PedigreeError
from henderson.pedigree import Pedigree, relationship_matrix_tabular
from conftest import DATA, load_json


def mrode_table_2_1():
    ref = load_json("animal", "mrode.json")["table_2_1"]
    p = ref["pedigree"]
    return Pedigree(p["animal"], p["sire"], p["dam"]), ref


def visible_pedigree():
    frame = pd.read_csv(DATA / "animal" / "animal_visible_pedigree.csv", dtype=str,
                        keep_default_na=False)
    return Pedigree.from_dataframe(frame), frame


def test_mrode_inbreeding_mendelian_variances_logdet():
    ped, ref = mrode_table_2_1()
    order = ped.ids.get_indexer(ref["pedigree"]["animal"])
    assert np.allclose(ped.inbreeding[order], ref["inbreeding"], atol=1e-12)
    assert np.allclose(ped.mendelian_variances[order], ref["mendelian_d"], atol=1e-12)
    assert ped.logdet() == pytest.approx(ref["logdet_A"], abs=1e-6)


def test_mrode_ainverse_elements():
    ped, ref = mrode_table_2_1()
    ainv = ped.inverse().toarray()
    pos = {a: i for i, a in enumerate(ped.ids)}
    expected = np.zeros_like(ainv)
    for key, value in ref["ainv_upper"].items():
        i, j = (pos[k] for k in key.split(","))
        expected[i, j] = expected[j, i] = value
    assert np.allclose(ainv, expected, atol=1e-6)


def test_ainverse_is_inverse_of_tabular_A_with_inbreeding():
    ped, _ = visible_pedigree()
    A = relationship_matrix_tabular(ped)
    assert ped.inbreeding.max() > 0.1
    assert np.allclose(np.diag(A) - 1.0, ped.inbreeding, atol=1e-12)
    ainv = ped.inverse()
    assert np.abs(ainv @ A - np.eye(len(A))).max() < 1e-9
    assert ped.logdet() == pytest.approx(np.linalg.slogdet(A)[1], abs=1e-8)


def test_visible_pedigree_inbreeding_matches_reference():
    ped, frame = visible_pedigree()
    ref = load_json("animal", "animal_visible.json")
    F = pd.Series(ped.inbreeding, index=ped.ids).loc[frame["animal"]].to_numpy()
    assert np.abs(F - np.array(ref["inbreeding"])).max() < 1e-10
    assert ped.logdet() == pytest.approx(ref["logdet_A"], rel=1e-10)
    assert ped.inverse().nnz == ref["ainv_nnz"]


def test_random_pedigrees_against_tabular_method():
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 60
        sire = [rng.integers(0, i) + 1 if i > 3 and rng.random() < 0.8 else 0 for i in range(n)]
        dam = [rng.integers(0, i) + 1 if i > 3 and rng.random() < 0.8 else 0 for i in range(n)]
        dam = [0 if d == s else d for s, d in zip(sire, dam)]
        ped = Pedigree([str(i + 1) for i in range(n)], sire, dam)
        A = relationship_matrix_tabular(ped)
        assert np.allclose(np.diag(A) - 1, ped.inbreeding, atol=1e-12)
        assert np.allclose(ped.inverse().toarray(), np.linalg.inv(A), atol=1e-9)


def test_unknown_parent_codes_founders_and_sorting():
    ped = Pedigree(["c", "d", "e", "f"], ["a", "0", "c", "NA"], ["b", ".", "d", ""])
    assert set(ped.ids) == {"a", "b", "c", "d", "e", "f"}
    assert ped.n_added_founders == 2
    pos = {a: i for i, a in enumerate(ped.ids)}
    assert pos["c"] > pos["a"] and pos["e"] > pos["c"] and pos["e"] > pos["d"]
    assert ped.sire[pos["d"]] == -1 and ped.dam[pos["f"]] == -1
    # offspring listed before parents in the input is sorted
    ped = Pedigree(["z", "x", "y"], ["x", "0", "0"], ["y", "0", "0"])
    assert list(ped.ids).index("z") == 2


@pytest.mark.parametrize("animal,sire,dam,message", [
    (["a", "b", "a"], ["0", "0", "0"], ["0", "0", "0"], "duplicated animal id.*a"),
    (["a", "b"], ["a", "0"], ["0", "0"], "own parent: a"),
    (["a", "b", "c"], ["c", "a", "b"], ["0", "0", "0"], "loop.*a"),
    (["a", "b", "c"], ["x", "x", "0"], ["x", "y", "0"], "same sire and dam: a"),
])
def test_bad_pedigrees_name_the_animals(animal, sire, dam, message):
    with pytest.raises(PedigreeError, match=message):
        Pedigree(animal, sire, dam)


def test_read_file_and_missing_columns(tmp_path):
    path = tmp_path / "ped.txt"
    path.write_text("id sire dam\n3 1 2\n4 1 0\n5 4 3\n")
    ped = Pedigree.read(path)
    assert len(ped) == 5 and ped.inbreeding[list(ped.ids).index("5")] == 0.125
    with pytest.raises(PedigreeError, match="not found"):
        Pedigree.read(tmp_path / "nope.csv")
    with pytest.raises(PedigreeError, match="'mother'"):
        Pedigree.from_dataframe(pd.DataFrame({"animal": [1], "sire": [0]}), dam="mother")


# ------------------------------------------------------------ unknown parents
def _mrode_with_unknown(code):
    """Mrode's Table 2.1 pedigree with its unknown parents written ``code``."""
    ref = load_json("animal", "mrode.json")["table_2_1"]["pedigree"]
    swap = lambda values: [code if str(v) == "0" else v for v in values]
    return Pedigree(ref["animal"], swap(ref["sire"]), swap(ref["dam"]))


@pytest.mark.parametrize("code", ["0", "00", "000", "0.0", "-1", "*", "-", "?", ".", "NA",
                                  "n/a", "NaN", "None", "NULL", "null", "", " 0 ", None,
                                  np.nan, pd.NA, 0, 0.0, -1])
def test_unknown_parent_codes_give_the_same_pedigree_as_zero(code):
    expected = _mrode_with_unknown("0")
    ped = _mrode_with_unknown(code)
    assert list(ped.ids) == list(expected.ids)
    assert ped.n_added_founders == 0
    assert np.array_equal(ped.sire, expected.sire) and np.array_equal(ped.dam, expected.dam)
    assert np.array_equal(ped.inbreeding, expected.inbreeding)
    assert (ped.inverse() != expected.inverse()).nnz == 0


def test_star_is_not_a_common_founder_of_the_base_animals():
    """Written "*", unknown parents used to be one founder animal "*": every base animal
    its offspring, so that the base animals were half sibs and their progeny inbred."""
    ped = Pedigree(["a", "b", "c"], ["*", "*", "a"], ["*", "*", "b"])
    assert list(ped.ids) == ["a", "b", "c"]
    assert ped.inbreeding.tolist() == [0.0, 0.0, 0.0]
    # a and b unrelated, c their offspring: A⁻¹ = [[1.5, .5, -1], [.5, 1.5, -1], [-1, -1, 2]]
    assert np.allclose(ped.inverse().toarray(),
                       [[1.5, 0.5, -1.0], [0.5, 1.5, -1.0], [-1.0, -1.0, 2.0]], atol=1e-15)


def test_unknown_codes_can_be_overridden():
    # with unknown={"*"}, "0" is an animal (a founder added) and NA still means unknown
    ped = Pedigree(["1", "2"], ["0", "*"], ["*", None], unknown={"*"})
    assert list(ped.ids) == ["0", "2", "1"] and ped.n_added_founders == 1
    assert ped.sire.tolist() == [-1, -1, 0] and ped.dam.tolist() == [-1, -1, -1]
    # a single code and numbers are accepted
    ped = Pedigree([0, 1, 2], [-9, 0, 0], [-9, -9, 1], unknown=-9)
    assert list(ped.ids) == ["0", "1", "2"] and ped.inbreeding[2] == 0.25  # 0 × daughter
    assert ped.dam.tolist() == [-1, -1, 1]
    frame = pd.DataFrame({"animal": ["x", "y"], "sire": ["UNK", "x"], "dam": ["0", "UNK"]})
    assert Pedigree.from_dataframe(frame, unknown=["UNK", "0"]).n_added_founders == 0
    assert Pedigree.from_dataframe(frame).n_added_founders == 1  # "UNK" is an animal


def test_animal_id_that_is_an_unknown_code_is_refused_with_its_position():
    with pytest.raises(PedigreeError, match=r"no animal id.*position\(s\) 1 \('\*'\), 2 \(missing\)"):
        Pedigree(["a", "*", None], ["0", "0", "0"], ["0", "0", "0"])


def test_float_parent_columns_name_the_integer_animals():
    """A parent column read as float because of a missing value holds 1.0 for animal 1;
    it used to be a founder "1.0" added beside animal "1"."""
    frame = pd.DataFrame({"animal": [1, 2, 3, 4], "sire": [np.nan, np.nan, 1.0, 1.0],
                          "dam": [np.nan, np.nan, 2.0, 3.0]})
    ped = Pedigree.from_dataframe(frame)
    assert list(ped.ids) == ["1", "2", "3", "4"] and ped.n_added_founders == 0
    assert ped.inbreeding[3] == 0.25  # sire × daughter


def test_empty_pedigree_is_refused():
    with pytest.raises(PedigreeError, match="no animals"):
        Pedigree([], [], [])
    with pytest.raises(PedigreeError, match="no animals"):
        Pedigree.from_dataframe(pd.DataFrame({"animal": [], "sire": [], "dam": []}))


def test_repr():
    ped = Pedigree(["3", "4", "5"], ["1", "1", "4"], ["2", "0", "3"])
    assert repr(ped) == "Pedigree(5 animals, 2 founders added, max inbreeding 0.1250)"


def test_lengths_and_dimensions_are_checked():
    with pytest.raises(PedigreeError, match="same length, not 2, 1 and 2"):
        Pedigree(["a", "b"], ["0"], ["0", "0"])
    with pytest.raises(PedigreeError, match="sire must be one-dimensional"):
        Pedigree(["a"], [["0"]], ["0"])
    with pytest.raises(TypeError, match="DataFrame"):
        Pedigree.from_dataframe({"animal": ["a"], "sire": ["0"], "dam": ["0"]})


# ------------------------------------------------------------ reading files
def test_read_headerless_file_keeps_its_first_animal(tmp_path):
    """The first line was always taken as a header: animal 3 and its parents were lost."""
    path = tmp_path / "ped.txt"
    path.write_text("3 1 2\n4   1 0\n\n5 4 3\n")
    ped = Pedigree.read(path)
    assert sorted(ped.ids) == ["1", "2", "3", "4", "5"]
    assert ped.inbreeding[list(ped.ids).index("5")] == 0.125


@pytest.mark.parametrize("text,kwargs", [
    ("id,sire_id,dam_id\n3,1,2\n4,1,0\n5,4,3\n", {}),
    ("calf\tfather\tmother\n3\t1\t2\n4\t1\tNA\n5\t4\t3\n", {}),
    ("x;y;z\n3;1;2\n4;1;;\n5;4;3\n".replace(";;", ";"), {"header": True}),
    ("year,animal,dam,sire\n1,3,2,1\n1,4,*,1\n2,5,3,4\n",
     {"animal": "animal", "sire": "sire", "dam": "dam"}),
    ("3 1 2 2001\n4 1 . 2002\n5 4 3 2003\n", {}),
])
def test_read_separators_headers_and_named_columns(tmp_path, text, kwargs):
    path = tmp_path / "ped.txt"
    path.write_text(text)
    ped = Pedigree.read(path, **kwargs)
    assert sorted(ped.ids) == ["1", "2", "3", "4", "5"]
    assert ped.inbreeding[list(ped.ids).index("5")] == 0.125


@pytest.mark.parametrize("content,message", [
    (None, "is a directory"),
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ("3 1\n4 1\n", "has 2 column"),
    ("3 1 2\n4 1 0 7\n5 4 3\n", "lines of different lengths.*line 2"),
    ("3,1,2\n\n4,1\n5,4,3\n", "lines of different lengths: line 3 has 2 field.*first line 3"),
    ("3 1 2\n4 1\n", "lines of different lengths: line 2 has 2 field"),
    ("animal sire dam\n", "header but no animals"),
    ("3 1 2\n3 1 0\n", "ped.txt.*duplicated animal id.*3"),
])
def test_read_bad_files_name_the_path_and_the_problem(tmp_path, content, message):
    path = tmp_path / "ped.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(PedigreeError, match=message) as error:
        Pedigree.read(path)
    assert "ped.txt" in str(error.value)


def test_read_columns_that_do_not_exist(tmp_path):
    path = tmp_path / "ped.csv"
    path.write_text("animal,sire,dam\n3,1,2\n")
    with pytest.raises(PedigreeError, match="no column 'mother' for dam.*animal, sire, dam"):
        Pedigree.read(path, dam="mother")
    with pytest.raises(PedigreeError, match="3 columns; there is no column 5 for sire"):
        Pedigree.read(path, sire=5)
    with pytest.raises(PedigreeError, match="three different columns"):
        Pedigree.read(path, sire=0)


# ------------------------------------------------------------ inbreeding algorithms
def _random_parents(rng, n, p_known=0.8, window=None, p_full_sib=0.2):
    """Parent positions (-1 unknown) with parents before offspring; ``window`` limits a
    parent to the ``window`` animals before (deep, narrow pedigrees); some animals
    repeat the parents of the one before (the full-sib shortcut)."""
    sire = np.full(n, -1, dtype=np.int64)
    dam = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        if rng.random() < p_full_sib and sire[i - 1] >= 0 and dam[i - 1] >= 0:
            sire[i], dam[i] = sire[i - 1], dam[i - 1]
            continue
        low = 0 if window is None else max(0, i - window)
        s, d = (rng.integers(low, i) if rng.random() < p_known else -1 for _ in range(2))
        sire[i], dam[i] = s, (d if d != s else -1)
    return sire, dam


def _tabular(sire, dam):
    n = len(sire)
    A = np.zeros((n, n))
    for i in range(n):
        s, d = sire[i], dam[i]
        for j in range(i):
            A[i, j] = A[j, i] = 0.5 * ((A[j, s] if s >= 0 else 0.0) + (A[j, d] if d >= 0 else 0.0))
        A[i, i] = 1.0 + (0.5 * A[s, d] if s >= 0 and d >= 0 else 0.0)
    return A


@pytest.mark.parametrize("seed", range(6))
def test_both_inbreeding_algorithms_equal_the_tabular_method(seed):
    from henderson.pedigree import (_active_parent_schedule, inbreeding,
                                    inbreeding_active_parents, inbreeding_meuwissen_luo)

    rng = np.random.default_rng(seed)
    n = 150
    window = [None, 6, 20][seed % 3]
    sire, dam = _random_parents(rng, n, window=window)
    A = _tabular(sire, dam)
    F = np.diag(A) - 1.0
    fs = np.where(sire >= 0, F[np.maximum(sire, 0)], -1.0)
    fd = np.where(dam >= 0, F[np.maximum(dam, 0)], -1.0)
    expected_d = 0.5 - 0.25 * (fs + fd)
    assert F.max() > 0.1
    schedule = _active_parent_schedule(sire, dam, n)
    for F_got, d_got in (inbreeding_meuwissen_luo(sire, dam),
                         inbreeding_active_parents(sire, dam, *schedule[:3]),
                         inbreeding(sire, dam)):
        assert np.abs(F_got - F).max() < 1e-12
        assert np.abs(d_got - expected_d).max() < 1e-12


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_inbreeding_algorithms_agree_on_any_small_pedigree(data):
    """Any parents-first pedigree up to 25 animals: one or two parents, founders used
    late, repeated matings."""
    from henderson.pedigree import (_active_parent_schedule, inbreeding_active_parents,
                                    inbreeding_meuwissen_luo)

    n = data.draw(st.integers(0, 25))
    sire = np.array([data.draw(st.integers(-1, i - 1)) for i in range(n)], dtype=np.int64)
    dam = np.array([data.draw(st.integers(-1, i - 1)) for i in range(n)], dtype=np.int64)
    dam[dam == sire] = -1
    F = np.diag(_tabular(sire, dam)) - 1.0
    F_ml, d_ml = inbreeding_meuwissen_luo(sire, dam)
    F_ap, d_ap = inbreeding_active_parents(sire, dam, *_active_parent_schedule(sire, dam, n)[:3])
    assert np.abs(F_ml - F).max(initial=0) < 1e-12 and np.abs(F_ap - F).max(initial=0) < 1e-12
    assert np.abs(d_ml - d_ap).max(initial=0) < 1e-12


def test_active_parents_schedule_holds_a_chain_in_few_slots():
    """A chain with a new founder dam each generation: the founder enters just before
    its offspring, so three slots suffice however long the chain."""
    from henderson.pedigree import _active_parent_schedule

    n = 1000
    founders = np.arange(n)              # positions 0..n-1: the dams (founders)
    chain = n + np.arange(n)             # positions n..2n-1: the chain
    sire = np.concatenate([np.full(n, -1), np.r_[-1, chain[:-1]]])
    dam = np.concatenate([np.full(n, -1), founders])
    order, slot, n_slots, work = _active_parent_schedule(sire, dam, 2 * n)
    assert n_slots == 3 and sorted(order) == list(range(2 * n))
    position = np.empty(2 * n, dtype=np.int64)
    position[order] = np.arange(2 * n)
    assert np.all(position[founders] == position[chain] - 1)


def test_deep_chain_uses_the_active_parents_and_wide_pedigree_the_ancestors(monkeypatch):
    import henderson.pedigree as pedigree

    def refuse(*args):
        raise AssertionError("the other algorithm should have been chosen")

    n = 3000
    animal = [f"c{i}" for i in range(n)]
    chain = Pedigree(animal, ["0"] + animal[:-1], [f"m{i}" for i in range(n)])
    wide = Pedigree.from_dataframe(
        __import__("henderson.simulate", fromlist=["x"]).animal_population(20_000, 4)[0])
    with monkeypatch.context() as patch:
        patch.setattr(pedigree, "inbreeding_meuwissen_luo", refuse)
        F, d = pedigree.inbreeding(chain.sire, chain.dam)
        assert F.tolist() == [0.0] * len(chain) and d.max() == 1.0 and d.min() == 0.5
    with monkeypatch.context() as patch:
        patch.setattr(pedigree, "inbreeding_active_parents", refuse)
        F, _ = pedigree.inbreeding(wide.sire, wide.dam)
        assert F.max() > 0


def _parent_offspring_line(n_generations):
    """x2 = (x1, x0), x3 = (x2, x1), ...: each sire is the previous offspring, each dam
    its mother; inbreeding goes to 1 and 1 − F falls by ~0.81 a generation."""
    names = [f"x{i}" for i in range(n_generations + 2)]
    return Pedigree(names[2:], names[1:-1], names[:-2])


def test_repeated_parent_offspring_mating_stays_finite():
    """Inbreeding approaches 1 and d = 1/2 − (F_s + F_d)/4 reaches 0 around generation
    175: A⁻¹ used to raise ZeroDivisionError and log|A| was −inf."""
    ped = _parent_offspring_line(250)
    F, d = ped.inbreeding, ped.mendelian_variances
    A = relationship_matrix_tabular(ped)
    assert np.abs(F - (np.diag(A) - 1.0)).max() < 1e-12
    assert np.all(np.diff(F[2:]) > -1e-15) and 1.0 - 1e-15 < F.max() <= 1.0 and F[12] < 0.9
    assert d.min() < 1e-15 and np.all(d >= 0)
    with pytest.warns(UserWarning, match=r"165 animal\(s\).*below 1e-08 \(first 'x87'"):
        ainv = ped.inverse()
    floor = np.maximum(d, 1e-8)
    assert np.sum(d < 1e-8) == 250 + 2 - 87
    # A⁻¹ = T' D⁻¹ T with T = I − P (P: 1/2 at the known parents) and the raised d
    n = len(ped)
    T = np.eye(n)
    for i in range(n):
        for p in (ped.sire[i], ped.dam[i]):
            if p >= 0:
                T[i, p] = -0.5
    expected = T.T @ np.diag(1.0 / floor) @ T
    assert np.abs(ainv.toarray() - expected).max() <= 1e-15 * np.abs(expected).max()
    assert ped.logdet() == pytest.approx(np.sum(np.log(floor)), rel=1e-14)
    assert np.isfinite(ped.logdet())


def test_full_sib_mating_for_many_generations():
    n_generations = 400
    animal, sire, dam = ["m0", "f0"], ["0", "0"], ["0", "0"]
    for g in range(1, n_generations):
        for sex in "mf":
            animal.append(f"{sex}{g}")
            sire.append(f"m{g - 1}")
            dam.append(f"f{g - 1}")
    ped = Pedigree(animal, sire, dam)
    F = pd.Series(ped.inbreeding, index=ped.ids)
    # Wright: F_t = (1 + 2 F_{t-1} + F_{t-2}) / 4
    expected = [0.0, 0.0]
    for _ in range(2, n_generations + 1):
        expected.append((1 + 2 * expected[-1] + expected[-2]) / 4)
    got = [F[f"m{g}"] for g in range(n_generations)]
    assert np.abs(np.array(got) - expected[:n_generations]).max() < 1e-12
    assert 1.0 - 1e-15 < F.max() <= 1.0
    with pytest.warns(UserWarning, match="below 1e-08"):
        assert np.isfinite(ped.logdet())
