import subprocess
import sys

from henderson.cli import main


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
