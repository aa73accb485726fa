import numpy as np
import pandas as pd
import pytest

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
