"""Genomic relationship matrices and the checks on known level covariances."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import henderson as hd
from henderson import DataError
from henderson.genomic import RelationshipMatrix, as_relationship


def vanraden(M):
    M = np.asarray(M, dtype=float)
    freq = M.mean(0) / 2
    W = M - 2 * freq
    return W @ W.T / (2 * np.sum(freq * (1 - freq)))


@pytest.fixture
def genotypes():
    rng = np.random.default_rng(11)
    return pd.DataFrame(rng.binomial(2, rng.uniform(0.1, 0.9, 40), (12, 40)),
                        index=[f"g{i}" for i in range(12)],
                        columns=[f"snp{j}" for j in range(40)])


def with_row(genotypes, animal, value):
    changed = genotypes.astype(object)
    changed.loc[animal] = value
    return changed


@pytest.mark.parametrize("change,message", [
    (lambda g: with_row(g, "g3", pd.NA),
     r"40 missing value\(s\) \(first: animal 'g3', marker 'snp0'\)"),
    (lambda g: g.astype(float).where(~((g.index == "g5")[:, None] & (g.columns == "snp7")[None, :])),
     r"1 missing value\(s\) \(first: animal 'g5', marker 'snp7'\)"),
    (lambda g: g.replace({0: "AA", 1: "AB", 2: "BB"}),
     r"allele counts 0, 1 or 2, not 'AA' \(animal 'g\d+', marker 'snp0'\).*recode"),
    (lambda g: with_row(g, "g2", 3), r"not 3 \(animal 'g2', marker 'snp0'\)"),
    (lambda g: g["snp0"].to_numpy(), r"not 1-dimensional with shape \(12,\)"),
    (lambda g: g.iloc[:, :0], r"12 animal\(s\) and 0 marker\(s\)"),
])
def test_grm_names_the_bad_genotype(genotypes, change, message):
    with pytest.raises(DataError, match=message):
        hd.grm(change(genotypes))


@pytest.mark.parametrize("blend", [-0.1, 1.5, np.nan, "0.5", True])
def test_grm_blend_outside_0_1_is_refused(genotypes, blend):
    with pytest.raises(ValueError, match="blend must be a number in \\[0, 1\\]"):
        hd.grm(genotypes, blend=blend)


def test_markers_without_variation_are_dropped_with_a_warning(genotypes):
    """An all-heterozygous marker (p = 1/2, no variance) used to add 1/2 to the
    denominator 2Σp(1−p) and shrink G; monomorphic markers change nothing."""
    expected = vanraden(genotypes)
    padded = genotypes.assign(het=1, het2=1, mono=0)
    with pytest.warns(UserWarning, match="3 of 43 markers.*'het', 'het2', 'mono'"):
        G = hd.grm(padded, blend=0.0)
    assert np.allclose(G.matrix, expected, rtol=1e-13, atol=1e-13)
    assert not np.allclose(vanraden(padded), expected)  # what the old code computed


def test_grm_with_only_constant_markers_is_refused():
    """Used to be 0.01·I, silently."""
    with pytest.raises(DataError, match="none of the 3 markers varies across the 4 animals"):
        hd.grm(np.array([[1, 0, 2]] * 4))


def test_grm_relationship_labelled_aligned_and_checked(genotypes):
    rng = np.random.default_rng(2)
    extra = [f"x{i}" for i in range(3)]
    labels = list(genotypes.index[::-1]) + extra  # another order, more animals
    B = rng.normal(size=(15, 15))
    K = B @ B.T / 15 + np.eye(15)
    frame = pd.DataFrame(K, index=labels, columns=labels)
    G = hd.grm(genotypes, blend=0.2, relationship=frame)
    aligned = frame.loc[genotypes.index, genotypes.index].to_numpy()
    assert np.allclose(G.matrix, 0.8 * vanraden(genotypes) + 0.2 * aligned, rtol=1e-13)
    # the same from a RelationshipMatrix
    G2 = hd.grm(genotypes, blend=0.2, relationship=RelationshipMatrix(K, labels))
    assert np.array_equal(G.matrix, G2.matrix)
    with pytest.raises(DataError, match=r"relationship lacks 1 genotyped animal\(s\): 'g0'"):
        hd.grm(genotypes, relationship=frame.drop(index="g0", columns="g0"))
    with pytest.raises(DataError, match=r"relationship must be 12 x 12 .* not \(15, 15\)"):
        hd.grm(genotypes, relationship=K)
    asymmetric = aligned.copy()
    asymmetric[0, 1] += 0.1
    with pytest.raises(DataError, match=r"relationship is not symmetric: \['g0', 'g1'\]"):
        hd.grm(genotypes, relationship=asymmetric)
    with pytest.raises(DataError, match="covariance .*not a precision"):
        hd.grm(genotypes, relationship=RelationshipMatrix(K, labels, kind="precision"))


# ------------------------------------------------------------ known covariances
def labelled(matrix, rows="abc", columns=None):
    return pd.DataFrame(matrix, index=list(rows), columns=list(columns or rows))


K3 = np.array([[1.0, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 1.0]])


@pytest.mark.parametrize("frame,message", [
    (labelled(np.where(np.eye(3) > 0, 1.0, np.nan)), r"missing or infinite value at \['a', 'b'\]"),
    (labelled(K3).astype(object).where(~np.eye(3, dtype=bool), pd.NA), r"missing .* at \['a', 'a'\]"),
    (labelled(K3 + np.diag([0.2, 0.0], 1)),
     r"not symmetric: \['a', 'b'\] = 0.7 but \['b', 'a'\] = 0.5"),
    (labelled(K3, "abc", "abd"), r"1 only on rows \('c'\), 1 only on columns \('d'\)"),
    (labelled(K3, "abb", "abc"), r"repeated labels on its rows: 'b'"),
    (labelled(K3).astype(object).where(~np.eye(3, dtype=bool), "x"), "must be numeric"),
])
def test_covariance_dataframe_problems_are_named(frame, message):
    with pytest.raises(DataError, match=message):
        as_relationship(frame)


def test_covariance_dataframe_in_another_column_order_or_label_type():
    """Columns in another order are aligned to the rows (they used to be refused), and
    an integer index matches the text header that read_csv gives."""
    expected = np.linalg.inv(K3)
    shuffled = labelled(K3)[["c", "a", "b"]]
    assert np.allclose(as_relationship(shuffled).precision().toarray(), expected, rtol=1e-12)
    read = pd.DataFrame(K3, index=[1, 2, 3], columns=["1", "2", "3"])
    K = as_relationship(read)
    assert list(K.labels) == ["1", "2", "3"]
    assert K.logdet() == pytest.approx(np.linalg.slogdet(K3)[1], rel=1e-12)


def test_rounding_asymmetry_is_accepted_and_removed():
    K = K3.copy()
    K[0, 2] += 1e-12
    R = RelationshipMatrix(K, list("abc"))
    assert np.array_equal(R.matrix, R.matrix.T) and R.matrix[0, 2] == pytest.approx(0.25 + 5e-13)


def test_relationship_matrix_shape_labels_and_kind():
    with pytest.raises(DataError, match=r"\(3, 3\) but has 2 labels"):
        RelationshipMatrix(K3, ["a", "b"])
    with pytest.raises(DataError, match=r"not unique: 'a'"):
        RelationshipMatrix(K3, ["a", "b", "a"])
    with pytest.raises(ValueError, match="kind must be 'covariance' or 'precision', not 'cov'"):
        RelationshipMatrix(K3, list("abc"), kind="cov")
    with pytest.raises(DataError, match="must be numeric"):
        RelationshipMatrix([["1", "x"], ["x", "1"]], ["a", "b"])


def test_indefinite_matrices_are_refused():
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(DataError, match="not positive definite"):
        RelationshipMatrix(indefinite, ["a", "b"]).precision()
    for matrix in (indefinite, np.diag([-1.0, -2.0]), np.diag([1.0, 0.0])):
        precision = RelationshipMatrix(sp.csc_matrix(matrix), ["a", "b"], kind="precision")
        with pytest.raises(DataError, match="precision matrix is not positive definite"):
            precision.logdet()
    good = RelationshipMatrix(sp.csc_matrix(np.linalg.inv(K3)), list("abc"), kind="precision")
    assert good.logdet() == pytest.approx(np.linalg.slogdet(K3)[1], rel=1e-12)
    with pytest.raises(DataError, match=r"precision matrix is not symmetric: \['a', 'b'\]"):
        RelationshipMatrix(sp.csc_matrix(np.triu(K3)), list("abc"), kind="precision")


def test_bad_relationships_are_named_by_lmm():
    rng = np.random.default_rng(5)
    data = pd.DataFrame({"g": np.repeat(list("abc"), 4), "y": rng.normal(size=12)})
    asymmetric = labelled(K3 + np.triu(np.full((3, 3), 0.2), 1))
    with pytest.raises(DataError, match="not symmetric"):
        hd.lmm("y ~ 1 + (1 | g)", data, relationships={"g": asymmetric})
    indefinite = RelationshipMatrix(sp.csc_matrix(np.array([[1.0, 2.0, 0], [2.0, 1.0, 0],
                                                            [0, 0, 1.0]])),
                                    list("abc"), kind="precision")
    with pytest.raises(DataError, match="not positive definite"):
        hd.lmm("y ~ 1 + (1 | g)", data, relationships={"g": indefinite})


def _thresholded_dense_grm(counts, blend, cutoff, method):
    """The dense GRM (mean-imputed, constant variants out) with off-diagonal entries at
    or below the cutoff set to 0: a plain NumPy twin of the tiled sparse GRM."""
    mean = np.nanmean(counts, axis=0)
    variance = np.nanvar(counts, axis=0)
    keep = variance > 1e-12
    M = np.where(np.isnan(counts), 0.0, counts - mean)[:, keep]
    if method == "vanraden":
        p = mean[keep] / 2
        G = M @ M.T / (2 * np.sum(p * (1 - p)))
    else:
        Z = M / np.sqrt(variance[keep])
        G = Z @ Z.T / keep.sum()
    K = (1 - blend) * G + blend * np.eye(len(G))
    expected = np.where(K > cutoff, K, 0.0)
    np.fill_diagonal(expected, np.diag(K))
    return expected


@pytest.mark.parametrize("tile", [7, 40, 1000], ids=["tiles-of-7", "tiles-of-40", "one-tile"])
@pytest.mark.parametrize("method", ["vanraden", "standardized"])
def test_tiled_sparse_grm_equals_the_dense_grm_thresholded(monkeypatch, tile, method):
    """Siblings (families of 3) on generated genotypes with 5% missing and a constant
    variant; tiles that do not divide the samples, so that diagonal and off-diagonal
    tiles and a short last tile all occur."""
    import henderson.genomic

    from henderson.simulate import gwas_panel

    monkeypatch.setattr(henderson.genomic, "sparse_grm_tile_rows", lambda n, m: tile)
    g, _ = gwas_panel(93, 1500, family_size=3, missing=0.05, seed=8)
    counts = g.read()
    counts[:, 3] = 1.0  # constant: left out with a warning
    g = hd.Genotypes.from_frame(pd.DataFrame(counts, index=g.samples["iid"]))
    with pytest.warns(UserWarning, match="of 1500 markers have the same genotype"):
        K = hd.grm(g, blend=0.03, method=method, cutoff=0.15)
    assert sp.issparse(K.matrix)
    expected = _thresholded_dense_grm(counts, 0.03, 0.15, method)
    assert K.matrix.nnz == np.count_nonzero(expected)
    np.testing.assert_allclose(K.matrix.toarray(), expected, rtol=0, atol=1e-6)
    # the siblings are what is kept: every pair within a family, nearly nothing else
    family = np.arange(93) // 3
    kept = K.matrix.toarray() != 0
    assert kept[family[:, None] == family[None, :]].all()
    assert kept[family[:, None] != family[None, :]].mean() < 0.01


def test_sparse_grm_warns_when_noise_joins_everyone_into_one_group():
    """3,000 unrelated people from 400 variants (noise sd 0.05): cutoff 0.15 keeps ~13
    entries per person, below the entries-per-person warning, yet joins nearly
    everyone into one group, whose sparse factor fills in; 0.3 keeps none, quietly."""
    import warnings

    from henderson.simulate import gwas_panel

    g, _ = gwas_panel(3000, 400, seed=3)
    with pytest.warns(UserWarning, match="into one group of relatives") as record:
        hd.grm(g, cutoff=0.15)
    assert not any("entries per person above" in str(w.message) for w in record)
    assert "2,99" in str([w.message for w in record if "one group" in str(w.message)][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd.grm(g, cutoff=0.3)


def test_sparse_grm_warns_when_the_cutoff_is_inside_the_noise():
    """From 60 variants the GRM's noise (sd ~0.13) passes a cutoff of 0.02 for most of
    300 unrelated people: the warning says so; 0.6 keeps the diagonal only, quietly."""
    import warnings

    from henderson.simulate import gwas_panel

    g, _ = gwas_panel(300, 60, seed=3)
    with pytest.warns(UserWarning, match="entries per person above cutoff 0.02"):
        noisy = hd.grm(g, cutoff=0.02)
    assert (noisy.matrix.nnz - 300) / 300 > 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = hd.grm(g, cutoff=0.6)
    assert quiet.matrix.nnz == 300
