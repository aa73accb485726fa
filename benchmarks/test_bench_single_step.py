"""Single-step GBLUP benchmarks: H⁻¹ (``hd.single_step``), BLUP with known variances and
the PEVs of every animal on a simulated population (1,000,000 animals, 20,000 genotyped
for 50,000 SNPs at full scale), H⁻¹ with APY, and, for 60,000 genotyped animals, APY's
H⁻¹ as an operator with BLUP by PCG and approximate PEVs.

Genotypes are simulated by gene dropping through the genotyped animals' ancestors:
founder haplotypes from allele frequencies drawn from a Beta(2, 2) (in 1/256 steps),
each offspring haplotype a random pick, SNP by SNP, of the parent's two (unlinked
SNPs), 64 SNPs per machine word.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time

import numba
import numpy as np
import pandas as pd
import pytest
from sksparse.cholmod import CholmodOutOfMemoryError

import henderson as hd
from henderson.simulate import animal_population
from henderson.single_step import prune_to_ancestors

from conftest import run_once

_INCREMENT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)
_ONE = np.uint64(1)
# SNPs per block of the gene dropping: the haplotypes of 500,000 ancestors for 2,048
# SNPs are 256 MB
SNP_BLOCK = 2048


@numba.njit(cache=True)
def _splitmix64(state):
    state = state + _INCREMENT
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _drop_genes(sire, dam, frequency_bits, n_snps, genotyped, seed, out):
    """Allele counts of the ``genotyped`` animals for one block of SNPs.

    ``frequency_bits[k, w]``: bit k of the 8-bit base allele frequency (in 1/256) of
    each of the 64 SNPs of word w. A founder allele is 1 when 8 random bits read as a
    number are below it (compared bit plane by bit plane, 64 SNPs at once).
    """
    n, n_words = len(sire), frequency_bits.shape[1]
    haplotypes = np.empty((n, 2, n_words), dtype=np.uint64)
    state = np.uint64(seed)
    for i in range(n):
        for h in range(2):
            parent = sire[i] if h == 0 else dam[i]
            for w in range(n_words):
                if parent >= 0:
                    state, mask = _splitmix64(state)
                    haplotypes[i, h, w] = ((haplotypes[parent, 0, w] & ~mask)
                                           | (haplotypes[parent, 1, w] & mask))
                else:
                    less = np.uint64(0)
                    equal = _ALL_BITS
                    for k in range(7, -1, -1):
                        state, draw = _splitmix64(state)
                        bits = frequency_bits[k, w]
                        less |= equal & ~draw & bits
                        equal &= ~(draw ^ bits)
                    haplotypes[i, h, w] = less
    for a in range(len(genotyped)):
        i = genotyped[a]
        for j in range(n_snps):
            w, b = j >> 6, np.uint64(j & 63)
            out[a, j] = ((haplotypes[i, 0, w] >> b) & _ONE) + ((haplotypes[i, 1, w] >> b) & _ONE)


def simulate_genotypes(ped: hd.Pedigree, animals, n_snps: int, seed: int = 1) -> pd.DataFrame:
    """0/1/2 genotypes (int8) of ``animals`` consistent with the pedigree."""
    rng = np.random.default_rng(seed)
    positions = np.sort(ped.ids.get_indexer(pd.Index(animals).astype(str)))
    (sire, dam, _), genotyped = prune_to_ancestors(ped, positions)
    frequency = np.clip(np.round(rng.beta(2.0, 2.0, n_snps) * 256), 1, 255).astype(np.uint64)
    counts = np.empty((len(positions), n_snps), dtype=np.int8)
    for start in range(0, n_snps, SNP_BLOCK):
        stop = min(start + SNP_BLOCK, n_snps)
        n_words = (stop - start + 63) // 64
        padded = np.zeros(n_words * 64, dtype=np.uint64)
        padded[:stop - start] = frequency[start:stop]
        planes = ((padded[None, :] >> np.arange(8, dtype=np.uint64)[:, None]) & _ONE)
        weights = _ONE << np.arange(64, dtype=np.uint64)
        frequency_bits = (planes.reshape(8, n_words, 64) * weights).sum(axis=2,
                                                                       dtype=np.uint64)
        _drop_genes(sire, dam, frequency_bits, stop - start, genotyped,
                    int(rng.integers(1, 2 ** 62)), counts[:, start:stop])
    return pd.DataFrame(counts, index=ped.ids[positions],
                        columns=[f"snp{j}" for j in range(n_snps)], copy=False)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux), so that each stage's peak can
    be read from /proc/self/status; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _stage_peak_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


@contextlib.contextmanager
def _stage(record: dict, name: str):
    resettable = _reset_peak()
    start = time.perf_counter()
    try:
        yield
    finally:
        record[f"{name}_s"] = round(time.perf_counter() - start, 2)
        if resettable:
            record[f"{name}_peak_rss_gb"] = round(_stage_peak_gb(), 2)
        # also printed (pytest -s): a full-size stage that runs out of memory loses
        # the benchmark record, not what the stages before it measured
        print(f"{name}: {record[f'{name}_s']} s, peak RSS "
              f"{record.get(f'{name}_peak_rss_gb', float('nan'))} GB, load "
              f"{[round(v, 2) for v in os.getloadavg()]}", flush=True)


def _population(sizes, n_genotyped: int):
    """The benchmark population with ``n_genotyped`` animals of its last two
    generations genotyped: ``(pedigree, records, truth, genotypes, simulation s)``."""
    frame, records, truth = animal_population(sizes["ss_animals"], n_generations=8, seed=1)
    ped = hd.Pedigree.from_dataframe(frame)
    last_two_generations = frame["animal"].to_numpy()[-len(frame) // 4:]
    chosen = np.random.default_rng(2).choice(last_two_generations, size=n_genotyped,
                                             replace=False)
    stages: dict = {}
    with _stage(stages, "genotype_simulation"):
        genotypes = simulate_genotypes(ped, chosen, sizes["ss_markers"], seed=3)
    return ped, records, truth, genotypes, stages["genotype_simulation_s"]


@pytest.fixture(scope="module")
def genotyped_population(sizes):
    return _population(sizes, sizes["ss_genotyped"])


def test_single_step_apy(benchmark, genotyped_population, sizes):
    """H⁻¹ with APY (a random core); the genotyped block of H⁻¹ is still dense."""
    ped, _, _, genotypes, _ = genotyped_population
    stages: dict = {}

    def build():
        with _stage(stages, "single_step_apy"):
            return hd.single_step(ped, genotypes, apy=sizes["ss_core"], seed=1)

    H = run_once(benchmark, build)
    print("single_step stages:", {k: round(v, 1) for k, v in H.timings.items()}, flush=True)
    assert len(H.core) == sizes["ss_core"]
    benchmark.extra_info.update(
        genotyped=len(H.genotyped), core=len(H.core), hinv_nnz=int(H.matrix.nnz),
        peak_rss_gb=round(_peak_rss_gb(), 2),
        load_average=[round(v, 2) for v in os.getloadavg()], **stages,
        **{f"single_step_{k}_s": round(v, 2) for k, v in H.timings.items()})


def test_single_step_blup_and_pev(benchmark, genotyped_population):
    """Issue: H⁻¹ + BLUP + PEVs of every animal, < 20 min and < 20 GB at full scale."""
    ped, records, truth, genotypes, simulation_seconds = genotyped_population
    stages: dict = {}

    def evaluate():
        with _stage(stages, "single_step"):
            H = hd.single_step(ped, genotypes)
        stages.update({f"single_step_{k}_s": round(v, 2) for k, v in H.timings.items()})
        print("single_step stages:", {k: round(v, 1) for k, v in H.timings.items()}, flush=True)
        try:
            with _stage(stages, "blup"):
                m = hd.lmm("y ~ sex + hys + (1 | animal)", records,
                           relationships={"animal": H},
                           fixed_variances={"animal": 30.0, "residual": 70.0})
            print("lmm stages:", {k: round(v, 1) for k, v in m.timings.items()}, flush=True)
            with _stage(stages, "pev"):
                bv = m.breeding_values()
        except (MemoryError, CholmodOutOfMemoryError) as exc:
            # a failure is reported without its traceback, which would hold H⁻¹ and the
            # equations (tens of GB) until the end of the session
            stages["failure"] = f"{type(exc).__name__}: {exc}"
            return None
        return H, m, bv

    result = run_once(benchmark, evaluate)
    benchmark.extra_info.update(
        animals=len(ped), markers=genotypes.shape[1], records=len(records),
        genotype_simulation_s=round(simulation_seconds, 2),
        peak_rss_gb=round(_peak_rss_gb(), 2),
        load_average=[round(v, 2) for v in os.getloadavg()], **stages)
    if result is None:
        pytest.fail(f"out of memory: {stages}")
    H, m, bv = result
    assert bv["pev"].notna().all() and len(bv) == len(ped)
    assert (bv["pev"] > 0).all() and (bv["pev"] < 30.0 * 2).all()
    accuracy = np.corrcoef(bv["ebv"], truth.loc[bv.index])[0, 1]
    benchmark.extra_info.update(
        genotyped=len(H.genotyped), hinv_nnz=int(H.matrix.nnz), accuracy=float(accuracy),
        mean_pev_genotyped=float(bv.loc[H.genotyped, "pev"].mean()),
        tuning=[round(v, 5) for v in H.tuning],
        **{f"lmm_{k}_s": round(v, 2) for k, v in m.timings.items()})


@pytest.fixture(scope="module")
def apy_population(sizes):
    return _population(sizes, sizes["ss_apy_genotyped"])


def test_single_step_apy_implicit_blup_and_pev(benchmark, apy_population, sizes):
    """Issue 14: single-step with APY for 60,000 genotyped animals (full scale): H⁻¹ as
    an operator (``hd.implicit_single_step``), BLUP by PCG (``hd.solve_blup``) and
    approximate PEVs of every animal, < 20 min and < 20 GB."""
    ped, records, truth, genotypes, simulation_seconds = apy_population
    stages: dict = {}

    def evaluate():
        with _stage(stages, "implicit_single_step"):
            H = hd.implicit_single_step(ped, genotypes, apy=sizes["ss_apy_core"], seed=1)
        print("implicit_single_step stages:", {k: round(v, 1) for k, v in H.timings.items()},
              flush=True)
        with _stage(stages, "blup"):
            blup = hd.solve_blup("y ~ sex + hys + (1 | animal)", records, {"animal": H},
                                 {"animal": 30.0, "residual": 70.0})
        print(blup, {k: round(v, 1) for k, v in blup.timings.items()}, flush=True)
        with _stage(stages, "pev"):
            bv = blup.breeding_values()
        return H, blup, bv

    H, blup, bv = run_once(benchmark, evaluate)
    stages["total_s"] = round(sum(stages[k] for k in ("implicit_single_step_s", "blup_s",
                                                      "pev_s")), 2)
    print("total", stages["total_s"], "s", flush=True)
    assert blup.relative_residual < 1e-10
    assert bv["pev"].notna().all() and len(bv) == len(ped)
    assert (bv["pev"] > 0).all() and (bv["pev"] < 30.0 * 2).all()
    accuracy = np.corrcoef(bv["ebv"], truth.loc[bv.index])[0, 1]
    genotyped = bv["genotyped"].to_numpy()
    benchmark.extra_info.update(
        animals=len(ped), genotyped=len(H.genotyped), core=len(H.core),
        markers=genotypes.shape[1], records=len(records), iterations=blup.iterations,
        relative_residual=blup.relative_residual, accuracy=float(accuracy),
        accuracy_genotyped=float(np.corrcoef(bv["ebv"][genotyped],
                                             truth.loc[bv.index][genotyped])[0, 1]),
        mean_reliability_genotyped=float(bv["reliability"][genotyped].mean()),
        genotype_simulation_s=round(simulation_seconds, 2),
        peak_rss_gb=round(_peak_rss_gb(), 2),
        load_average=[round(v, 2) for v in os.getloadavg()], **stages,
        **{f"implicit_single_step_{k}_s": round(v, 2) for k, v in H.timings.items()},
        **{f"solve_blup_{k}_s": round(v, 2) for k, v in blup.timings.items()})
