"""PLINK input (plink.py): the .bed decoding against a plain-Python twin of the format,
write/read round trips, blocks, and the errors of broken files."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import henderson as hd
from henderson.errors import DataError
from henderson.plink import encode_bed_block

DATA = Path(__file__).parent / "data" / "gwas"


def _decode_bed(path: Path, n_samples: int, n_variants: int) -> np.ndarray:
    """A plain-Python reading of a SNP-major .bed: 2 bits per genotype, first sample in
    the lowest bits; 00 = two copies of a1, 10 = one, 11 = none, 01 = missing."""
    raw = path.read_bytes()
    assert raw[:3] == bytes([0x6C, 0x1B, 0x01])
    per_variant = (n_samples + 3) // 4
    value = {0b00: 2.0, 0b10: 1.0, 0b11: 0.0, 0b01: np.nan}
    out = np.empty((n_samples, n_variants))
    for j in range(n_variants):
        chunk = raw[3 + j * per_variant: 3 + (j + 1) * per_variant]
        for i in range(n_samples):
            out[i, j] = value[(chunk[i // 4] >> (2 * (i % 4))) & 0b11]
    return out


def test_reading_fastlmm_toydata_equals_the_format_twin():
    g = hd.read_plink(DATA / "toydata.5chrom")
    assert g.shape == (500, 10_000)
    assert list(g.variants.columns) == ["chrom", "snp", "cm", "pos", "a1", "a2"]
    assert list(g.samples.columns) == ["fid", "iid"]
    expected = _decode_bed(DATA / "toydata.5chrom.bed", 500, 40)
    assert np.array_equal(g.read(variants=slice(0, 40)), expected, equal_nan=True)
    # blocks cover every variant once, in order, with the same values
    positions = np.concatenate([p for p, _ in g.blocks(size=3000)])
    assert np.array_equal(positions, np.arange(10_000))
    first = next(g.blocks(size=40))[1]
    assert first.dtype == np.float32 and np.array_equal(first, expected, equal_nan=True)


@pytest.mark.parametrize("n_samples", [1, 4, 7, 13])
def test_write_read_round_trip_with_missing_values(tmp_path, n_samples):
    rng = np.random.default_rng(n_samples)
    counts = rng.integers(0, 3, size=(n_samples, 9)).astype(float)
    counts[rng.random(counts.shape) < 0.2] = np.nan
    hd.write_plink(tmp_path / "set", counts)
    g = hd.read_plink(tmp_path / "set.bed")
    assert np.array_equal(g.read(), counts, equal_nan=True)
    assert np.array_equal(_decode_bed(tmp_path / "set.bed", n_samples, 9), counts,
                          equal_nan=True)
    # samples and variants chosen by position, in any order
    rows, cols = np.array([n_samples - 1, 0]), np.array([5, 2, 7])
    assert np.array_equal(g.read(variants=cols, samples=rows), counts[rows][:, cols],
                          equal_nan=True)


def test_written_in_blocks_equals_written_at_once(tmp_path):
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 3, size=(6, 10))
    hd.write_plink(tmp_path / "once", counts)
    hd.write_plink(tmp_path / "blocks", blocks=[counts[:, :4], counts[:, 4:]])
    assert (tmp_path / "once.bed").read_bytes() == (tmp_path / "blocks.bed").read_bytes()


def test_broken_files_are_refused(tmp_path):
    counts = np.zeros((5, 3))
    hd.write_plink(tmp_path / "ok", counts)
    with pytest.raises(DataError, match="does not exist"):
        hd.read_plink(tmp_path / "absent")
    bed = (tmp_path / "ok.bed").read_bytes()
    for name, content, message in [("magic", b"\x00\x00\x00" + bed[3:], "not a SNP-major"),
                                   ("short", bed[:-1], "5 samples x 3 variants need")]:
        for suffix in (".bim", ".fam"):
            (tmp_path / (name + suffix)).write_bytes((tmp_path / ("ok" + suffix)).read_bytes())
        (tmp_path / (name + ".bed")).write_bytes(content)
        with pytest.raises(DataError, match=message):
            hd.read_plink(tmp_path / name)
    (tmp_path / "ok.bim").write_text("1 rs1 0 1 A\n")
    with pytest.raises(DataError, match="has 5 columns"):
        hd.read_plink(tmp_path / "ok")
    with pytest.raises(DataError, match="must be 0, 1, 2 or missing"):
        encode_bed_block(np.array([[3.0]]))


def test_from_frame_refuses_bad_counts():
    with pytest.raises(DataError, match="not 5 .*sample 'b'"):
        hd.Genotypes.from_frame(pd.DataFrame({"m": [0, 5]}, index=["a", "b"]))
    with pytest.raises(DataError, match="not unique"):
        hd.Genotypes.from_frame(pd.DataFrame({"m": [0, 1]}, index=["a", "a"]))


@pytest.mark.parametrize("n_samples", [1, 5, 13])
def test_bed_bytes_and_codes_equal_the_format_twin(tmp_path, n_samples):
    """Explicit reads of packed rows (runs of consecutive variants), and their int8
    decoding for samples in any order, against the plain-Python reading; a table in
    memory gives the same bytes."""
    rng = np.random.default_rng(20 + n_samples)
    counts = rng.integers(0, 3, size=(n_samples, 11)).astype(float)
    counts[rng.random(counts.shape) < 0.2] = np.nan
    hd.write_plink(tmp_path / "set", counts)
    g = hd.read_plink(tmp_path / "set")
    assert g.bed_width() == (n_samples + 3) // 4
    positions = np.array([0, 1, 2, 5, 9, 10])
    raw = (tmp_path / "set.bed").read_bytes()[3:]
    rows = [raw[p * g.bed_width():(p + 1) * g.bed_width()] for p in positions]
    assert g.bed_bytes(positions).tobytes() == b"".join(rows)
    expected = _decode_bed(tmp_path / "set.bed", n_samples, 11)
    samples = rng.permutation(n_samples)[: max(1, n_samples - 2)]
    codes = g.codes(positions, samples=samples)
    assert codes.dtype == np.int8
    decoded = np.where(codes < 0, np.nan, codes.astype(float))
    assert np.array_equal(decoded, expected[samples][:, positions], equal_nan=True)
    in_memory = hd.Genotypes.from_frame(pd.DataFrame(counts))
    assert np.array_equal(in_memory.bed_bytes(positions), g.bed_bytes(positions))
