"""henderson.threads: the thread count of a fit, and BLAS limited to it (issue 15)."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

import henderson as hd
from henderson import schur, threads
from henderson.cli import build_parser
from henderson.simulate import crossed
from henderson.threads import (ENVIRONMENT_VARIABLE, active_threads, available_cpus,
                               blas_thread_counts, blas_threads, cgroup_cpu_limit,
                               default_threads, fit_threads, resolve_threads)

INSTEVAL_LIKE = "y ~ x + (1 | g1) + (1 | g2)"


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: ``machine(cpus, quota, load, runnable)``."""
    def make(cpus=4, quota=None, load=0.0, runnable=0):
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(threads, "_QUOTA", [quota])
        monkeypatch.setattr(threads, "machine_load", lambda: (load, runnable))
        monkeypatch.setattr(threads, "own_share", lambda: (0.0, 0))
        monkeypatch.setattr(threads, "_BUSY", [float("-inf"), None, False])
    return make


@pytest.fixture(scope="module")
def crossed_data():
    # large enough that the block elimination splits its passes over two threads
    return crossed(15_000, 300, 100, seed=3)


# ----------------------------------------------------------------------------------
# resolution: argument > environment > affinity / cgroup / load


def test_argument_beats_environment_and_default(monkeypatch, machine):
    machine(cpus=4)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "3")
    assert resolve_threads(2) == 2
    assert resolve_threads() == 3
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    assert resolve_threads() == 4


def test_environment_with_spaces(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, " 5 ")
    assert resolve_threads() == 5


def test_empty_environment_is_unset(monkeypatch, machine):
    machine(cpus=3)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "")
    assert resolve_threads() == 3


@pytest.mark.parametrize("cpus, quota, expected", [
    (4, None, 4), (4, 1.5, 2), (4, 0.5, 1), (2, 8.0, 2), (1, None, 1), (8, 3.0, 3)],
    ids=["no-quota", "quota-1.5", "quota-0.5", "quota-above-affinity", "one-cpu",
         "quota-3"])
def test_available_cpus_from_affinity_and_quota(machine, cpus, quota, expected):
    machine(cpus=cpus, quota=quota)
    assert available_cpus() == expected
    assert default_threads() == expected


@pytest.mark.parametrize("load, runnable, busy", [
    (0.0, 0, False), (2.9, 2, False), (3.0, 0, True), (0.2, 3, True), (7.0, 5, True)],
    ids=["idle", "below", "load-average", "runnable-now", "both"])
def test_busy_machine_gets_one_blas_thread(machine, load, runnable, busy):
    machine(cpus=4, load=load, runnable=runnable)
    assert threads.machine_is_busy() is busy
    assert default_threads() == 4  # our own threads keep the CPUs
    assert threads.default_blas_threads(4) == (1 if busy else 4)
    assert threads.default_blas_threads(1) == 1


def test_two_cpus_busy_from_one_busy_core(machine):
    machine(cpus=2, load=1.0)
    assert threads.default_blas_threads(2) == 1
    machine(cpus=2, load=0.5, runnable=0)
    assert threads.default_blas_threads(2) == 2
    machine(cpus=2, load=0.5, runnable=1)
    assert threads.default_blas_threads(2) == 1


def test_default_fit_on_a_busy_machine(machine, monkeypatch):
    _libraries_present()
    machine(cpus=2, load=5.0)
    with fit_threads() as count:
        assert count == 2 and active_threads() == 2
        assert set(blas_thread_counts().values()) == {1}
    with fit_threads(2):  # asked for: BLAS gets it, busy or not
        assert set(blas_thread_counts().values()) == {2}
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "2")
    with fit_threads():
        assert set(blas_thread_counts().values()) == {2}


def test_own_threads_and_load_are_not_a_busy_neighbour(machine, monkeypatch):
    """What this process adds to the machine's load is not other work: its own
    runnable threads (OpenBLAS's spinning workers: a fresh process's first fit took
    them for a neighbour) and its own share of the load average."""
    machine(cpus=2, load=0.2, runnable=1)
    monkeypatch.setattr(threads, "own_share", lambda: (0.0, 1))
    assert not threads.machine_is_busy()
    machine(cpus=2, load=1.3, runnable=0)
    monkeypatch.setattr(threads, "own_share", lambda: (0.9, 0))
    assert not threads.machine_is_busy()          # 0.4 of the load is someone else's
    machine(cpus=2, load=2.1, runnable=0)
    monkeypatch.setattr(threads, "own_share", lambda: (0.9, 0))
    assert threads.machine_is_busy()              # 1.2 is


def test_a_fit_in_another_thread_of_this_process_is_a_neighbour(machine):
    """Fits in threads of one process (a Dask worker, a thread pool): their threads
    are this process's own, so the second fit sees the first through fit_threads'
    count and runs BLAS on one thread, on an idle machine."""
    import threading

    _libraries_present()
    machine(cpus=2, load=0.0, runnable=0)
    entered, release = threading.Event(), threading.Event()

    def first_fit():
        with fit_threads():
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=first_fit)
    worker.start()
    try:
        entered.wait(10)
        with fit_threads() as count:
            assert count == 2
            assert set(blas_thread_counts().values()) == {1}
    finally:
        release.set()
        worker.join()
    assert threads._FITS[0] == 0
    before = blas_thread_counts()
    with fit_threads():       # alone again: BLAS keeps up to both threads
        assert blas_thread_counts() == {lib: min(2, n) for lib, n in before.items()}


def test_own_share_counts_this_process_threads():
    """A thread of this process busy in NumPy (the GIL released) is runnable, and it
    is counted as this process's; a second reading's share of the load follows the
    CPU this process used since the first."""
    import threading
    import time

    stop = threading.Event()
    started = threading.Event()

    def busy():
        a = np.random.default_rng(0).random((300, 300))
        started.set()
        while not stop.is_set():
            np.linalg.eigvalsh(a)

    with blas_threads(1):
        worker = threading.Thread(target=busy)
        worker.start()
        started.wait()
        try:
            seen = 0
            for _ in range(20):
                share, runnable = threads.own_share()
                seen = max(seen, runnable)
                time.sleep(0.01)
        finally:
            stop.set()
            worker.join()
    assert seen >= 1
    assert 0.0 < share < os.cpu_count() + 1


def test_machine_load_reads_proc():
    load, runnable = threads.machine_load()
    assert load >= 0.0 and runnable >= 0


def test_a_reading_stands_briefly(machine, monkeypatch):
    machine(cpus=2, load=5.0)
    assert threads.machine_is_busy()
    monkeypatch.setattr(threads, "machine_load", lambda: (0.0, 0))
    assert threads.machine_is_busy()  # within BUSY_RECHECK: the last reading
    monkeypatch.setattr(threads, "_BUSY", [float("-inf"), None, False])
    assert not threads.machine_is_busy()


# ----------------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError),
    (True, TypeError), (2.0, TypeError)],
    ids=["zero", "negative", "float", "string", "bool", "whole-float"])
def test_bad_threads_argument(value, error):
    with pytest.raises(error, match="threads must be a positive whole number or None"):
        resolve_threads(value)


def test_numpy_integer_is_accepted():
    assert resolve_threads(np.int64(2)) == 2


@pytest.mark.parametrize("text", ["abc", "0", "-1", "1.5"])
def test_bad_environment_variable(monkeypatch, text):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, text)
    with pytest.raises(ValueError, match=f"{ENVIRONMENT_VARIABLE} must be a positive "
                                         f"whole number, got '{text}'"):
        resolve_threads()


def test_lmm_rejects_bad_threads_before_fitting(monkeypatch):
    called = []
    monkeypatch.setattr(hd.fit, "build_design", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="threads must be a positive whole number"):
        hd.lmm("Reaction ~ Days + (1 | Subject)", hd.datasets.load("sleepstudy"),
               threads=0)
    assert not called


def test_cli_threads_option():
    parser = build_parser()
    assert parser.parse_args(["fit", "y ~ 1 + (1 | g)", "d.csv", "--threads", "2"]).threads == 2
    assert parser.parse_args(["fit", "y ~ 1 + (1 | g)", "d.csv"]).threads is None
    assert parser.parse_args(["gwas", "y ~ 1", "d.csv", "--bfile", "x", "--out", "o.csv",
                              "--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "y ~ 1 + (1 | g)", "d.csv", "--threads", "0"])


# ----------------------------------------------------------------------------------
# cgroup quota files


@pytest.mark.parametrize("text, expected", [
    ("max 100000", None), ("150000 100000", 1.5), ("200000 100000\n", 2.0),
    ("50000 100000", 0.5), ("max", None), ("garbage 100000", None)],
    ids=["v2-no-quota", "v2-1.5", "v2-2", "v2-0.5", "v2-max-only", "v2-garbage"])
def test_cgroup_v2(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_limit(str(tmp_path)) == expected


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize("quota, period, expected", [
    ("-1", "100000", None), ("150000", "100000", 1.5), ("300000", "100000", 3.0),
    ("100000", "0", None)],
    ids=["v1-no-quota", "v1-1.5", "v1-3", "v1-zero-period"])
def test_cgroup_v1(tmp_path, folder, quota, period, expected):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / folder / "cpu.cfs_period_us").write_text(period + "\n")
    assert cgroup_cpu_limit(str(tmp_path)) == expected


def test_no_cgroup_files(tmp_path):
    assert cgroup_cpu_limit(str(tmp_path)) is None


def test_cgroup_v2_wins_over_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(str(tmp_path)) == 1.0


# ----------------------------------------------------------------------------------
# the limits during and after a fit


def _libraries_present():
    if not blas_thread_counts():
        pytest.skip("threadpoolctl finds no BLAS library")


def test_fit_threads_sets_and_restores():
    _libraries_present()
    before = blas_thread_counts()
    with fit_threads(1) as count:
        assert count == 1 and active_threads() == 1
        assert set(blas_thread_counts().values()) == {1}
    assert blas_thread_counts() == before


def test_fit_threads_restores_after_an_error():
    _libraries_present()
    before = blas_thread_counts()
    with pytest.raises(RuntimeError):
        with fit_threads(1):
            raise RuntimeError("inside")
    assert blas_thread_counts() == before


def test_nested_fit_keeps_the_outer_count(machine):
    machine(cpus=4)
    with fit_threads(1):
        with fit_threads() as inner:
            assert inner == 1 and active_threads() == 1
            assert set(blas_thread_counts().values()) <= {1}


def test_default_does_not_raise_a_lower_blas_limit(machine):
    _libraries_present()
    machine(cpus=2)
    with blas_threads(1):
        with fit_threads() as count:
            assert count == 2
            assert set(blas_thread_counts().values()) == {1}
        with fit_threads(2):  # asked for: raised
            assert set(blas_thread_counts().values()) == {2}
        assert set(blas_thread_counts().values()) == {1}


def test_blas_limits_restored_after_a_fit():
    _libraries_present()
    before = blas_thread_counts()
    hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"), threads=1)
    assert blas_thread_counts() == before
    with pytest.raises(hd.FormulaError):
        hd.lmm("Reaction ~ Days + (1 | nothere)", hd.datasets.load("sleepstudy"), threads=1)
    assert blas_thread_counts() == before


@pytest.mark.parametrize("count", [1, 2])
def test_limit_holds_inside_the_fit(monkeypatch, crossed_data, count):
    _libraries_present()
    seen, split = [], []
    factorize = schur.BlockElimination.factorize

    def spy(self):
        seen.append((active_threads(), set(blas_thread_counts().values())))
        split.append(self._row_split)
        return factorize(self)

    monkeypatch.setattr(schur.BlockElimination, "factorize", spy)
    before = blas_thread_counts()
    hd.lmm(INSTEVAL_LIKE, crossed_data, threads=count)
    assert seen and all(s == (count, {count}) for s in seen)
    assert split[0] is not None  # a design big enough for the threaded passes
    assert blas_thread_counts() == before


def test_own_threads_only_when_allowed(monkeypatch, crossed_data):
    calls = []
    two = schur._in_two_threads
    monkeypatch.setattr(schur, "_in_two_threads",
                        lambda a, b: calls.append(active_threads()) or two(a, b))
    hd.lmm(INSTEVAL_LIKE, crossed_data, threads=1)
    assert calls == []
    hd.lmm(INSTEVAL_LIKE, crossed_data, threads=2)
    assert calls and set(calls) == {2}


def test_one_and_two_threads_give_the_same_estimates(crossed_data):
    # AI-REML, as InstEval: our own threads give bit-identical passes, and OpenBLAS on
    # two threads rounds differently by ~1e-16, which Newton steps do not amplify
    # (BOBYQA's stopping rule turns it into ~5e-9 on θ for this model)
    one = hd.lmm(INSTEVAL_LIKE, crossed_data, threads=1, optimizer="ai")
    two = hd.lmm(INSTEVAL_LIKE, crossed_data, threads=2, optimizer="ai")
    assert one.mme.factorization.name == "schur"
    assert abs(one.objective - two.objective) <= 1e-10 * abs(one.objective)
    np.testing.assert_allclose(two.ranef["g1"].to_numpy(), one.ranef["g1"].to_numpy(),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(two.theta, one.theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.fixef, one.fixef, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-10)


def test_refit_keeps_threads(monkeypatch):
    m = hd.lmm("Reaction ~ Days + (1 | Subject)", hd.datasets.load("sleepstudy"),
               threads=1)
    assert m.call["threads"] == 1
    seen = []
    factorize = hd.MixedModelEquations.factorize
    monkeypatch.setattr(hd.MixedModelEquations, "factorize",
                        lambda self, theta: seen.append(active_threads())
                        or factorize(self, theta))
    m.refit(reml=False)
    assert seen and set(seen) == {1}


def test_environment_sets_the_fit(monkeypatch, crossed_data):
    _libraries_present()
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    seen = []
    factorize = schur.BlockElimination.factorize
    monkeypatch.setattr(schur.BlockElimination, "factorize",
                        lambda self: seen.append(set(blas_thread_counts().values()))
                        or factorize(self))
    hd.lmm(INSTEVAL_LIKE, crossed_data)
    assert seen and all(s == {1} for s in seen)


# ----------------------------------------------------------------------------------
# bootstrap replicates: n_jobs capped by the thread count, one BLAS thread each


class _CountingPool(concurrent.futures.ThreadPoolExecutor):
    created: list = []

    def __init__(self, workers, *args, **kwargs):
        _CountingPool.created.append(workers)
        super().__init__(workers, *args, **kwargs)


def test_bootstrap_respects_the_thread_count(monkeypatch):
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", _CountingPool)
    _CountingPool.created = []
    m = hd.lmm("Reaction ~ Days + (1 | Subject)", hd.datasets.load("sleepstudy"))
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    single = hd.bootstrap.bootstrap(m, n=4, seed=1, n_jobs=2)
    assert _CountingPool.created == []
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "2")
    seen = []
    evaluate = hd.Objective.evaluate
    monkeypatch.setattr(hd.Objective, "evaluate", lambda self, *a, **k: seen.append(
        (active_threads(), set(blas_thread_counts().values()))) or evaluate(self, *a, **k))
    parallel = hd.bootstrap.bootstrap(m, n=4, seed=1, n_jobs=2)
    assert _CountingPool.created == [2]
    assert seen and all(s[0] == 1 and s[1] <= {1} for s in seen)
    np.testing.assert_allclose(parallel.to_numpy(), single.to_numpy(), rtol=1e-10)


# ----------------------------------------------------------------------------------
# large dense SYRK / Cholesky: one BLAS thread where OpenBLAS's threaded SYRK crashes


def test_dense_blas_threads_limits_only_large_results():
    from henderson.threads import LARGE_DENSE_BYTES, dense_blas_threads

    first64 = int(np.ceil(np.sqrt(LARGE_DENSE_BYTES / 8)))
    first32 = int(np.ceil(np.sqrt(LARGE_DENSE_BYTES / 4)))
    with fit_threads(2):
        outside = blas_thread_counts()
        assert max(outside.values()) == 2
        with dense_blas_threads(first64 - 1):
            assert blas_thread_counts() == outside
        with dense_blas_threads(first64):
            assert set(blas_thread_counts().values()) == {1}
        with dense_blas_threads(first64, itemsize=4):
            assert blas_thread_counts() == outside
        with dense_blas_threads(first32, itemsize=4):
            assert set(blas_thread_counts().values()) == {1}
        assert blas_thread_counts() == outside


_LARGE_CHOLESKY = """
import numpy as np
import pandas as pd
from henderson.single_step import _cholesky_in_place
from henderson.threads import blas_thread_counts
n = {n}
assert max(blas_thread_counts().values()) == 2
A = np.full((n, n), 0.5, order="F")            # 0.5 J + 0.5 I: positive definite
A[np.diag_indices(n)] += 0.5
L = _cholesky_in_place(A, "A", pd.RangeIndex(n), "")
print("ok", repr(float(L[n - 1, n - 1])))
"""


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for two BLAS threads")
def test_large_dense_cholesky_does_not_crash_on_two_blas_threads():
    """dpotrf of order 16,000 on two OpenBLAS threads crashed with a segmentation fault
    here (single_step at 20,000 genotyped animals); the guard runs it on one."""
    available = threads.available_memory()  # MemAvailable: counts reclaimable cache
    if not 6e9 <= available < float("inf"):  # inf: /proc/meminfo unreadable
        pytest.skip("needs 6 GB of free memory")
    n = 16_000
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", HENDERSON_THREADS="2")
    run = subprocess.run([sys.executable, "-c", _LARGE_CHOLESKY.format(n=n)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    # a J + b I with a = b = 1/2: the last pivot is sqrt(b (1 + n a / b) / (1 + (n-1) a / b))
    last = float(run.stdout.split()[-1])
    assert abs(last - np.sqrt(0.5 * (1 + n) / n)) < 1e-10


def test_pevs_after_the_fit_keep_the_fit_thread_rule(machine, monkeypatch):
    """The selected inverse behind PEVs and conditional variances runs after the fit,
    when the user asks for them: on a busy machine it too gets one BLAS thread (on two
    beside a busy process its dpotri took 40-75 s instead of 3.5 s at 200,000 animals)."""
    _libraries_present()
    model = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
    seen = []
    original = type(model.mme).selected_inverse

    def recording(self, *args, **kwargs):
        seen.append(set(blas_thread_counts().values()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.mme), "selected_inverse", recording)
    machine(cpus=2, load=5.0)
    before = blas_thread_counts()
    model.prediction_error_variances
    model._compute_conditional_variances()
    assert seen == [{1}, {1}]
    assert blas_thread_counts() == before
