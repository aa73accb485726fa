import os
import subprocess
import sys
from urllib.parse import unquote

from henderson.cli import MANIFEST, label_columns, main, read_relationship, result_file_stem


def test_demo_prints_the_seed_matrices_and_summaries(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for piece in ["plants", "sleepstudy", "penicillin", "Sigma = Z G Z' + R", "REML crit"]:
        assert piece in out


def test_demo_into_a_closed_pipe_exits_cleanly():
    proc = subprocess.run(f"{sys.executable} -m henderson demo | head -1", shell=True,
                          capture_output=True, text=True)
    assert proc.stdout.startswith("==== plants")
    assert "Traceback" not in proc.stderr


import json

import numpy as np
import pandas as pd
import pytest

import henderson as hd


def test_fit_writes_results_equal_to_the_python_api(tmp_path, capsys):
    data = hd.datasets.load("sleepstudy")
    path = tmp_path / "sleep.csv"
    data.to_csv(path, index=False)
    assert main(["fit", "Reaction ~ Days + (Days | Subject)", str(path), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    assert "Satterthwaite" in capsys.readouterr().out
    api = hd.lmm("Reaction ~ Days + (Days | Subject)", data.assign(Subject=data["Subject"].astype(int)))
    fixef = pd.read_csv(tmp_path / "out" / "fixef.csv", index_col=0)
    assert np.allclose(fixef["estimate"], api.fixef, rtol=1e-8)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(api.objective, rel=1e-10)
    ranef = pd.read_csv(tmp_path / "out" / "ranef_Subject.csv", index_col=0)
    assert np.allclose(ranef["Days"], api.ranef["Subject"]["Days"], rtol=1e-6)
    assert "Days_cond_sd" in ranef.columns


def test_fit_animal_model_with_pedigree_file(tmp_path):
    hd.datasets.load("animal_pedigree").to_csv(tmp_path / "ped.csv", index=False)
    hd.datasets.load("animal_records").to_csv(tmp_path / "rec.csv", index=False)
    assert main(["fit", "y ~ sex + hy + (1 | animal)", str(tmp_path / "rec.csv"),
                 "--pedigree", str(tmp_path / "ped.csv"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "o" / "ranef_animal.csv", index_col=0)
    assert {"pev", "reliability"} <= set(table.columns) and len(table) == 860


@pytest.mark.parametrize("chunked", [False, True], ids=["in-memory", "chunked"])
@pytest.mark.parametrize("case,message", [
    ("missing_file", "not found"),
    ("missing_column", "'Dayz'"),
    ("bad_formula", "formula"),
    ("nan_in_y", "missing or infinite"),
    ("empty", "no rows"),
])
def test_fit_bad_inputs_fail_with_one_line(tmp_path, capsys, case, message, chunked):
    data = hd.datasets.load("sleepstudy")
    formula = "Reaction ~ Days + (1 | Subject)"
    path = tmp_path / "d.csv"
    if case == "missing_column":
        formula = "Reaction ~ Dayz + (1 | Subject)"
    if case == "bad_formula":
        formula = "Reaction Days + (1 | Subject)"
    if case == "nan_in_y":
        data.loc[3, "Reaction"] = np.nan
    if case == "empty":
        data = data.iloc[:0]
    if case != "missing_file":
        data.to_csv(path, index=False)
    assert main(["fit", formula, str(path), "--quiet"] + (["--chunked"] if chunked else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("henderson: error:") and message in err[0]


def test_chunked_fit_saves_a_model_that_predicts_from_the_file(tmp_path, capsys):
    data = hd.datasets.load("insteval").iloc[:30_000]
    data.to_parquet(tmp_path / "ie.parquet", row_group_size=4_000)
    formula = "y ~ service + (1 | s) + (1 | d)"
    assert main(["fit", formula, str(tmp_path / "ie.parquet"), "--chunked", "--chunk-rows",
                 "7000", "--out", str(tmp_path / "out"), "--save", str(tmp_path / "m.npz"),
                 "--quiet"]) == 0
    api = hd.lmm(formula, data)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(api.objective, rel=1e-10)
    assert summary["nobs"] == 30_000
    ranef = pd.read_csv(tmp_path / "out" / "ranef_d.csv", index_col=0)
    assert np.allclose(ranef["(Intercept)_cond_sd"], api.ranef_sd["d"]["(Intercept)"], rtol=1e-4)
    new = data.iloc[:50]
    new.to_csv(tmp_path / "new.csv", index=False)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "new.csv"), "--out",
                 str(tmp_path / "pred.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "pred.csv")["prediction"]
    np.testing.assert_allclose(predicted, api.predict(new), rtol=1e-5)


def test_predict_with_a_missing_model_file_fails_with_one_line(tmp_path, capsys):
    hd.datasets.load("sleepstudy").to_csv(tmp_path / "d.csv", index=False)
    assert main(["predict", str(tmp_path / "none.npz"), str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_fit_writes_parquet_tables(tmp_path):
    data = hd.datasets.load("sleepstudy")
    data.to_parquet(tmp_path / "sleep.parquet")
    assert main(["fit", "Reaction ~ Days + (Days | Subject)", str(tmp_path / "sleep.parquet"),
                 "--out", str(tmp_path / "out"), "--format", "parquet", "--quiet"]) == 0
    api = hd.lmm("Reaction ~ Days + (Days | Subject)", data)
    fixef = pd.read_parquet(tmp_path / "out" / "fixef.parquet").set_index("term")
    np.testing.assert_allclose(fixef["estimate"], api.fixef, rtol=1e-8)
    ranef = pd.read_parquet(tmp_path / "out" / "ranef_Subject.parquet").set_index("Subject")
    np.testing.assert_allclose(ranef["Days_cond_sd"], api.ranef_sd["Subject"]["Days"], rtol=1e-6)
    assert set(pd.read_parquet(tmp_path / "out" / "varcorr.parquet")["grp"]) == {
        "Subject", "Residual"}


# ---------------------------------------------------------------- options
def run(argv, capsys):
    """``main(argv)``'s exit code, its stdout and its stderr lines (argparse exits)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"henderson {hd.__version__}"


def test_label_columns_are_the_grouping_factors_not_used_as_covariates():
    assert label_columns("y ~ x + (1 | g) + (x | h/k) + (1 | x) + (1 | y)") == ["g", "h", "k"]


def _padded_animal_files(tmp_path):
    """The animal model's files with ids "00061" instead of "A00060" (one more: "00000"
    would read as the unknown-parent code 0)."""
    def padded(ids: pd.Series) -> pd.Series:
        return ids.map(lambda v: f"{int(v[1:]) + 1:05d}" if v.startswith("A") else v)

    pedigree = hd.datasets.load("animal_pedigree").apply(padded)
    records = hd.datasets.load("animal_records")
    records["animal"] = padded(records["animal"])
    pedigree.to_csv(tmp_path / "ped.csv", index=False)
    records.to_csv(tmp_path / "rec.csv", index=False)
    assert records["animal"].str.startswith("0").all()
    return pedigree, records


def test_zero_padded_ids_match_the_pedigree(tmp_path, capsys):
    pedigree, records = _padded_animal_files(tmp_path)
    code, _, err = run(["fit", "y ~ sex + hy + (1 | animal)", str(tmp_path / "rec.csv"),
                        "--pedigree", str(tmp_path / "ped.csv"), "--out", str(tmp_path / "o"),
                        "--quiet"], capsys)
    assert code == 0, err
    api = hd.lmm("y ~ sex + hy + (1 | animal)", records,
                 relationships={"animal": hd.Pedigree.from_dataframe(pedigree)})
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(api.objective, rel=1e-10)
    table = pd.read_csv(tmp_path / "o" / "ranef_animal.csv", dtype={"animal": str})
    assert table["animal"].tolist() == list(api.ranef["animal"].index)
    assert table["animal"].str.startswith("0").all()


def test_zero_padded_ids_predict_with_their_blups(tmp_path, capsys):
    data = hd.datasets.load("sleepstudy")
    data["Subject"] = "0" + data["Subject"].astype(str)
    data.to_csv(tmp_path / "d.csv", index=False)
    model_file = tmp_path / "m.npz"
    assert run(["fit", "Reaction ~ Days + (Days | Subject)", str(tmp_path / "d.csv"),
                "--save", str(model_file), "--quiet"], capsys)[0] == 0
    assert run(["predict", str(model_file), str(tmp_path / "d.csv"), "--out",
                str(tmp_path / "p.csv")], capsys)[0] == 0
    predicted = pd.read_csv(tmp_path / "p.csv", dtype={"Subject": str})
    api = hd.lmm("Reaction ~ Days + (Days | Subject)", data)
    assert predicted["Subject"].tolist() == data["Subject"].tolist()
    np.testing.assert_allclose(predicted["prediction"], api.fitted, rtol=1e-6)


def test_options_reach_the_fit(tmp_path, capsys):
    data = hd.datasets.load("sleepstudy_weighted")
    data.loc[5, "Reaction"] = np.nan
    data.to_csv(tmp_path / "d.csv", index=False)
    formula = "Reaction ~ Days + (Days || Subject)"
    code, _, err = run(["fit", formula, str(tmp_path / "d.csv"), "--weights", "w",
                        "--missing", "drop", "--ml", "--optimizer", "Nelder-Mead",
                        "--strategy", "cholmod", "--ordering", "amd", "--out",
                        str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    api = hd.lmm(formula, data, weights="w", missing="drop", reml=False,
                 optimizer="Nelder-Mead", strategy="cholmod", ordering="amd")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["nobs"] == 179 and summary["reml"] is False
    assert summary["objective"] == pytest.approx(api.objective, rel=1e-10)
    assert summary["evaluations"] == api.n_evaluations
    unweighted = hd.lmm(formula, data, missing="drop", reml=False)
    assert abs(unweighted.objective - api.objective) > 1e-3  # the weights mattered


def test_fixed_variances_from_the_option_and_from_json(tmp_path, capsys):
    pedigree, records = _padded_animal_files(tmp_path)
    (tmp_path / "v.json").write_text(json.dumps({"animal": 27, "residual": 66}))
    api = hd.lmm("y ~ sex + hy + (1 | animal)", records,
                 relationships={"animal": hd.Pedigree.from_dataframe(pedigree)},
                 fixed_variances={"animal": 27, "residual": 66})
    for spec in ["animal=27, residual=66", str(tmp_path / "v.json")]:
        out = tmp_path / ("o" + str(len(spec)))
        code, _, err = run(["fit", "y ~ sex + hy + (1 | animal)", str(tmp_path / "rec.csv"),
                            "--pedigree", str(tmp_path / "ped.csv"), "--fixed-variances",
                            spec, "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
        assert json.loads((out / "summary.json").read_text())["sigma"] == pytest.approx(
            np.sqrt(66), rel=1e-12)
        table = pd.read_csv(out / "ranef_animal.csv", dtype={"animal": str}).set_index("animal")
        np.testing.assert_allclose(table["(Intercept)"],
                                   api.ranef["animal"]["(Intercept)"], rtol=1e-8)


def _write_relationship(path, labels, matrix, corner="id"):
    pd.DataFrame(matrix, index=pd.Index(labels, name=corner), columns=labels).to_csv(path)


def test_relationship_file_gives_the_pedigree_fit(tmp_path, capsys):
    pedigree, records = _padded_animal_files(tmp_path)
    ped = hd.Pedigree.from_dataframe(pedigree)
    covariance = np.linalg.inv(ped.inverse().toarray())
    _write_relationship(tmp_path / "A.csv", list(ped.ids), covariance)
    read = read_relationship(str(tmp_path / "A.csv"))
    assert list(read.labels[:2]) == list(ped.ids[:2]) and read.labels[0].startswith("0")
    code, _, err = run(["fit", "y ~ sex + hy + (1 | animal)", str(tmp_path / "rec.csv"),
                        "--relationship", f"animal={tmp_path / 'A.csv'}", "--out",
                        str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    api = hd.lmm("y ~ sex + hy + (1 | animal)", records, relationships={"animal": ped})
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(api.objective, rel=1e-8)


# ---------------------------------------------------------------- the results folder
def _fit_into(folder, formula, data_file, capsys, *options):
    code, _, err = run(["fit", formula, str(data_file), "--out", str(folder), "--quiet",
                        *options], capsys)
    assert code == 0, err
    return sorted(p.name for p in folder.iterdir())


def test_a_second_run_leaves_no_stale_results(tmp_path, capsys):
    data = hd.datasets.load("sleepstudy").assign(Week=lambda d: (d["Days"] // 5).astype(str))
    data.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "out"
    first = _fit_into(out, "Reaction ~ Days + (1 | Subject) + (1 | Week)", tmp_path / "d.csv",
                      capsys)
    assert first == ["fixef.csv", MANIFEST, "ranef_Subject.csv", "ranef_Week.csv",
                     "summary.json", "varcorr.csv"]
    # a later fit with one term fewer, as Parquet: no CSV and no ranef_Week remain
    second = _fit_into(out, "Reaction ~ Days + (1 | Subject)", tmp_path / "d.csv", capsys,
                       "--format", "parquet")
    assert second == ["fixef.parquet", MANIFEST, "ranef_Subject.parquet", "summary.json",
                      "varcorr.parquet"]
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == [
        n for n in second if n != MANIFEST]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranef_files"] == {"Subject": "ranef_Subject.parquet"}


def test_a_folder_with_other_files_is_refused_before_the_fit(tmp_path, capsys):
    hd.datasets.load("sleepstudy").to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "fixef.csv").write_text("from an older henderson, unlisted")
    code, stdout, err = run(["fit", "Reaction ~ Days + (1 | Subject)", str(tmp_path / "d.csv"),
                             "--out", str(out), "--quiet"], capsys)
    assert code == 2 and stdout == ""  # refused before fitting: no summary printed
    assert len(err) == 1 and "fixef.csv, notes.txt" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["fixef.csv", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    code, _, err = run(["fit", "Reaction ~ Days + (1 | Subject)", str(tmp_path / "d.csv"),
                        "--out", str(tmp_path / "file"), "--quiet"], capsys)
    assert code == 2 and "is a file, not a folder" in err[0]


def test_groups_whose_names_differ_by_punctuation_write_separate_tables(tmp_path, capsys):
    data = hd.datasets.load("pastes")
    data["batch_cask"] = data["batch"]  # another grouping, whose file name once clashed
    data.to_csv(tmp_path / "d.csv", index=False)
    formula = "strength ~ 1 + (1 | batch:cask) + (1 | batch_cask)"
    files = _fit_into(tmp_path / "o", formula, tmp_path / "d.csv", capsys)
    assert {"ranef_batch%3Acask.csv", "ranef_batch_cask.csv"} <= set(files)
    api = hd.lmm(formula, data)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    for group in ["batch:cask", "batch_cask"]:
        name = summary["ranef_files"][group]
        assert name == result_file_stem("ranef", group) + ".csv"
        assert unquote(name[len("ranef_"):-len(".csv")]) == group
        table = pd.read_csv(tmp_path / "o" / name, dtype={group: str}).set_index(group)
        np.testing.assert_allclose(table["(Intercept)"],
                                   api.ranef[group]["(Intercept)"], rtol=1e-6)
    assert result_file_stem("ranef", "a/b c%") == "ranef_a%2Fb%20c%25"


def test_a_failing_save_leaves_the_results_folder_as_it_was(tmp_path, capsys):
    data = hd.datasets.load("sleepstudy")
    data.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "out"
    _fit_into(out, "Reaction ~ Days + (1 | Subject)", tmp_path / "d.csv", capsys)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / ".henderson-staging-killed").mkdir()        # left by a run that was killed
    for folder in [out, tmp_path / "new"]:
        code, _, err = run(["fit", "Reaction ~ center(Days) + (Days | Subject)",
                            str(tmp_path / "d.csv"), "--out", str(folder), "--save",
                            str(tmp_path / "m.npz"), "--format", "parquet", "--quiet"], capsys)
        assert code == 2 and len(err) == 1 and "stateful transforms" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "m.npz").exists()


# ---------------------------------------------------------------- bad input, one line each
def _bad_input(tmp_path, case):
    """(argv, words the error line must hold) for one bad input."""
    data = hd.datasets.load("sleepstudy")
    good, formula = tmp_path / "d.csv", "Reaction ~ Days + (1 | Subject)"
    data.to_csv(good, index=False)
    data.to_parquet(tmp_path / "d.parquet")
    parquet = (tmp_path / "d.parquet").read_bytes()
    labels = [str(s) for s in sorted(data["Subject"].unique())]
    fit = ["fit", formula, str(good), "--quiet"]
    file = tmp_path / "bad"
    if case == "empty CSV":
        file.write_text("")
        return ["fit", formula, str(file), "--quiet"], [repr(str(file)), "empty"]
    if case == "header-only CSV":
        file.write_text("Reaction,Days,Subject\n")
        return ["fit", formula, str(file), "--quiet"], [repr(str(file)), "no rows"]
    if case in ("truncated Parquet", "truncated Parquet, chunked"):
        file = tmp_path / "bad.parquet"
        file.write_bytes(parquet[: len(parquet) // 2])
        chunked = ["--chunked"] if "chunked" in case else []
        return ["fit", formula, str(file), "--quiet", *chunked], [repr(str(file))]
    if case in ("Parquet bytes named .csv", "Parquet bytes named .csv, chunked"):
        file = tmp_path / "bad.csv"
        file.write_bytes(parquet)
        chunked = ["--chunked"] if "chunked" in case else []
        return ["fit", formula, str(file), "--quiet", *chunked], [repr(str(file)), "Parquet"]
    if case == "binary CSV":
        file.write_bytes(b"Reaction,Days\n\xff\xfe\x00\x81,1\n")
        return ["fit", formula, str(file), "--quiet"], [repr(str(file)), "UTF-8"]
    if case == "ragged CSV":
        file.write_text("Reaction,Days,Subject\n1,2,3\n1,2,3,4,5\n")
        return ["fit", formula, str(file), "--quiet"], [repr(str(file))]
    if case == "missing data file":
        return ["fit", formula, str(tmp_path / "none.csv"), "--quiet"], ["not found"]
    if case == "folder as data file":
        return ["fit", formula, str(tmp_path), "--quiet"], ["is a folder"]
    if case == "unknown column":
        return ["fit", "Reaction ~ Dayz + (1 | Subject)", str(good), "--quiet"], ["'Dayz'"]
    if case == "unknown weights column":
        return fit + ["--weights", "w"], ["'w'"]
    if case == "bad formula":
        return ["fit", "Reaction Days", str(good), "--quiet"], ["formula"]
    if case == "--fixed-variances not NAME=NUMBER":
        return fit + ["--fixed-variances", "Subject=big,residual=3"], ["--fixed-variances",
                                                                     "'Subject=big'"]
    if case == "--fixed-variances without residual":
        return fit + ["--fixed-variances", "Subject=3"], ["residual"]
    if case == "--fixed-variances unknown term":
        return fit + ["--fixed-variances", "Subjekt=3,residual=4"], ["Subject"]
    if case == "--fixed-variances JSON broken":
        (tmp_path / "v.json").write_text("{\"Subject\": 3,")
        return fit + ["--fixed-variances", str(tmp_path / "v.json")], ["v.json", "JSON"]
    if case == "--fixed-variances JSON a list":
        (tmp_path / "v.json").write_text("[3, 4]")
        return fit + ["--fixed-variances", str(tmp_path / "v.json")], ["v.json"]
    if case == "--relationship without =":
        return fit + ["--relationship", "Subject"], ["--relationship", "GROUP=FILE"]
    if case == "--relationship file missing":
        return fit + ["--relationship", f"Subject={tmp_path / 'K.csv'}"], ["not found"]
    if case == "--relationship not symmetric":
        matrix = np.eye(len(labels))
        matrix[0, 1] = 0.5
        _write_relationship(tmp_path / "K.csv", labels, matrix)
        return fit + ["--relationship", f"Subject={tmp_path / 'K.csv'}"], [
            "K.csv", "not symmetric", repr(labels[0])]
    if case == "--relationship not a number":
        frame = pd.DataFrame(np.eye(len(labels)), index=labels, columns=labels).astype(object)
        frame.iloc[2, 3] = "x"
        frame.to_csv(tmp_path / "K.csv")
        return fit + ["--relationship", f"Subject={tmp_path / 'K.csv'}"], [
            "K.csv", f"({labels[2]!r}, {labels[3]!r})", "'x'"]
    if case == "--relationship labels differ":
        _write_relationship(tmp_path / "K.csv", labels, np.eye(len(labels)))
        text = (tmp_path / "K.csv").read_text().splitlines()
        text[2] = "999" + text[2][text[2].index(","):]
        (tmp_path / "K.csv").write_text("\n".join(text))
        return fit + ["--relationship", f"Subject={tmp_path / 'K.csv'}"], [
            "K.csv", "same labels", "'999'"]
    if case == "--relationship not positive definite":
        _write_relationship(tmp_path / "K.csv", labels, np.ones((len(labels), len(labels))))
        return fit + ["--relationship", f"Subject={tmp_path / 'K.csv'}"], [
            "K.csv", "positive definite"]
    if case == "--relationship lacks a level":
        _write_relationship(tmp_path / "K.csv", labels[1:], np.eye(len(labels) - 1))
        return fit + ["--relationship", f"Subject={tmp_path / 'K.csv'}"], [labels[0]]
    if case == "--relationship for no term":
        _write_relationship(tmp_path / "K.csv", labels, np.eye(len(labels)))
        return fit + ["--relationship", f"Days={tmp_path / 'K.csv'}"], ["'Days'"]
    if case == "--pedigree empty":
        file.write_text("")
        return fit + ["--pedigree", str(file), "--animal", "Subject"], [repr(str(file)),
                                                                       "empty"]
    if case == "--animal without --pedigree":
        return fit + ["--animal", "Subject"], ["--pedigree"]
    if case == "--save is a folder":
        return fit + ["--save", str(tmp_path)], ["--save", "folder"]
    if case == "--save into no folder":
        return fit + ["--save", str(tmp_path / "no" / "m.npz")], ["--save", "folder"]
    if case == "predict: --out into no folder":
        hd.lmm(formula, data).save(tmp_path / "m.npz")
        return ["predict", str(tmp_path / "m.npz"), str(good), "--out",
                str(tmp_path / "no" / "p.csv")], ["--out", "folder"]
    if case == "--out is a file":
        return fit + ["--out", str(good)], ["--out", "not a folder"]
    if case == "bad --optimizer":
        return fit + ["--optimizer", "newtonian"], ["'newtonian'", "'newton'", "'lbfgs'",
                                                    "'bobyqa'", "'ai'"]
    if case == "bad --format":
        return fit + ["--format", "xlsx"], ["--format", "'xlsx'"]
    if case == "bad --chunk-rows":
        return fit + ["--chunked", "--chunk-rows", "-5"], ["--chunk-rows"]
    if case == "unknown option":
        return fit + ["--frobnicate"], ["--frobnicate"]
    if case == "no command":
        return [], ["command"]
    if case == "NaN in y":
        data.loc[3, "Reaction"] = np.nan
        data.to_csv(file, index=False)
        return ["fit", formula, str(file), "--quiet"], ["missing or infinite"]
    if case == "predict: truncated model":
        hd.lmm(formula, data).save(tmp_path / "m.npz")
        content = (tmp_path / "m.npz").read_bytes()
        (tmp_path / "m.npz").write_bytes(content[: len(content) - 100])
        return ["predict", str(tmp_path / "m.npz"), str(good)], ["m.npz"]
    if case == "predict: rows lack a column":
        hd.lmm(formula, data).save(tmp_path / "m.npz")
        data.drop(columns="Days").to_csv(file, index=False)
        return ["predict", str(tmp_path / "m.npz"), str(file)], ["'Days'"]
    if case == "predict: empty CSV":
        hd.lmm(formula, data).save(tmp_path / "m.npz")
        file.write_text("")
        return ["predict", str(tmp_path / "m.npz"), str(file)], [repr(str(file)), "empty"]
    raise AssertionError(case)


BAD_INPUTS = [
    "empty CSV", "header-only CSV", "truncated Parquet", "truncated Parquet, chunked",
    "Parquet bytes named .csv", "Parquet bytes named .csv, chunked", "binary CSV",
    "ragged CSV", "missing data file", "folder as data file", "unknown column",
    "unknown weights column", "bad formula", "NaN in y",
    "--fixed-variances not NAME=NUMBER", "--fixed-variances without residual",
    "--fixed-variances unknown term", "--fixed-variances JSON broken",
    "--fixed-variances JSON a list", "--relationship without =",
    "--relationship file missing", "--relationship not symmetric",
    "--relationship not a number", "--relationship labels differ",
    "--relationship not positive definite", "--relationship lacks a level",
    "--relationship for no term", "--pedigree empty", "--animal without --pedigree",
    "--save is a folder", "--save into no folder", "predict: --out into no folder",
    "--out is a file", "bad --optimizer", "bad --format",
    "bad --chunk-rows", "unknown option", "no command", "predict: truncated model",
    "predict: rows lack a column", "predict: empty CSV",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    argv, words = _bad_input(tmp_path, case)
    capsys.readouterr()
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("henderson: error: "), err
    assert "Traceback" not in err[0]
    for word in words:
        assert word in err[0], (word, err[0])


@pytest.mark.parametrize("case", ["truncated Parquet", "--relationship not a number",
                                  "unknown option"])
def test_bad_input_in_a_real_process(tmp_path, case):
    argv, words = _bad_input(tmp_path, case)
    proc = subprocess.run([sys.executable, "-m", "henderson", *argv], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("henderson: error: ")
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words)


def test_a_model_saved_into_the_results_folder_is_one_of_its_files(tmp_path, capsys):
    hd.datasets.load("sleepstudy").to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "out"
    for _ in range(2):  # the second run finds the first run's model listed, not foreign
        files = _fit_into(out, "Reaction ~ Days + (1 | Subject)", tmp_path / "d.csv",
                          capsys, "--save", str(out / "model.npz"))
        assert "model.npz" in files
        assert "model.npz" in json.loads((out / MANIFEST).read_text())["files"]
    files = _fit_into(out, "Reaction ~ Days + (1 | Subject)", tmp_path / "d.csv", capsys)
    assert "model.npz" not in files  # a run without --save leaves no stale model


def test_constant_response_is_an_error_not_minus_infinity(tmp_path, capsys):
    """The CLI exited 0 and wrote -Infinity into summary.json for a constant y."""
    data = hd.datasets.load("sleepstudy").assign(Reaction=250.0)
    data.to_csv(tmp_path / "d.csv", index=False)
    code, _, err = run(["fit", "Reaction ~ Days + (1 | Subject)", str(tmp_path / "d.csv"),
                        "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "constant" in err[0]
    assert not (tmp_path / "o" / "summary.json").exists()
