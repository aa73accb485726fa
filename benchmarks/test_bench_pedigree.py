"""Inbreeding and A⁻¹ of deep pedigrees: 20,000 generations (CI) or 100,000
(``HENDERSON_BENCH_SCALE=full``), where the time per animal of the ancestor-by-ancestor
method (Meuwissen & Luo) grows with the depth; the wide 1M-animal pedigree is in
``test_bench_animal.py``."""
import numpy as np
import pandas as pd
import pytest

import henderson as hd

from conftest import SCALE, run_once

GENERATIONS = {"ci": 20_000, "full": 100_000}[SCALE]


def chain(n_generations: int) -> pd.DataFrame:
    """One animal a generation: its sire is the animal before, its dam a new founder."""
    animal = np.char.add("c", np.arange(n_generations).astype(str))
    return pd.DataFrame({"animal": animal, "sire": np.concatenate([["0"], animal[:-1]]),
                         "dam": np.char.add("m", np.arange(n_generations).astype(str))})


def line(n_generations: int, width: int = 4, migrants: float = 0.25, seed: int = 1):
    """``width`` animals a generation, half of them males; sires are males of the
    generation before, dams its females or, for a ``migrants`` share, new founders
    (inbreeding levels off near 0.17)."""
    rng = np.random.default_rng(seed)
    n = n_generations * width
    ids = np.char.add("a", np.arange(n).astype(str))
    generation = np.repeat(np.arange(n_generations), width)
    first = (generation - 1) * width  # first animal of the generation before
    males = first + 2 * rng.integers(0, width // 2, n)
    females = first + 1 + 2 * rng.integers(0, width // 2, n)
    founder = generation == 0
    sire = np.where(founder, "0", ids[np.maximum(males, 0)])
    migrant = rng.random(n) < migrants
    dam = np.where(founder, "0",
                   np.where(migrant, np.char.add("m", np.arange(n).astype(str)),
                            ids[np.maximum(females, 0)]))
    return pd.DataFrame({"animal": ids, "sire": sire, "dam": dam})


@pytest.mark.parametrize("shape", ["chain", "line"])
def test_deep_pedigree_inbreeding_and_ainverse(benchmark, shape):
    frame = chain(GENERATIONS) if shape == "chain" else line(GENERATIONS)

    def build():
        ped = hd.Pedigree.from_dataframe(frame)
        return ped, ped.inverse()

    ped, ainv = run_once(benchmark, build)
    F = ped.inbreeding
    if shape == "chain":
        assert F.max() == 0.0 and len(ped) == 2 * GENERATIONS
    else:
        assert 0.1 < F[-1000:].mean() < 0.3
    assert ainv.shape == (len(ped),) * 2
    benchmark.extra_info.update(animals=len(ped), generations=GENERATIONS,
                                mean_inbreeding=float(F.mean()), ainv_nnz=int(ainv.nnz))
