"""Simulated data sets for benchmarks and examples, reproducible from a seed.

* :func:`crossed` — ``y ~ x + (1 + x | g1) + (1 | g2)`` with two crossed factors;
* :func:`animal_population` — a pedigree over several generations with records,
  sex and herd-year-season groups, breeding values by Mendelian sampling.
"""
from __future__ import annotations

import numba
import numpy as np
import pandas as pd


def crossed(n_rows: int, n_g1: int, n_g2: int, seed: int = 1) -> pd.DataFrame:
    """Rows with a covariate ``x``, a correlated random intercept and slope for ``g1``
    and a random intercept for ``g2`` (levels as categoricals, every level used).

    Examples
    --------
    >>> crossed(1000, 50, 10).shape
    (1000, 4)
    """
    rng = np.random.default_rng(seed)
    g1 = np.concatenate([np.arange(n_g1), rng.integers(0, n_g1, n_rows - n_g1)])
    g2 = np.concatenate([np.arange(n_g2), rng.integers(0, n_g2, n_rows - n_g2)])
    rng.shuffle(g1)
    rng.shuffle(g2)
    x = rng.normal(size=n_rows)
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    b1 = rng.multivariate_normal([0, 0], cov, size=n_g1)
    b2 = rng.normal(scale=0.7, size=n_g2)
    y = 2.0 + 0.5 * x + b1[g1, 0] + b1[g1, 1] * x + b2[g2] + rng.normal(size=n_rows)
    return pd.DataFrame({
        "y": y, "x": x,
        "g1": pd.Categorical.from_codes(g1.astype(np.int32), categories=[f"a{i}" for i in range(n_g1)]),
        "g2": pd.Categorical.from_codes(g2.astype(np.int32), categories=[f"b{i}" for i in range(n_g2)]),
    })


def write_crossed_parquet(path, n_rows: int, n_g1: int, n_g2: int, seed: int = 1,
                          row_group_rows: int = 1_000_000) -> int:
    """Write the :func:`crossed` design to a Parquet file one row group at a time, so
    that data sets far larger than memory can be made (50 million rows: ~1 GB on disk).

    The random effects are drawn once; each row group draws its own rows. Returns the
    number of rows written.

    Examples
    --------
    >>> import tempfile, os, pandas as pd
    >>> path = os.path.join(tempfile.mkdtemp(), "crossed.parquet")
    >>> write_crossed_parquet(path, 2500, 50, 10, row_group_rows=1000)
    2500
    >>> pd.read_parquet(path).shape
    (2500, 4)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    b1 = rng.multivariate_normal([0, 0], cov, size=n_g1)
    b2 = rng.normal(scale=0.7, size=n_g2)
    g1_names = pa.array([f"a{i}" for i in range(n_g1)])
    g2_names = pa.array([f"b{i}" for i in range(n_g2)])
    writer = None
    written = 0
    try:
        while written < n_rows:
            size = min(row_group_rows, n_rows - written)
            g1 = rng.integers(0, n_g1, size)
            g2 = rng.integers(0, n_g2, size)
            if written == 0:  # every level is used at least once
                g1[:min(n_g1, size)] = np.arange(min(n_g1, size))
                g2[:min(n_g2, size)] = np.arange(min(n_g2, size))
            x = rng.normal(size=size)
            y = 2.0 + 0.5 * x + b1[g1, 0] + b1[g1, 1] * x + b2[g2] + rng.normal(size=size)
            table = pa.table({
                "y": y, "x": x,
                "g1": pa.DictionaryArray.from_arrays(pa.array(g1.astype(np.int32)), g1_names),
                "g2": pa.DictionaryArray.from_arrays(pa.array(g2.astype(np.int32)), g2_names),
            })
            if writer is None:
                writer = pq.ParquetWriter(str(path), table.schema)
            writer.write_table(table, row_group_size=row_group_rows)
            written += size
    finally:
        if writer is not None:
            writer.close()
    return written


def animal_population(n_animals: int, n_generations: int = 8, seed: int = 1,
                      herd_size: int = 100, sires_per_generation: int | None = None,
                      unknown_parent: float = 0.03, record_fraction: float = 0.8,
                      sigma2_animal: float = 30.0, sigma2_residual: float = 70.0):
    """A population of herds over ``n_generations``, as in dairy or beef breeding:
    dams are born in the herd of their calves, sires are a few hundred (AI) bulls per
    generation, drawn at random among the males, used across all herds (no selection,
    so REML should recover the simulated variances); one record per animal for ``record_fraction``
    of the animals after the founders, in herd-year-season groups.

    Returns
    -------
    pedigree : DataFrame (animal, sire, dam; "0" unknown), parents before offspring
    records : DataFrame (animal, sex, hys, y)
    true_values : Series of true breeding values by animal

    Examples
    --------
    >>> ped, rec, tbv = animal_population(2000, 4, seed=3)
    >>> len(ped), list(rec.columns)
    (2000, ['animal', 'sex', 'hys', 'y'])
    """
    rng = np.random.default_rng(seed)
    per_generation = n_animals // n_generations
    sizes = [per_generation] * n_generations
    sizes[-1] += n_animals - sum(sizes)
    n_herds = max(1, per_generation // herd_size)
    if sires_per_generation is None:
        sires_per_generation = max(2, min(300, per_generation // 200))
    sire = np.full(n_animals, -1)
    dam = np.full(n_animals, -1)
    male = rng.random(n_animals) < 0.5
    herd = rng.integers(0, n_herds, n_animals)
    generation = np.repeat(np.arange(n_generations), sizes)
    breeding_value = np.zeros(n_animals)
    start = 0
    for g, size in enumerate(sizes):
        idx = np.arange(start, start + size)
        if g == 0:
            breeding_value[idx] = rng.normal(scale=np.sqrt(sigma2_animal), size=size)
        else:
            previous = np.arange(start - sizes[g - 1], start)
            males = previous[male[previous]]
            top = rng.choice(males, size=min(sires_per_generation, len(males)), replace=False)
            sire[idx] = rng.choice(top, size=size)
            females = previous[~male[previous]]
            order = np.argsort(herd[females], kind="stable")
            females = females[order]
            bounds = np.searchsorted(herd[females], np.arange(n_herds + 1))
            counts = bounds[1:] - bounds[:-1]
            own = herd[idx]
            has_dams = counts[own] > 0
            pick = bounds[own] + (rng.random(size) * np.maximum(counts[own], 1)).astype(np.int64)
            dam[idx] = np.where(has_dams, females[np.minimum(pick, len(females) - 1)], -1)
            sire[idx[rng.random(size) < unknown_parent]] = -1
            dam[idx[rng.random(size) < unknown_parent]] = -1
            known_s, known_d = sire[idx] >= 0, dam[idx] >= 0
            parent_mean = 0.5 * (np.where(known_s, breeding_value[np.maximum(sire[idx], 0)], 0)
                                 + np.where(known_d, breeding_value[np.maximum(dam[idx], 0)], 0))
            mendelian = 1.0 - 0.25 * (known_s.astype(float) + known_d)
            breeding_value[idx] = parent_mean + rng.normal(size=size) * np.sqrt(mendelian * sigma2_animal)
        start += size
    ids = np.array([f"A{i:08d}" for i in range(n_animals)])
    label = lambda parent: np.where(parent >= 0, ids[np.maximum(parent, 0)], "0")
    pedigree = pd.DataFrame({"animal": ids, "sire": label(sire), "dam": label(dam)})
    recorded = np.flatnonzero((generation > 0) & (rng.random(n_animals) < record_fraction))
    season = rng.integers(0, 2, len(recorded))
    hys_code = (herd[recorded] * n_generations + generation[recorded]) * 2 + season
    hys_values, hys_codes = np.unique(hys_code, return_inverse=True)
    hys_effect = rng.normal(scale=5.0, size=len(hys_values))
    sex = np.where(male[recorded], "M", "F")
    y = (100.0 + np.where(male[recorded], 4.0, 0.0) + hys_effect[hys_codes]
         + breeding_value[recorded] + rng.normal(scale=np.sqrt(sigma2_residual), size=len(recorded)))
    records = pd.DataFrame({
        "animal": ids[recorded],
        "sex": pd.Categorical(sex, categories=["F", "M"]),
        "hys": pd.Categorical.from_codes(hys_codes.astype(np.int32),
                                         categories=[f"H{v}" for v in hys_values]),
        "y": y,
    })
    return pedigree, records, pd.Series(breeding_value, index=ids, name="true_bv")


@numba.njit(cache=True)
def _correlated_breeding_values(sire, dam, shocks, factor):
    """``a_i = (a_s + a_d)/2 + √d_i L z_i`` down a pedigree sorted parents first
    (``d_i`` = 1 − (known parents)/4, no inbreeding correction)."""
    n, k = shocks.shape
    values = np.zeros((n, k))
    for i in range(n):
        known = 0.0
        for p in (sire[i], dam[i]):
            if p >= 0:
                values[i] += 0.5 * values[p]
                known += 1.0
        values[i] += np.sqrt(1.0 - 0.25 * known) * (factor @ shocks[i])
    return values


def _parent_positions(pedigree: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    index = pd.Index(pedigree["animal"])
    sire = index.get_indexer(pedigree["sire"]).astype(np.int64)
    dam = index.get_indexer(pedigree["dam"]).astype(np.int64)
    return sire, dam


def multi_trait_population(n_animals: int, n_generations: int = 8, seed: int = 1,
                           genetic=((30.0, 15.0), (15.0, 40.0)),
                           residual=((70.0, 20.0), (20.0, 60.0)),
                           missing_second: float = 0.2):
    """The population of :func:`animal_population` with two correlated traits
    ``y1``, ``y2`` (genetic and residual covariance matrices as given; the second
    trait missing, NaN, on a random ``missing_second`` of the records).

    Returns
    -------
    pedigree, records (animal, sex, hys, y1, y2), true_values (DataFrame by animal)

    Examples
    --------
    >>> ped, rec, tbv = multi_trait_population(2000, 4, seed=3)
    >>> list(rec.columns), round(float(rec["y2"].isna().mean()), 1)
    (['animal', 'sex', 'hys', 'y1', 'y2'], 0.2)
    """
    pedigree, records, _ = animal_population(n_animals, n_generations, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    G0, R0 = np.asarray(genetic, dtype=float), np.asarray(residual, dtype=float)
    sire, dam = _parent_positions(pedigree)
    values = _correlated_breeding_values(sire, dam, rng.standard_normal((len(pedigree), 2)),
                                         np.linalg.cholesky(G0))
    where = pd.Index(pedigree["animal"]).get_indexer(records["animal"])
    hys_effect = rng.normal(scale=5.0, size=(len(records["hys"].cat.categories), 2))
    codes = records["hys"].cat.codes.to_numpy()
    male = (records["sex"] == "M").to_numpy()[:, None]
    noise = rng.standard_normal((len(records), 2)) @ np.linalg.cholesky(R0).T
    y = np.array([100.0, 50.0]) + male * np.array([4.0, 2.0]) + hys_effect[codes] \
        + values[where] + noise
    y[rng.random(len(records)) < missing_second, 1] = np.nan
    records = records.drop(columns="y").assign(y1=y[:, 0], y2=y[:, 1])
    truth = pd.DataFrame(values, index=pedigree["animal"].to_numpy(), columns=["y1", "y2"])
    return pedigree, records, truth


def maternal_population(n_animals: int, n_generations: int = 8, seed: int = 1,
                        genetic=((30.0, -8.0), (-8.0, 15.0)), sigma2_pe: float = 10.0,
                        sigma2_residual: float = 60.0):
    """The population of :func:`animal_population` with a maternally affected trait:
    ``y = mean + sex + hys + a_animal + m_dam + pe_dam + e``, direct and maternal
    genetic effects with covariance ``genetic``. Records (calves of known dams) have
    the columns animal, dam, pe (a copy of dam), sex, hys, y.

    Examples
    --------
    >>> ped, rec, tbv = maternal_population(2000, 4, seed=3)
    >>> list(rec.columns)
    ['animal', 'dam', 'pe', 'sex', 'hys', 'y']
    """
    pedigree, records, _ = animal_population(n_animals, n_generations, seed=seed)
    rng = np.random.default_rng(seed + 2000)
    G0 = np.asarray(genetic, dtype=float)
    sire, dam = _parent_positions(pedigree)
    values = _correlated_breeding_values(sire, dam, rng.standard_normal((len(pedigree), 2)),
                                         np.linalg.cholesky(G0))
    where = pd.Index(pedigree["animal"]).get_indexer(records["animal"])
    dam_of = dam[where]
    pe = rng.normal(scale=np.sqrt(sigma2_pe), size=len(pedigree))
    codes = records["hys"].cat.codes.to_numpy()
    hys_effect = rng.normal(scale=5.0, size=len(records["hys"].cat.categories))
    known = dam_of >= 0
    y = (100.0 + np.where(records["sex"] == "M", 4.0, 0.0) + hys_effect[codes]
         + values[where, 0] + np.where(known, values[np.maximum(dam_of, 0), 1]
                                       + pe[np.maximum(dam_of, 0)], 0.0)
         + rng.normal(scale=np.sqrt(sigma2_residual), size=len(records)))
    dam_id = np.where(known, pedigree["animal"].to_numpy()[np.maximum(dam_of, 0)], "0")
    out = pd.DataFrame({"animal": records["animal"].to_numpy(), "dam": dam_id, "pe": dam_id,
                        "sex": records["sex"].to_numpy(), "hys": records["hys"].to_numpy(),
                        "y": y})
    out["sex"] = records["sex"].values
    out["hys"] = records["hys"].values
    out = out[known].reset_index(drop=True)   # calves of unknown dams carry no record
    truth = pd.DataFrame(values, index=pedigree["animal"].to_numpy(),
                         columns=["direct", "maternal"])
    return pedigree, out, truth
