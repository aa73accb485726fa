"""Simulated data sets for benchmarks and examples, reproducible from a seed.

* :func:`crossed` — ``y ~ x + (1 + x | g1) + (1 | g2)`` with two crossed factors;
* :func:`ratings` — users by items with power-law level frequencies (MovieLens' shape);
* :func:`animal_population` — a pedigree over several generations with records,
  sex and herd-year-season groups, breeding values by Mendelian sampling;
* :func:`gwas_panel` — genotypes of people in families and subpopulations on several
  chromosomes (in memory or written as PLINK files a block at a time) with a
  phenotype of a few causal variants, a polygenic background and covariates.
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


def ratings(n_rows: int, n_users: int, n_items: int, seed: int = 1,
            user_exponent: float = 0.4, item_exponent: float = 0.45) -> pd.DataFrame:
    """Ratings of items by users, shaped as MovieLens: two crossed factors whose level
    frequencies follow power laws, for ``y ~ 1 + (1 | user) + (1 | item)``.

    The k-th most active user rates with weight ``k^-user_exponent``, the k-th most
    popular item is rated with weight ``k^-item_exponent`` (every level at least once).
    The defaults give MovieLens 10M's shape at its size (10M rows, 70,000 users x
    10,000 items): the busiest user holds 0.07% of the rows and the most rated item
    0.35%, as in MovieLens 10M. ``y = 3.5 + u_user + v_item + e`` with standard
    deviations 0.4, 0.5 and 0.9.

    Examples
    --------
    >>> data = ratings(10_000, 700, 100)
    >>> data.shape, data["user"].nunique(), data["item"].nunique()
    ((10000, 3), 700, 100)
    >>> int(data["item"].value_counts().iloc[0]) > 4 * 10_000 // 100  # a popular item
    True
    """
    rng = np.random.default_rng(seed)

    def draws(n_levels, exponent):
        weights = np.arange(1, n_levels + 1, dtype=np.float64) ** -exponent
        levels = np.searchsorted(np.cumsum(weights / weights.sum()),
                                 rng.random(n_rows - n_levels), side="right")
        codes = np.concatenate([np.arange(n_levels), np.minimum(levels, n_levels - 1)])
        return rng.permutation(codes).astype(np.int32)

    user, item = draws(n_users, user_exponent), draws(n_items, item_exponent)
    y = (3.5 + rng.normal(scale=0.4, size=n_users)[user]
         + rng.normal(scale=0.5, size=n_items)[item] + rng.normal(scale=0.9, size=n_rows))
    return pd.DataFrame({
        "y": y,
        "user": pd.Categorical.from_codes(user, categories=[f"u{i}" for i in range(n_users)]),
        "item": pd.Categorical.from_codes(item, categories=[f"i{i}" for i in range(n_items)]),
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


def _panel_genotypes(rng, frequencies, populations, parents_of, family_size):
    """Genotypes (samples x k) of siblings in families: two parents per family drawn
    from their subpopulation's frequencies, each child inheriting one of each parent's
    alleles at random (unlinked variants)."""
    n_families = len(populations)
    k = frequencies.shape[1]
    parent_freq = frequencies[populations]                       # (families, k)
    haplotypes = rng.random((n_families, 4, k), dtype=np.float32) < parent_freq[:, None, :]
    if family_size == 1:
        return (haplotypes[:, 0] | False).astype(np.int8) + haplotypes[:, 1]
    children = []
    for _ in range(family_size):
        pick = rng.integers(0, 2, size=(2, n_families, k), dtype=np.int8)
        from_first = np.where(pick[0] == 0, haplotypes[:, 0], haplotypes[:, 1])
        from_second = np.where(pick[1] == 0, haplotypes[:, 2], haplotypes[:, 3])
        children.append(from_first.astype(np.int8) + from_second)
    return np.stack(children, axis=1).reshape(n_families * family_size, k)


def gwas_panel(n_samples: int, n_variants: int, n_chromosomes: int = 5, n_causal: int = 10,
               h2: float = 0.5, family_size: int = 1, missing: float = 0.0,
               n_populations: int = 2, causal_share: float = 0.05, seed: int = 1, path=None,
               block: int | None = None, distinct: int | None = None):
    """A simulated genotype panel with a phenotype, for GWAS examples and benchmarks.

    People come in families of ``family_size`` full siblings (1: unrelated) from
    ``n_populations`` subpopulations whose allele frequencies differ (Balding-Nichols,
    F_ST 0.02); variants are spread evenly over ``n_chromosomes``. The phenotype is
    ``y = 0.03 age + 0.5 sex + 0.2 batch + Σ causal + polygenic + e``: ``n_causal``
    variants explaining ``causal_share`` of the variance together, a polygenic value
    from every variant explaining ``h2 − causal_share``, and a residual for the rest.

    Parameters
    ----------
    path : str, optional
        Write the genotypes as a PLINK set ``path.bed/.bim/.fam`` a block of
        ``block`` variants at a time (a genome-wide panel is never held in memory) and
        return it opened by :func:`read_plink`; otherwise the genotypes are returned
        in memory.
    missing : float
        The fraction of genotypes set missing at random.
    distinct : int, optional
        With ``path``: simulate only this many variants and write them again and again
        up to ``n_variants`` (a timing panel of 100,000 people x 1M variants in minutes;
        a scan's cost does not depend on the values). Causal variants and the polygenic
        value come from the distinct ones.

    Returns
    -------
    (Genotypes, DataFrame)
        The genotypes and the phenotypes: ``iid``, ``age``, ``sex``, ``batch``, ``y``,
        ``y2`` (a
        second phenotype sharing the causal variants, 20% missing) and, as ``attrs``,
        ``causal`` (the causal variants' snp ids).

    Examples
    --------
    >>> g, pheno = gwas_panel(200, 500, seed=3)
    >>> g.shape, list(pheno.columns)
    ((200, 500), ['iid', 'age', 'sex', 'batch', 'y', 'y2'])
    """
    from .plink import Genotypes, read_plink, write_plink

    rng = np.random.default_rng(seed)
    # blocks of variants whose random draws (4 haplotypes per family) stay near 256 MB
    block = block or int(max(256, 2**26 // max(n_samples, 1)))
    if n_samples % family_size:
        raise ValueError("n_samples must be a multiple of family_size")
    n_families = n_samples // family_size
    populations = rng.integers(0, n_populations, size=n_families)
    sample_population = np.repeat(populations, family_size)
    causal = np.sort(rng.choice(n_variants, size=min(n_causal, n_variants), replace=False))
    genetic = np.zeros(n_samples)
    causal_value = np.zeros(n_samples)
    per_chromosome = -(-n_variants // n_chromosomes)
    ids = [f"p{i + 1}" for i in range(n_samples)]
    fst = 0.02

    def blocks():
        for start in range(0, n_variants, block):
            k = min(block, n_variants - start)
            ancestral = rng.uniform(0.05, 0.5, size=k)
            a = ancestral * (1 - fst) / fst
            b = (1 - ancestral) * (1 - fst) / fst
            frequencies = rng.beta(a, b, size=(n_populations, k)).astype(np.float32)
            counts = _panel_genotypes(rng, frequencies, populations, None, family_size)
            standardized = (counts - 2 * ancestral) / np.sqrt(2 * ancestral * (1 - ancestral))
            genetic[:] += standardized @ rng.normal(0.0, 1.0, size=k)
            inside = causal[(causal >= start) & (causal < start + k)] - start
            if len(inside):
                causal_value[:] += standardized[:, inside] @ rng.choice([-1.0, 1.0], len(inside))
            if missing:
                counts = counts.astype(np.float32)
                counts[rng.random(counts.shape) < missing] = np.nan
            yield counts

    variants = pd.DataFrame({
        "chrom": (np.arange(n_variants) // per_chromosome + 1).astype(str),
        "snp": [f"rs{j + 1}" for j in range(n_variants)], "cm": 0.0,
        "pos": np.arange(n_variants) % per_chromosome * 1000 + 1000,
        "a1": "A", "a2": "G"})
    samples = pd.DataFrame({"fid": [f"f{i // family_size + 1}" for i in range(n_samples)],
                            "iid": ids})
    if path is not None and distinct is not None and distinct < n_variants:
        from .plink import BED_MAGIC, _prefix, encode_bed_block

        if n_variants % distinct or distinct % block:
            raise ValueError("distinct must divide n_variants, and block divide distinct")
        all_variants = n_variants
        n_variants = distinct
        encoded = [encode_bed_block(counts) for counts in blocks()]
        n_variants = all_variants
        write_plink(path, counts=np.zeros((n_samples, 0)), samples=samples,
                    variants=variants.iloc[:0])
        with open(_prefix(path).with_suffix(".bed"), "wb") as handle:
            handle.write(BED_MAGIC)
            for _ in range(n_variants // distinct):
                for piece in encoded:
                    handle.write(piece)
        variants.to_csv(_prefix(path).with_suffix(".bim"), sep="\t", header=False,
                        index=False)
        genotypes = read_plink(path)
    elif path is not None:
        write_plink(path, blocks=blocks(), samples=samples, variants=variants)
        genotypes = read_plink(path)
    else:
        values = np.concatenate(list(blocks()), axis=1).astype(np.float64)
        genotypes = Genotypes(samples, variants, values=values)

    def scaled(values, share):
        sd = values.std()
        return values / sd * np.sqrt(share) if sd > 0 else values

    age = rng.normal(50, 10, size=n_samples)
    sex = rng.integers(0, 2, size=n_samples)
    batch = rng.integers(0, 3, size=n_samples)
    background = (scaled(genetic, max(h2 - causal_share, 0.0))
                  + scaled(causal_value, causal_share))
    residual = rng.normal(0.0, np.sqrt(1.0 - h2), size=n_samples)
    structure = 0.3 * sample_population
    y = 0.03 * age + 0.5 * sex + 0.2 * batch + structure + background + residual
    y2 = 0.01 * age + 0.7 * background + rng.normal(0.0, 0.8, size=n_samples)
    y2[rng.random(n_samples) < 0.2] = np.nan
    phenotypes = pd.DataFrame({"iid": ids, "age": age, "sex": sex, "batch": batch, "y": y,
                               "y2": y2})
    phenotypes.attrs["causal"] = list(variants["snp"].iloc[causal])
    return genotypes, phenotypes
