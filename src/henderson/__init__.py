"""henderson: linear mixed models on Henderson's equations with sparse Cholesky.

>>> import henderson as hd
>>> m = hd.lmm("Reaction ~ Days + (Days | Subject)", hd.datasets.load("sleepstudy"))
>>> round(m.sigma, 3)
25.592
"""
from . import datasets
from .design import Design, RandomTerm, build_design
from .errors import (ConvergenceWarning, DataError, FormulaError, HendersonError,
                     PedigreeError, RankDeficiencyWarning, SingularFitWarning)
from .fit import fit_design, lmm, load_compiled_kernels
from .formula import parse_formula
from .genomic import RelationshipMatrix, grm
from .gwas import gwas
from .plink import Genotypes, read_plink, write_plink
from .plots import manhattan, qq
from .inference import anova
from .breeding import legendre
from .breeding_model import BreedingModel
from .pedigree import Pedigree
from .persist import SavedModel, load
from .mme import MixedModelEquations
from .objective import Objective
from .results import LinearMixedModel
from .single_step import single_step
from .apy import ImplicitSingleStep, implicit_single_step
from .iterative import IterativeBlup, solve_blup
from .streaming import ChunkedData, chunked

__version__ = "0.1.0"

__all__ = [
    "lmm", "fit_design", "legendre", "BreedingModel", "anova", "chunked", "ChunkedData", "load", "SavedModel", "Pedigree", "RelationshipMatrix", "grm", "gwas", "Genotypes", "read_plink", "write_plink", "manhattan", "qq", "single_step", "implicit_single_step", "ImplicitSingleStep", "solve_blup", "IterativeBlup", "build_design", "parse_formula", "datasets", "Design",
    "RandomTerm", "MixedModelEquations", "Objective", "LinearMixedModel",
    "FormulaError", "DataError", "PedigreeError", "HendersonError",
    "ConvergenceWarning", "RankDeficiencyWarning", "SingularFitWarning",
    "load_compiled_kernels",
]
