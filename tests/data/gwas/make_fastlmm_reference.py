"""Scans of FaST-LMM's own test data (toydata.5chrom, 500 people x 10,000 SNPs on 5
chromosomes, shipped with FaST-LMM 0.6.13 under the Apache 2.0 licence) computed by
FaST-LMM's ``single_snp``. The CSVs are the held-out reference of tests/test_gwas.py;
this script is how they were made (it needs ``pip install fastlmm``, which the tests
do not):

    /path/to/venv-with-fastlmm/bin/python make_fastlmm_reference.py
"""
from pathlib import Path

import fastlmm
from fastlmm.association import single_snp
from pysnptools.snpreader import Bed

here = Path(__file__).parent
bed = Bed(str(here / "toydata.5chrom.bed"), count_A1=True)
columns = ["SNP", "Chr", "ChrPos", "PValue", "SnpWeight", "SnpWeightSE", "Nullh2"]
for name, loco, covar in [("fastlmm_toydata.csv", False, None),
                          ("fastlmm_toydata_covar.csv", False, "toydata.cov"),
                          ("fastlmm_toydata_loco.csv", True, "toydata.cov")]:
    frame = single_snp(bed, str(here / "toydata.phe"), K0=bed,
                       covar=None if covar is None else str(here / covar),
                       leave_out_one_chrom=loco, count_A1=True)
    frame = frame.sort_values(["Chr", "ChrPos"])[columns]
    frame.to_csv(here / name, index=False, float_format="%.10g")
    print(name, len(frame), frame["Nullh2"].unique()[:5])
