"""Saved models: no pickle, the same estimates, predictions equal to the fitted model's."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pytest

import henderson as hd
from henderson.errors import DataError
from henderson.persist import write_atomically

MODELS = [
    ("plants", "height ~ moisture + (1 | pot)"),
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("insteval", "y ~ service * dept + (1 | s) + (1 | d)"),
    ("pastes", "strength ~ 1 + (1 | batch/cask)"),
]


@pytest.mark.parametrize("name,formula", MODELS, ids=[m[0] for m in MODELS])
def test_loaded_model_predicts_as_the_fitted_one(tmp_path, name, formula):
    data = hd.datasets.load(name)
    model = hd.lmm(formula, data)
    path = model.save(tmp_path / "model.henderson")
    assert path.name == "model.henderson"  # the name given, no suffix added
    saved = hd.load(path)
    np.testing.assert_array_equal(saved.predict(data), model.predict(data))
    np.testing.assert_allclose(saved.predict(data), model.fitted, rtol=1e-12)
    np.testing.assert_array_equal(saved.predict(data, re=False),
                                  model.predict(data, re=False))
    pd.testing.assert_series_equal(saved.fixef, model.fixef)
    pd.testing.assert_frame_equal(saved.vcov, model.vcov)
    pd.testing.assert_frame_equal(saved.varcorr, model.varcorr)
    for group in model.ranef:
        pd.testing.assert_frame_equal(saved.ranef[group], model.ranef[group])
        pd.testing.assert_frame_equal(saved.ranef_sd[group], model.ranef_sd[group])
    assert saved.objective == model.objective and saved.nobs == model.nobs
    np.testing.assert_array_equal(saved.theta, model.theta)
    assert "Fixed effects" in saved.summary() and model.design.formula.text in saved.summary()


def test_saved_file_holds_no_pickled_objects(tmp_path):
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    path = model.save(tmp_path / "m.npz", conditional_sd=False)
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            header = archive.read(member)[:10]
            assert header.startswith(b"\x93NUMPY")
    with np.load(path, allow_pickle=False) as arrays:  # would raise on an object array
        assert all(arrays[key].dtype != object for key in arrays.files)
    assert hd.load(path).ranef_sd == {}


def test_new_levels_and_unseen_categories():
    data = hd.datasets.load("insteval").iloc[:5000]
    model = hd.lmm("y ~ service + (1 | s) + (1 | d)", data)
    new = data.iloc[:3].copy()
    new["s"] = new["s"].astype(str) + "-new"     # new student: population prediction for s
    expected = model.predict(new, allow_new_levels=True)
    import os
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "m.npz")
    model.save(path)
    saved = hd.load(path)
    np.testing.assert_allclose(saved.predict(new, allow_new_levels=True), expected, rtol=1e-12)
    with pytest.raises(DataError, match="allow_new_levels"):
        saved.predict(new)
    bad = data.iloc[:3].assign(service=["0", "1", "7"])
    with pytest.raises(DataError, match="'service' has value\\(s\\) not seen in the fit: '7'"):
        saved.predict(bad)
    with pytest.raises(hd.FormulaError, match="'service'"):
        saved.predict(data[["s", "d", "y"]])


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        hd.load(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match="not a saved henderson model"):
        hd.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(DataError, match="no header"):
        hd.load(tmp_path / "other.npz")


def test_stateful_transforms_are_refused_clearly(tmp_path):
    data = hd.datasets.load("sleepstudy")
    model = hd.lmm("Reaction ~ center(Days) + (1 | Subject)", data)
    with pytest.raises(hd.FormulaError, match="stateful transforms"):
        model.save(tmp_path / "m.npz")


def test_chunked_fit_saves_and_loads(tmp_path):
    data = hd.datasets.load("sleepstudy")
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.chunked(data, chunk_rows=45))
    saved = hd.load(model.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(saved.predict(data), model.predict(data))


# ---------------------------------------------------------------- atomic saves
SAVER = r"""
import json, os, sys
import numpy as np, pandas as pd
import henderson as hd

path = sys.argv[1]
rng = np.random.default_rng(0)
g = rng.integers(0, 20_000, 40_000)
data = pd.DataFrame({"y": rng.normal(size=20_000)[g] + rng.normal(size=len(g)),
                     "g": g.astype(str)})
models = [hd.lmm("y ~ 1 + (1 | g)", data, fixed_variances={"g": v, "residual": 1.0})
          for v in (0.5, 2.0)]
for m in models:           # the conditional SDs are computed here, once
    m.save(path)
print(json.dumps([m.objective for m in models]), flush=True)
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:           # saves, alternately the two models, until it is killed
        i = 0
        while True:
            models[i % 2].save(path)
            i += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_model(tmp_path):
    # One process fits the two models; each round forks a saver from it and kills it
    # with SIGKILL after a random delay, then the file must load as one of the two.
    path = tmp_path / "m.npz"
    env = dict(os.environ)
    server = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        objectives = json.loads(server.stdout.readline())
        assert objectives[0] != objectives[1]
        delays = np.random.default_rng(1).uniform(0.0, 0.25, 15)
        seen, killed_mid_write = set(), 0
        for delay in delays:
            server.stdin.write("\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            leftovers = list(tmp_path.glob(".m.npz.*.tmp"))
            killed_mid_write += len(leftovers)
            for leftover in leftovers:
                leftover.unlink()
            loaded = hd.load(path)
            assert loaded.objective in objectives
            seen.add(loaded.objective)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
    # the rounds did interrupt writes (else the test proves nothing) and both
    # models were the file's content at some kill
    assert killed_mid_write >= 1
    assert seen == set(objectives)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    data = hd.datasets.load("sleepstudy")
    path = hd.lmm("Reaction ~ Days + (Days | Subject)", data).save(tmp_path / "m.npz")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="stateful transforms"):
        hd.lmm("Reaction ~ center(Days) + (1 | Subject)", data).save(path)
    assert path.read_bytes() == before
    with pytest.raises(ZeroDivisionError):
        write_atomically(path, lambda handle: (handle.write(b"half"), 1 / 0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_save_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    model = hd.lmm("height ~ moisture + (1 | pot)", hd.datasets.load("plants"))
    path = model.save(tmp_path / "m.npz")
    path.chmod(0o640)
    model.save(path)
    assert path.stat().st_mode & 0o777 == 0o640
    link = tmp_path / "link.npz"
    link.symlink_to(path)
    model.save(link)
    assert link.is_symlink() and hd.load(link).objective == model.objective


# ---------------------------------------------------------------- damaged or crafted files
def _members(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _header(members) -> dict:
    return json.loads(str(members["header"]))


def _with_header(members, **changes) -> dict:
    header = _header(members)
    header.update(changes)
    return {**members, "header": np.array(json.dumps(header))}


def _with_term(members, **changes) -> dict:
    header = _header(members)
    header["terms"][0].update(changes)
    return {**members, "header": np.array(json.dumps(header))}


def _without(members, key) -> dict:
    return {k: v for k, v in members.items() if k != key}


CRAFTED = {
    "header not JSON": (lambda m: {**m, "header": np.array("{format: henderson")},
                        "not valid JSON"),
    "header a number": (lambda m: {**m, "header": np.array(3.0)}, "header is not a string"),
    "header a JSON list": (lambda m: {**m, "header": np.array("[1, 2]")}, "format"),
    "other format": (lambda m: _with_header(m, format="other"), "format"),
    "version a string": (lambda m: _with_header(m, version="1"), "format version"),
    "no terms": (lambda m: {**m, "header": np.array(json.dumps(
        {k: v for k, v in _header(m).items() if k != "terms"}))}, "lacks 'terms'"),
    "fixed_names not strings": (lambda m: _with_header(m, fixed_names=[1, 2]),
                                "'fixed_names'"),
    "one fixed name too many": (lambda m: _with_header(
        m, fixed_names=_header(m)["fixed_names"] + ["x"]), "'fixef'"),
    "term without coef_names": (lambda m: _with_term(m, coef_names=None), "'coef_names'"),
    "a coefficient too many": (lambda m: _with_term(
        m, coef_names=_header(m)["terms"][0]["coef_names"] + ["x"], parameters=None),
        "'ranef_0'"),
    "a coefficient too many for the parameters": (lambda m: _with_term(
        m, coef_names=_header(m)["terms"][0]["coef_names"] + ["x"]), "parameters"),
    "factor not of its group": (lambda m: _with_term(m, factors=["other"]), "factors"),
    "nobs a float": (lambda m: _with_header(m, nobs=180.0), "'nobs'"),
    "no fixef": (lambda m: _without(m, "fixef"), "no 'fixef' array"),
    "vcov integers": (lambda m: {**m, "vcov": m["vcov"].astype(int)}, "'vcov'"),
    "levels numbers": (lambda m: {**m, "levels_0": np.arange(18.0)}, "'levels_0'"),
    "a level too few": (lambda m: {**m, "levels_0": m["levels_0"][:-1]}, "'ranef_0'"),
    "levels repeat": (lambda m: {**m, "levels_0": np.repeat(m["levels_0"][:9], 2)}, "repeat"),
    "ranef transposed": (lambda m: {**m, "ranef_0": m["ranef_0"].T.copy()}, "'ranef_0'"),
    "sd of a term missing": (lambda m: _without(m, "ranef_sd_0"), "some terms only"),
    "extra array": (lambda m: {**m, "extra": np.zeros(2)}, "unexpected array"),
    "code in a formula": (lambda m: _with_header(
        m, fixed="Days + {__import__('os').system('touch PWNED')}"), "may not evaluate"),
    "attribute in a formula": (lambda m: _with_term(
        m, covariates="1 + np.log.__call__(Days)"), "may not evaluate"),
    "a call not allowed": (lambda m: _with_header(m, fixed="Days + I(open('x'))"),
                           "may not evaluate"),
    "response in the fixed part": (lambda m: _with_header(m, fixed="y ~ Days"),
                                   "right-hand side"),
    # a reviewer's crafted files that loaded, then crashed in summary() or showed
    # made-up residual groups
    "parameters without sd": (lambda m: _with_term(m, parameters={"structure": "us"}),
                              "parameters"),
    "sd ragged": (lambda m: _with_term(m, parameters={"structure": "us", "sd": [[1, 2], [3]],
                                                      "corr": [[1.0]]}), "'sd'"),
    "sd null": (lambda m: _with_term(m, parameters={"structure": "us", "sd": None,
                                                    "corr": [[1.0]]}), "'sd'"),
    "structure unknown": (lambda m: _with_term(m, structure="zzz", parameters={
        "structure": "zzz", "sd": [1.0]}), "unknown structure"),
    "residual groups without a dispformula": (lambda m: _with_header(
        m, residual_groups={"M": 2.0, "F": 1.0}), "no dispformula"),
    "residual groups not numbers": (lambda m: _with_header(
        m, dispformula="~ Sex", dispersion={"(Intercept)": 1.0},
        residual_groups={"M": "x"}), "'residual_groups'"),
    "residual variance negative": (lambda m: _with_header(
        m, dispformula="~ Sex", dispersion={"(Intercept)": 1.0},
        residual_groups={"M": -1.0}), "'residual_groups'"),
}


@pytest.fixture(scope="module")
def sleep_model():
    data = hd.datasets.load("sleepstudy")
    # two terms, so that one term's conditional SDs can go missing
    return hd.lmm("Reaction ~ Days + (Days || Subject)", data), data


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_archives_are_refused_naming_the_file(tmp_path, sleep_model, case, monkeypatch):
    model, _ = sleep_model
    good = model.save(tmp_path / "good.npz")
    craft, message = CRAFTED[case]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **craft(_members(good)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=re.escape(repr(str(bad)))) as info:
        hd.load(bad)
    assert message in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_expressions_a_saved_model_may_hold_still_load(tmp_path):
    data = hd.datasets.load("sleepstudy").assign(w=lambda d: d["Days"] % 3 + 1.0)
    model = hd.lmm("Reaction ~ np.log(Days + 1) + I(Days ** 2) + {Days * 2} + "
                   "(log(w) | Subject)", data)
    saved = hd.load(model.save(tmp_path / "m.npz"))
    np.testing.assert_allclose(saved.predict(data), model.predict(data), rtol=1e-12)


def test_truncated_archives_are_refused_naming_the_file(tmp_path, sleep_model):
    model, data = sleep_model
    content = model.save(tmp_path / "good.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    for size in [0, 1, 30, *np.linspace(100, len(content) - 1, 12).astype(int)]:
        bad.write_bytes(content[:size])
        with pytest.raises(DataError, match=re.escape(repr(str(bad)))):
            hd.load(bad)
    import zipfile
    with zipfile.ZipFile(tmp_path / "good.npz") as archive:  # the largest member's data
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    local_header = 30 + len(member.filename.encode()) + len(member.extra)
    flipped = bytearray(content)
    flipped[member.header_offset + local_header + member.compress_size // 2] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="damaged"):
        hd.load(bad)


def test_a_folder_or_an_npy_file_is_not_a_model(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        hd.load(tmp_path)
    np.save(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(DataError, match="not an .npz archive"):
        hd.load(tmp_path / "a.npy")


def test_structures_and_residual_variances_survive_a_save(tmp_path):
    """A dispformula model loaded back showed one Residual row (2.788: the Female
    0.610 was gone) and had no covariance_parameters, dispersion or
    residual_variances; summary() lost the structures' line."""
    orthodont = hd.datasets.load("orthodont")
    fitted = hd.lmm("distance ~ age * Sex + (1 | Subject)", orthodont, dispformula="~ Sex")
    fitted.save(tmp_path / "o.npz")
    loaded = hd.load(tmp_path / "o.npz")
    pd.testing.assert_frame_equal(loaded.varcorr, fitted.varcorr)
    pd.testing.assert_series_equal(loaded.residual_variances, fitted.residual_variances)
    pd.testing.assert_series_equal(loaded.dispersion, fitted.dispersion)
    assert "Female" in loaded.summary() and "Dispersion model ~ Sex" in loaded.summary()
    machines = hd.datasets.load("machines")
    for formula in ("score ~ Machine + cs(0 + Machine | Worker)",
                    "score ~ Machine + toep(0 + Machine | Worker)"):
        fitted = hd.lmm(formula, machines)
        fitted.save(tmp_path / "m.npz")
        loaded = hd.load(tmp_path / "m.npz")
        expected = fitted.covariance_parameters["Worker"]
        got = loaded.covariance_parameters[formula.split(" + ", 1)[1]]  # by the term's text
        assert got["structure"] == expected["structure"]
        np.testing.assert_allclose(got["sd"], expected["sd"], rtol=1e-12)
        np.testing.assert_allclose(got["rho"], expected["rho"], rtol=1e-12)
        # no dispformula: log σ², glmmTMB's dispersion intercept
        assert loaded.dispersion.to_dict() == pytest.approx(
            {"(Intercept)": 2 * np.log(fitted.sigma)}, rel=1e-12)
        pd.testing.assert_series_equal(loaded.dispersion, fitted.dispersion)
        line = [x for x in fitted.summary().splitlines() if x.startswith(" Worker:")]
        assert line and line[0] in loaded.summary()
