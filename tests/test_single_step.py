"""Single-step H⁻¹ against its dense NumPy twin: G, blending and tuning, A22⁻¹ by the
Schur complement, APY, the log-determinant, a fit, and the errors."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import henderson as hd
from henderson import DataError
from henderson.genomic import RelationshipMatrix
from henderson.pedigree import relationship_matrix_tabular
from henderson.simulate import animal_population
from henderson.single_step import (a22, a22_inverse_factor, assemble_precision,
                                   genomic_relationships, prune_to_ancestors,
                                   relationship_columns)


# ---------------------------------------------------------------- the dense twin
def dense_g(M):
    """VanRaden method 1, missing counts at the marker mean, constant markers out."""
    M = np.asarray(M, dtype=float)
    p = np.nanmean(M, axis=0) / 2
    observed = np.where(np.isnan(M), np.nan, M)
    varies = np.nanmax(observed, axis=0) > np.nanmin(observed, axis=0)
    Z = np.where(np.isnan(M), 0.0, M - 2 * p)[:, varies]
    p = p[varies]
    return Z @ Z.T / (2 * np.sum(p * (1 - p)))


def dense_g_star(G, A22, blend, tune):
    Gb = (1 - blend) * G + blend * A22
    if tune is None:
        return Gb
    n = len(G)
    off = lambda X: (X.sum() - np.trace(X)) / (n * (n - 1))
    b = (np.trace(A22) / n - off(A22)) / (np.trace(Gb) / n - off(Gb))
    return off(A22) - b * off(Gb) + b * Gb


def dense_apy_inverse(G, core):
    """Misztal (2016) written out: [[Gcc⁻¹, 0], [0, 0]] + [−Gcc⁻¹Gcn; I] M⁻¹ [·]'."""
    n = len(G)
    other = np.setdiff1d(np.arange(n), core)
    Gcc_inv = np.linalg.inv(G[np.ix_(core, core)])
    P = Gcc_inv @ G[np.ix_(core, other)]
    m = np.diag(G)[other] - np.sum(G[np.ix_(core, other)] * P, axis=0)
    left = np.zeros((n, len(other)))
    left[core] = -P
    left[other, np.arange(len(other))] = 1.0
    out = left @ np.diag(1 / m) @ left.T
    out[np.ix_(core, core)] += Gcc_inv
    return out


def dense_h_inverse(ped, genotypes, blend=0.05, tune="a22", tau=1.0, omega=1.0, core=None):
    Ainv = ped.inverse().toarray()
    A = np.linalg.inv(Ainv)
    pos = np.sort(ped.ids.get_indexer(genotypes.index.astype(str)))
    M = genotypes.loc[ped.ids[pos]].to_numpy(dtype=float)
    A22 = A[np.ix_(pos, pos)]
    G = dense_g_star(dense_g(M), A22, blend, tune)
    Ginv = np.linalg.inv(G) if core is None else dense_apy_inverse(G, core)
    Hinv = Ainv.copy()
    Hinv[np.ix_(pos, pos)] += tau * Ginv - omega * np.linalg.inv(A22)
    return Hinv, A, pos, G


@pytest.fixture(scope="module")
def population():
    frame, records, _ = animal_population(300, n_generations=4, seed=5)
    ped = hd.Pedigree.from_dataframe(frame)
    rng = np.random.default_rng(2)
    genotyped = rng.choice(frame["animal"].to_numpy()[150:], size=40, replace=False)
    counts = rng.binomial(2, rng.uniform(0.05, 0.95, 300), size=(40, 300))
    genotypes = pd.DataFrame(counts, index=genotyped,
                             columns=[f"snp{j}" for j in range(300)])
    return ped, genotypes, records


def test_h_inverse_equals_the_dense_twin(population):
    ped, genotypes, _ = population
    H = hd.single_step(ped, genotypes)
    expected, A, pos, G = dense_h_inverse(ped, genotypes)
    assert isinstance(H, RelationshipMatrix) and H.kind == "precision"
    assert list(H.labels) == list(ped.ids)
    assert sp.issparse(H.matrix) and H.matrix.has_sorted_indices
    assert np.max(np.abs(H.matrix.toarray() - expected)) < 1e-8
    # |H| = |A| |G*| / |A22|, and H is the inverse of H⁻¹
    assert H.logdet() == pytest.approx(np.linalg.slogdet(np.linalg.inv(expected))[1],
                                       abs=1e-8)
    assert H.logdets["G"] == pytest.approx(np.linalg.slogdet(G)[1], abs=1e-9)
    assert H.logdets["A22"] == pytest.approx(np.linalg.slogdet(A[np.ix_(pos, pos)])[1],
                                             abs=1e-9)
    assert list(H.genotyped) == list(ped.ids[pos])


def test_tuning_matches_a22_means(population):
    ped, genotypes, _ = population
    H = hd.single_step(ped, genotypes)
    _, A, pos, G = dense_h_inverse(ped, genotypes)
    A22 = A[np.ix_(pos, pos)]
    n = len(pos)
    off = lambda X: (X.sum() - np.trace(X)) / (n * (n - 1))
    assert np.trace(G) / n == pytest.approx(np.trace(A22) / n, rel=1e-12)
    assert off(G) == pytest.approx(off(A22), rel=1e-10)
    a, b = H.tuning
    Gb = 0.95 * dense_g(genotypes.loc[ped.ids[pos]]) + 0.05 * A22
    assert np.allclose(G, a + b * Gb, atol=1e-12)


@pytest.mark.parametrize("options", [
    dict(blend=0.0, tune="a22"), dict(blend=0.2, tune=None), dict(blend=0.1, tune="a22"),
    dict(tau=1.3, omega=0.7), dict(tau=0.9, omega=0.0),
], ids=["tune-only", "blend-only", "blend-0.1", "tau-omega", "omega-0"])
def test_options_match_the_dense_twin(population, options):
    ped, genotypes, _ = population
    H = hd.single_step(ped, genotypes, **options)
    expected, *_ = dense_h_inverse(ped, genotypes, **options)
    assert np.max(np.abs(H.matrix.toarray() - expected)) < 1e-8
    # the log-determinant of the covariance whose inverse is H⁻¹, whatever τ and ω
    assert H.logdet() == pytest.approx(-np.linalg.slogdet(expected)[1], abs=1e-8)


def test_genotype_rows_in_any_order_and_missing_counts(population):
    ped, genotypes, _ = population
    shuffled = genotypes.iloc[::-1].astype(float)
    shuffled.iloc[3, 5] = np.nan
    shuffled.iloc[10, 7] = np.nan
    H = hd.single_step(ped, shuffled)
    expected, *_ = dense_h_inverse(ped, shuffled)
    assert np.max(np.abs(H.matrix.toarray() - expected)) < 1e-8


def test_float32_cross_product_equals_float64(population):
    """Counts crossed in float32 and centred afterwards give the float64 G."""
    _, genotypes, _ = population
    counts = genotypes.to_numpy()
    with_constant = np.column_stack([counts, np.ones(len(counts)), np.zeros(len(counts))])
    G = genomic_relationships(with_constant.astype(np.int8))
    assert G.flags.f_contiguous and np.array_equal(G, G.T)
    assert np.max(np.abs(G - dense_g(counts))) < 1e-12


class Reader:
    """The shape of a PLINK reader: ``samples`` with "iid", ``read()`` with NaN."""

    def __init__(self, frame):
        self.samples = pd.DataFrame({"fid": "f", "iid": frame.index})
        self._counts = frame.to_numpy(dtype=float, copy=True)

    def read(self):
        return self._counts


class BlockReader(Reader):
    """A reader that also gives blocks of variants (``read(variants=slice)``)."""

    def __init__(self, frame):
        super().__init__(frame)
        self.variants = pd.DataFrame({"snp": frame.columns})
        self.calls = 0

    def read(self, variants=None, dtype=np.float64):
        self.calls += 1
        return self._counts[:, slice(None) if variants is None else variants].astype(dtype)


@pytest.mark.parametrize("reader", [Reader, BlockReader])
def test_a_genotype_reader_gives_the_same_h(population, reader):
    ped, genotypes, _ = population
    with_missing = genotypes.astype(float)
    with_missing.iloc[0, 0] = np.nan
    source = reader(with_missing)
    H = hd.single_step(ped, source)
    expected = hd.single_step(ped, with_missing)
    assert abs(H.matrix - expected.matrix).max() == 0
    assert H.logdet() == expected.logdet()
    if reader is BlockReader:
        assert source.calls == 2      # one block of markers, read in each pass
        source._counts[3, 17] = 3
        with pytest.raises(DataError, match=r"not 3 \(animal '.*', marker 'snp17'\)"):
            hd.single_step(ped, source)


# ---------------------------------------------------------------- A22 and its inverse
def test_a22_inverse_is_the_schur_complement(population):
    ped, genotypes, _ = population
    A = np.linalg.inv(ped.inverse().toarray())
    pos = np.sort(ped.ids.get_indexer(genotypes.index))
    pruned, in_pruned = prune_to_ancestors(ped, pos)
    assert len(pruned[0]) < len(ped)        # the pedigree was pruned
    L22 = a22_inverse_factor(*pruned, in_pruned)
    assert np.allclose(np.triu(L22, 1), 0)
    A22 = A[np.ix_(pos, pos)]
    assert np.max(np.abs(L22 @ L22.T - np.linalg.inv(A22))) < 1e-9
    assert -2 * np.sum(np.log(np.diag(L22))) == pytest.approx(np.linalg.slogdet(A22)[1],
                                                              abs=1e-10)
    assert np.max(np.abs(a22(*pruned, in_pruned) - A22)) < 1e-12


def test_relationship_columns_equal_dense_a():
    """Colleau's sweeps against A from the tabular method, inbred animals included."""
    ped = hd.Pedigree(["1", "2", "3", "4", "5", "6", "7"], ["0", "0", "1", "1", "4", "5", "5"],
                      ["0", "0", "2", "3", "3", "2", "6"])
    A = relationship_matrix_tabular(ped)
    d = ped.mendelian_variances
    rows, columns = np.array([0, 2, 4, 5, 6]), np.array([6, 3, 1])
    got = relationship_columns(ped.sire, ped.dam, d, columns, rows)
    assert np.allclose(got, A[np.ix_(rows, columns)], atol=1e-14)


def test_assembly_adds_the_block_to_a_inverse():
    rng = np.random.default_rng(3)
    base = sp.random(30, 30, density=0.1, random_state=4)
    ainverse = (base + base.T + sp.eye(30)).tocsc()
    genotyped = np.array([2, 5, 6, 17, 29])
    block = rng.normal(size=(5, 5))
    block = np.asfortranarray(block + block.T)
    lower_only = np.asfortranarray(np.tril(block) + np.triu(rng.normal(size=(5, 5)), 1))
    out = assemble_precision(ainverse, genotyped, lower_only)
    expected = ainverse.toarray()
    expected[np.ix_(genotyped, genotyped)] += block
    assert out.has_sorted_indices
    assert np.array_equal(out.indices[out.indptr[2]:out.indptr[3]],
                          np.unique(np.r_[ainverse[:, 2].indices, genotyped]))
    assert np.allclose(out.toarray(), expected, atol=1e-15)


# ---------------------------------------------------------------- APY
def test_apy_with_every_animal_in_the_core_is_g_inverse(population):
    ped, genotypes, _ = population
    full = hd.single_step(ped, genotypes)
    apy = hd.single_step(ped, genotypes, apy=len(genotypes), seed=1)
    assert np.max(np.abs((apy.matrix - full.matrix).toarray())) < 1e-8
    assert apy.logdet() == pytest.approx(full.logdet(), abs=1e-9)


@pytest.mark.parametrize("core", [12, "ids"], ids=["random-12", "listed"])
def test_apy_with_a_smaller_core_equals_the_dense_twin(population, core):
    ped, genotypes, _ = population
    apy = core if core != "ids" else list(genotypes.index[:7])
    H = hd.single_step(ped, genotypes, apy=apy, seed=4, tau=1.1)
    slots = H.genotyped.get_indexer(H.core)
    assert len(slots) == (12 if core != "ids" else 7)
    expected, _, _, G = dense_h_inverse(ped, genotypes, core=slots, tau=1.1)
    assert np.max(np.abs(H.matrix.toarray() - expected)) < 1e-8
    other = np.setdiff1d(np.arange(len(G)), slots)
    Gcc = G[np.ix_(slots, slots)]
    m = np.diag(G)[other] - np.sum(G[np.ix_(slots, other)]
                                   * np.linalg.solve(Gcc, G[np.ix_(slots, other)]), axis=0)
    assert H.logdets["G"] == pytest.approx(np.linalg.slogdet(Gcc)[1] + np.log(m).sum(),
                                           abs=1e-9)
    assert H.logdet() == pytest.approx(-np.linalg.slogdet(expected)[1], abs=1e-8)


def test_apy_core_draw_follows_the_seed(population):
    ped, genotypes, _ = population
    first = hd.single_step(ped, genotypes, apy=10, seed=7).core
    assert list(first) == list(hd.single_step(ped, genotypes, apy=10, seed=7).core)
    assert list(first) != list(hd.single_step(ped, genotypes, apy=10, seed=8).core)


# ---------------------------------------------------------------- a fit
def test_fit_on_h_inverse_equals_the_fit_on_dense_h(population):
    ped, genotypes, records = population
    H = hd.single_step(ped, genotypes)
    dense = RelationshipMatrix(np.linalg.inv(H.matrix.toarray()), ped.ids)
    sparse_fit = hd.lmm("y ~ 1 + (1 | animal)", records, relationships={"animal": H})
    dense_fit = hd.lmm("y ~ 1 + (1 | animal)", records, relationships={"animal": dense})
    assert sparse_fit.objective == pytest.approx(dense_fit.objective, rel=1e-6)
    assert np.allclose(sparse_fit.variance_components["variance"],
                       dense_fit.variance_components["variance"], rtol=1e-6)
    ebv, ebv_dense = sparse_fit.ranef["animal"].iloc[:, 0], dense_fit.ranef["animal"].iloc[:, 0]
    assert ebv.index.equals(ebv_dense.index)
    assert np.max(np.abs(ebv - ebv_dense)) < 1e-6 * np.abs(ebv_dense).max()
    pev = sparse_fit.breeding_values()["pev"]
    assert np.allclose(pev, dense_fit.breeding_values()["pev"], rtol=1e-6)


# ---------------------------------------------------------------- errors
def test_genotyped_animals_not_in_the_pedigree(population):
    ped, genotypes, _ = population
    stranger = genotypes.rename(index={genotypes.index[4]: "stranger"})
    with pytest.raises(DataError, match=r"1 genotyped animal\(s\) are not in the pedigree: "
                                        r"'stranger'"):
        hd.single_step(ped, stranger)


def test_duplicated_genotyped_animals(population):
    ped, genotypes, _ = population
    twice = pd.concat([genotypes, genotypes.iloc[[3]]])
    with pytest.raises(DataError, match=f"listed more than once: '{genotypes.index[3]}'"):
        hd.single_step(ped, twice)


@pytest.mark.parametrize("value,shown", [(3, "3"), (-1, "-1"), (0.5, "0.5"), ("AA", "'AA'")])
def test_counts_other_than_0_1_2(population, value, shown):
    ped, genotypes, _ = population
    bad = genotypes.astype(object)
    animal = genotypes.index[6]
    bad.loc[animal, "snp9"] = value
    with pytest.raises(DataError, match=rf"not {shown} \(animal '{animal}', marker 'snp9'\)"):
        hd.single_step(ped, bad)


def test_g_star_not_positive_definite_suggests_a_larger_blend(population):
    ped, genotypes, _ = population
    clones = genotypes.copy()
    clones.iloc[1] = clones.iloc[0]
    later = max(clones.index[:2], key=lambda animal: ped.ids.get_loc(animal))
    with pytest.raises(DataError, match=rf"G\* .*not positive definite.*genotyped animal "
                                        rf"'{later}'.*larger blend"):
        hd.single_step(ped, clones, blend=0.0, tune=None)


@pytest.mark.parametrize("option,value", [
    ("blend", -0.1), ("blend", 1.0), ("blend", np.nan), ("blend", True), ("tau", 0.0),
    ("tau", -1.0), ("tau", np.inf), ("omega", -0.5), ("omega", 1.5), ("omega", "1"),
])
def test_options_out_of_range(population, option, value):
    ped, genotypes, _ = population
    with pytest.raises(DataError, match=f"{option} must be a number in .*not {value!r}"):
        hd.single_step(ped, genotypes, **{option: value})


def test_bad_tune_and_apy_options(population):
    ped, genotypes, _ = population
    with pytest.raises(DataError, match="tune must be 'a22' or None, not 'g'"):
        hd.single_step(ped, genotypes, tune="g")
    with pytest.raises(DataError, match="between 1 and the 40 genotyped, not 41"):
        hd.single_step(ped, genotypes, apy=41)
    with pytest.raises(DataError, match=r"apy core animal\(s\) are not genotyped: 'A00000001'"):
        hd.single_step(ped, genotypes, apy=[genotypes.index[0], "A00000001"])
    with pytest.raises(DataError, match=f"listed more than once: '{genotypes.index[0]}'"):
        hd.single_step(ped, genotypes, apy=[genotypes.index[0]] * 2)


def test_markers_that_never_vary(population):
    ped, genotypes, _ = population
    with pytest.raises(DataError, match="none of the 300 markers varies"):
        hd.single_step(ped, genotypes * 0 + 1)
