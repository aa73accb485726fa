"""Genotype input: PLINK .bed/.bim/.fam sets read lazily in blocks of variants.

A :class:`Genotypes` is what the genomic stages (``grm``, ``gwas``, ``single_step``)
read from: the samples (``fid``, ``iid``), the variants (``chrom``, ``snp``, ``cm``,
``pos``, ``a1``, ``a2``) and, on demand, a block of allele counts (copies of ``a1``;
NaN where the genotype is missing). The .bed file is decoded by bed-reader, a block at
a time, so a genome-wide set never has to fit in memory. ``write_plink`` writes the
same format (SNP-major, PLINK 1.9) for simulated sets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
import pandas as pd

from .errors import DataError
from .threads import active_threads

SAMPLE_COLUMNS = ["fid", "iid"]
VARIANT_COLUMNS = ["chrom", "snp", "cm", "pos", "a1", "a2"]
# the first three bytes of a SNP-major PLINK 1 .bed file
BED_MAGIC = bytes([0x6C, 0x1B, 0x01])
# a block of variants is read as at most this many bytes of float32 values
BLOCK_BYTES = 256 * 2**20


class _Prefix:
    """A PLINK prefix: ``data/chr.1`` names ``data/chr.1.bed`` (a dot in the name is not
    an extension unless it is .bed, .bim or .fam)."""

    def __init__(self, path):
        path = str(path)
        self.text = path[:-4] if path.endswith((".bed", ".bim", ".fam")) else path

    def with_suffix(self, suffix: str) -> Path:
        return Path(self.text + suffix)


def _prefix(path) -> _Prefix:
    return _Prefix(path)


def _read_table(path: Path, names: list[str], what: str) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"PLINK {what} file {str(path)!r} does not exist")
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, engine="c")
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame(columns=range(len(names)))
    if frame.shape[1] != len(names):
        raise DataError(f"PLINK {what} file {str(path)!r} has {frame.shape[1]} columns; "
                        f"a .{path.suffix[1:]} file has {len(names)}: {', '.join(names)}")
    frame.columns = names
    return frame


def non_numeric_counts(frame: pd.DataFrame, row_labels, row_noun: str,
                       column_noun: str) -> DataError:
    """The :class:`DataError` naming the first cell of ``frame`` that is not a number
    (for a table of allele counts that ``to_numpy(float)`` refused)."""
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna().to_numpy() & frame.notna().to_numpy()
    i, j = np.argwhere(bad)[0]
    return DataError(f"genotypes must be allele counts 0, 1 or 2, not {frame.iat[i, j]!r} "
                     f"({row_noun} {row_labels[i]!r}, {column_noun} {frame.columns[j]!r})")


class Genotypes:
    """Allele counts of samples at variants, read a block of variants at a time.

    Made by :func:`read_plink` (a PLINK .bed/.bim/.fam set) or
    :meth:`Genotypes.from_frame` (a table in memory).

    Attributes
    ----------
    samples : DataFrame
        ``fid``, ``iid``, one row per sample in file order.
    variants : DataFrame
        ``chrom``, ``snp``, ``cm``, ``pos``, ``a1``, ``a2``, one row per variant in file
        order. Counts are copies of ``a1``.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> g = Genotypes.from_frame(pd.DataFrame({"m1": [0, 1, 2], "m2": [2, 2, np.nan]},
    ...                                       index=["a", "b", "c"]))
    >>> g.read()
    array([[ 0.,  2.],
           [ 1.,  2.],
           [ 2., nan]])
    >>> list(g.samples["iid"]), list(g.variants["snp"])
    (['a', 'b', 'c'], ['m1', 'm2'])
    """

    def __init__(self, samples: pd.DataFrame, variants: pd.DataFrame, *, bed_path=None,
                 values: np.ndarray | None = None):
        self.samples = samples.reset_index(drop=True)
        self.variants = variants.reset_index(drop=True)
        self._bed_path = bed_path
        self._values = values
        self._bed = None

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_frame(cls, frame: pd.DataFrame, chrom=None, pos=None) -> "Genotypes":
        """Genotypes from a table of samples (rows, index = ids) by variants (columns)
        holding 0/1/2 copies of the counted allele, NaN where missing.

        ``chrom`` and ``pos`` (one value per column, optional) place the variants on
        chromosomes, for ``loco`` scans and Manhattan plots.
        """
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(np.asarray(frame))
        if frame.ndim != 2 or frame.shape[0] == 0 or frame.shape[1] == 0:
            raise DataError(f"genotypes have {frame.shape[0]} sample(s) and "
                            f"{frame.shape[1]} variant(s)")
        try:
            values = frame.to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise non_numeric_counts(frame, frame.index, "sample", "variant") from None
        wrong = ~np.isnan(values) & ~np.isin(values, (0.0, 1.0, 2.0))
        if wrong.any():
            i, j = np.argwhere(wrong)[0]
            raise DataError(f"genotypes must be allele counts 0, 1 or 2, not "
                            f"{values[i, j]:g} (sample {frame.index[i]!r}, variant "
                            f"{frame.columns[j]!r})")
        ids = pd.Index(frame.index.astype(str))
        if ids.has_duplicates:
            raise DataError("genotyped sample ids are not unique: "
                            + ", ".join(map(repr, ids[ids.duplicated()].unique()[:10])))
        m = frame.shape[1]
        samples = pd.DataFrame({"fid": ids, "iid": ids})
        variants = pd.DataFrame({
            "chrom": np.asarray(["0"] * m if chrom is None else chrom).astype(str),
            "snp": frame.columns.astype(str),
            "cm": np.zeros(m),
            "pos": np.arange(1, m + 1) if pos is None else np.asarray(pos, dtype=np.int64),
            "a1": ["1"] * m, "a2": ["2"] * m})
        return cls(samples, variants, values=values)

    # -- shape ---------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def n_variants(self) -> int:
        return len(self.variants)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_samples, self.n_variants

    def __repr__(self) -> str:
        source = f" from {str(self._bed_path)!r}" if self._bed_path is not None else ""
        chroms = self.variants["chrom"].nunique()
        return (f"<Genotypes{source}: {self.n_samples:,} samples x {self.n_variants:,} "
                f"variants on {chroms} chromosome(s)>")

    # -- reading -------------------------------------------------------------------
    def _open(self):
        if self._bed is None:
            from bed_reader import open_bed

            try:
                self._bed = open_bed(self._bed_path, iid_count=self.n_samples,
                                     sid_count=self.n_variants, count_A1=True)
            except Exception as exc:  # bed-reader raises ValueError / OSError variants
                raise DataError(f"cannot read PLINK .bed file {str(self._bed_path)!r}: "
                                f"{exc}") from exc
        return self._bed

    def read(self, variants=None, samples=None, dtype=np.float64) -> np.ndarray:
        """Allele counts, (samples x variants), Fortran order, NaN where missing.

        Parameters
        ----------
        variants, samples : slice, integer positions or boolean mask, optional
            Which variants (columns) and samples (rows); all by default.
        dtype : float32 or float64
        """
        variants = slice(None) if variants is None else variants
        samples = slice(None) if samples is None else samples
        if self._values is not None:
            return np.asfortranarray(self._values[samples][:, variants], dtype=dtype)
        bed = self._open()
        try:
            return bed.read(index=np.s_[samples, variants], dtype=np.dtype(dtype).name,
                            order="F", num_threads=_threads())
        except Exception as exc:
            raise DataError(f"cannot read PLINK .bed file {str(self._bed_path)!r}: "
                            f"{exc}") from exc

    def bed_width(self) -> int:
        """Bytes per variant in the .bed file: four samples a byte."""
        return (self.n_samples + 3) // 4

    def bed_bytes(self, positions) -> np.ndarray:
        """The packed .bed bytes of the variants at ``positions`` (ascending), as a
        (variants x :meth:`bed_width`) uint8 array.

        Read with explicit file reads of each run of consecutive variants (not a
        memory map, whose pages of a 25 GB file count as resident memory until the
        kernel drops them); a table in memory is encoded.
        """
        positions = np.asarray(positions, dtype=np.int64)
        width = self.bed_width()
        if self._values is not None:
            packed = encode_bed_block(self._values[:, positions])
            return np.frombuffer(packed, dtype=np.uint8).reshape(len(positions), width)
        out = np.empty((len(positions), width), dtype=np.uint8)
        if not len(positions):
            return out
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(positions)]])
        try:
            with open(self._bed_path, "rb", buffering=0) as handle:
                for first, last in zip(starts, stops):
                    handle.seek(3 + int(positions[first]) * width)
                    view = memoryview(out[first:last].reshape(-1))
                    got = handle.readinto(view)
                    if got != view.nbytes:
                        raise DataError(f"{str(self._bed_path)!r} ended early: variant "
                                        f"{int(positions[first])} needs {view.nbytes:,} "
                                        f"bytes, {got:,} read")
        except OSError as exc:
            raise DataError(f"cannot read PLINK .bed file {str(self._bed_path)!r}: "
                            f"{exc}") from exc
        return out

    def codes(self, positions, samples=None) -> np.ndarray:
        """Allele counts of the variants at ``positions`` as int8 (samples x
        variants, Fortran order), -1 where missing: a quarter of float32's memory,
        decoded from :meth:`bed_bytes`."""
        samples = (np.arange(self.n_samples) if samples is None
                   else np.arange(self.n_samples)[samples])
        return decode_bed(self.bed_bytes(positions), samples.astype(np.int64))

    def block_size(self, n_samples: int | None = None, itemsize: int = 4) -> int:
        """Variants per block so that a block of float values stays near 256 MB."""
        rows = max(self.n_samples if n_samples is None else n_samples, 1)
        return int(max(64, min(self.n_variants, BLOCK_BYTES // (rows * itemsize))))

    def blocks(self, size: int | None = None, variants=None, samples=None,
               dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, counts)`` for consecutive blocks of variants.

        ``positions`` are the variants' row numbers in :attr:`variants`; ``counts`` is
        (samples x len(positions)), NaN where missing.
        """
        positions = (np.arange(self.n_variants) if variants is None
                     else np.arange(self.n_variants)[variants])
        n_rows = self.n_samples if samples is None else len(np.arange(self.n_samples)[samples])
        size = size or self.block_size(n_rows, np.dtype(dtype).itemsize)
        for start in range(0, len(positions), size):
            block = positions[start:start + size]
            contiguous = len(block) and block[-1] - block[0] + 1 == len(block)
            index = slice(int(block[0]), int(block[-1]) + 1) if contiguous else block
            yield block, self.read(variants=index, samples=samples, dtype=dtype)


def _threads() -> int:
    """bed-reader's decoding threads: the fit's (``henderson.threads``); a scan
    decodes a block, then rotates it with BLAS, never both at once."""
    return active_threads()


def read_plink(path) -> Genotypes:
    """Open a PLINK 1 binary set (``path.bed``, ``path.bim``, ``path.fam``).

    The .bim and .fam tables are read now; genotypes are decoded a block at a time when
    a scan or a GRM asks for them.

    Parameters
    ----------
    path : str or Path
        The common prefix (``data/chr`` for ``data/chr.bed`` ...) or any of the three
        files.

    Returns
    -------
    Genotypes

    Raises
    ------
    DataError
        A missing file, a .bim or .fam of the wrong shape, a .bed file that is not a
        SNP-major PLINK 1 file or whose size does not match the samples and variants.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from henderson.plink import write_plink
    >>> prefix = os.path.join(tempfile.mkdtemp(), "toy")
    >>> write_plink(prefix, np.array([[0, 1], [2, np.nan], [1, 1]]))
    >>> g = read_plink(prefix)
    >>> g.shape, g.read()[1]
    ((3, 2), array([ 2., nan]))
    """
    prefix = _prefix(path)
    fam = _read_table(prefix.with_suffix(".fam"),
                      ["fid", "iid", "father", "mother", "sex", "phenotype"], ".fam")
    bim = _read_table(prefix.with_suffix(".bim"), VARIANT_COLUMNS, ".bim")
    bed_path = prefix.with_suffix(".bed")
    if not bed_path.exists():
        raise DataError(f"PLINK .bed file {str(bed_path)!r} does not exist")
    with open(bed_path, "rb") as handle:
        magic = handle.read(3)
    if magic != BED_MAGIC:
        raise DataError(f"{str(bed_path)!r} is not a SNP-major PLINK 1 .bed file (its first "
                        f"bytes are {magic.hex()}, not 6c1b01)")
    expected = 3 + len(bim) * ((len(fam) + 3) // 4)
    if bed_path.stat().st_size != expected:
        raise DataError(f"{str(bed_path)!r} has {bed_path.stat().st_size:,} bytes; "
                        f"{len(fam):,} samples x {len(bim):,} variants need {expected:,}")
    iid = fam["iid"]
    if iid.duplicated().any():
        raise DataError(f"{str(prefix.with_suffix('.fam'))!r} repeats sample ids: "
                        + ", ".join(map(repr, iid[iid.duplicated()].unique()[:10])))
    variants = bim.assign(cm=pd.to_numeric(bim["cm"], errors="coerce"),
                          pos=pd.to_numeric(bim["pos"], errors="coerce").astype("Int64"))
    return Genotypes(fam[SAMPLE_COLUMNS], variants, bed_path=str(bed_path))


# PLINK's 2-bit codes by copies of a1: 2 -> 00, 1 -> 10, 0 -> 11, missing -> 01
_CODE_BY_COUNT = np.array([0b11, 0b10, 0b00, 0b01], dtype=np.uint8)
#: copies of a1 by 2-bit code (the inverse of _CODE_BY_COUNT), -1 for missing
COUNT_BY_CODE = np.array([2, -1, 1, 0], dtype=np.int8)


@numba.njit(cache=True)
def bed_count(packed, variant, sample):
    """Copies of a1 of ``sample`` at row ``variant`` of packed .bed bytes (-1: missing)."""
    code = (packed[variant, sample >> 2] >> ((sample & 3) << 1)) & 3
    if code == 0:
        return 2
    if code == 2:
        return 1
    if code == 3:
        return 0
    return -1


@numba.njit(cache=True)
def decode_bed(packed, samples):
    """int8 counts (len(samples) x variants, Fortran order; -1 missing) of packed
    .bed rows (variants x bytes), for the samples at the positions ``samples``."""
    k = packed.shape[0]
    n = len(samples)
    out = np.empty((k, n), dtype=np.int8)
    for j in range(k):
        for i in range(n):
            out[j, i] = bed_count(packed, j, samples[i])
    return out.T


def encode_bed_block(counts: np.ndarray) -> bytes:
    """The .bed bytes of a block of variants: ``counts`` is (samples x variants) of
    0/1/2 copies of a1, negative or NaN where missing."""
    counts = np.asarray(counts)
    missing = np.isnan(counts) if counts.dtype.kind == "f" else np.zeros(counts.shape, bool)
    missing |= counts < 0
    if not np.isin(counts[~missing], (0, 1, 2)).all():
        raise DataError("genotypes to write must be 0, 1, 2 or missing (NaN or negative)")
    codes = np.where(missing, 3, counts).astype(np.int8)
    if codes.shape[1] == 0:
        return b""
    n = codes.shape[0]
    padded = np.zeros(((n + 3) // 4 * 4, codes.shape[1]), dtype=np.uint8)
    padded[:n] = _CODE_BY_COUNT[codes]
    quads = padded.T.reshape(codes.shape[1], -1, 4)
    packed = quads[:, :, 0] | (quads[:, :, 1] << 2) | (quads[:, :, 2] << 4) | (quads[:, :, 3] << 6)
    return packed.astype(np.uint8).tobytes()


def write_plink(path, counts=None, samples=None, variants=None, blocks=None) -> None:
    """Write a PLINK 1 binary set (SNP-major).

    Parameters
    ----------
    path : str or Path
        The prefix: ``path.bed``, ``path.bim`` and ``path.fam`` are written.
    counts : array (samples x variants), optional
        Copies of a1 (0/1/2; NaN or negative where missing).
    samples : DataFrame with ``iid`` (and ``fid``), optional
    variants : DataFrame with the columns of a .bim file, optional
        Defaults: ids ``s1 ...``, one chromosome ``1``, alleles ``A``/``B``.
    blocks : iterable of arrays, optional
        Instead of ``counts``: blocks of variants, each (samples x k), written one
        after another (a genome-wide simulation never held in memory at once).
    """
    prefix = _prefix(path)
    if (counts is None) == (blocks is None):
        raise ValueError("give counts or blocks, not both or neither")
    blocks = [np.asarray(counts)] if counts is not None else blocks
    n_variants, n_samples = 0, None
    with open(prefix.with_suffix(".bed"), "wb") as handle:
        handle.write(BED_MAGIC)
        for block in blocks:
            block = np.asarray(block)
            if n_samples is None:
                n_samples = block.shape[0]
            elif block.shape[0] != n_samples:
                raise DataError(f"a block has {block.shape[0]} samples, not {n_samples}")
            handle.write(encode_bed_block(block))
            n_variants += block.shape[1]
    if samples is None:
        ids = [f"s{i + 1}" for i in range(n_samples)]
        samples = pd.DataFrame({"fid": ids, "iid": ids})
    samples = pd.DataFrame(samples)
    if "fid" not in samples:
        samples = samples.assign(fid=samples["iid"])
    fam = pd.DataFrame({"fid": samples["fid"].astype(str), "iid": samples["iid"].astype(str),
                        "father": "0", "mother": "0", "sex": "0", "phenotype": "-9"})
    if variants is None:
        variants = pd.DataFrame({"chrom": "1", "snp": [f"v{j + 1}" for j in range(n_variants)],
                                 "cm": 0, "pos": np.arange(1, n_variants + 1),
                                 "a1": "A", "a2": "B"})
    if len(fam) != n_samples or len(variants) != n_variants:
        raise DataError(f"{len(fam)} samples and {len(variants)} variants described for "
                        f"genotypes of {n_samples} x {n_variants}")
    fam.to_csv(prefix.with_suffix(".fam"), sep=" ", header=False, index=False)
    pd.DataFrame(variants)[VARIANT_COLUMNS].to_csv(prefix.with_suffix(".bim"), sep="\t",
                                                   header=False, index=False)
