"""Exceptions of henderson. Every one is a ``ValueError`` whose message names the
column, level, term or animal at fault."""


import re

#: terminal colour codes (formulaic marks the place of a parse error with them)
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class HendersonError(ValueError):
    """Base class of henderson's input errors."""

    def __init__(self, *args):
        super().__init__(*(_TERMINAL_CODES.sub("", a) if isinstance(a, str) else a
                           for a in args))


class FormulaError(HendersonError):
    """The model formula cannot be parsed or refers to something that does not exist."""


class DataError(HendersonError):
    """The data cannot support the model: missing values, too few levels, ..."""


class PedigreeError(HendersonError):
    """A pedigree is inconsistent: loops, duplicated ids, an animal its own ancestor."""


class ConvergenceWarning(UserWarning):
    """The optimiser stopped without meeting its convergence criteria."""


class RankDeficiencyWarning(UserWarning):
    """Fixed-effect columns were dropped because X is rank deficient."""


class SingularFitWarning(UserWarning):
    """The fit is on the boundary: a variance estimated as 0 or a correlation as ±1
    (lme4's "boundary (singular) fit" message)."""
