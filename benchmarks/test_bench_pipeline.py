"""Out-of-core fit: a Parquet file (50 million rows at full scale) streamed through the
chunked path in a child process, whose peak resident memory is measured."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_once

from henderson.simulate import write_crossed_parquet

FORMULA = "y ~ x + (1 + x | g1) + (1 | g2)"
#: the issue's bound on peak memory for the 50M-row stream
PEAK_LIMIT_BYTES = 4 * 2**30

CHILD = """
import json, resource, sys, time
import henderson as hd
start = time.perf_counter()
m = hd.lmm(sys.argv[1], hd.chunked(sys.argv[2], chunk_rows=1_000_000))
print(json.dumps({"seconds": time.perf_counter() - start, "nobs": m.nobs,
                  "objective": m.objective, "sigma": m.sigma, "converged": m.converged,
                  "evaluations": m.n_evaluations, "timings": m.timings,
                  "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.fixture(scope="module")
def parquet_file(sizes, tmp_path_factory):
    folder = Path(os.environ.get("HENDERSON_BENCH_DATA", tmp_path_factory.mktemp("stream")))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crossed_{sizes['stream_rows']}_{sizes['stream_g1']}_{sizes['stream_g2']}.parquet"
    if not path.exists():
        write_crossed_parquet(path, sizes["stream_rows"], sizes["stream_g1"],
                              sizes["stream_g2"], seed=5)
    return path


def test_stream_parquet_out_of_core(benchmark, sizes, parquet_file):
    def fit():
        proc = subprocess.run([sys.executable, "-c", CHILD, FORMULA, str(parquet_file)],
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = run_once(benchmark, fit)
    assert result["nobs"] == sizes["stream_rows"] and result["converged"]
    assert result["sigma"] == pytest.approx(1.0, rel=0.01)
    assert result["peak_bytes"] < PEAK_LIMIT_BYTES
    benchmark.extra_info.update(
        rows=result["nobs"], fit_seconds=round(result["seconds"], 1),
        peak_gib=round(result["peak_bytes"] / 2**30, 2),
        evaluations=result["evaluations"],
        file_bytes=parquet_file.stat().st_size,
        **{k: round(v, 2) for k, v in result["timings"].items()})
