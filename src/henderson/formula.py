"""Stage 1 of the pipeline: lme4 formula syntax.

Splits ``y ~ fixed + (lhs | group) + (lhs || group)`` into the response, the fixed part
(handed to formulaic later) and one :class:`RandomBar` per random term, expanding
``a/b`` into ``a + a:b`` and ``||`` into independent terms, as lme4's ``findbars`` and
``expandDoubleVerts`` do; ``offset(...)`` terms are taken out of the fixed part.

Formulas mean what they mean in R. Inside a function call R's arithmetic is rewritten
for Python (``I(x^2)`` is a power, not formulaic's bitwise XOR on integers; ``%%``,
``%/%``, ``TRUE``), and :data:`R_FUNCTIONS` gives formulaic R's functions (``log``
with a base, ``sqrt``, ``factor``, ...). Where R and formulaic part ways and nothing
can be rewritten (``.`` for all columns, which formulaic also fills with the
response), the formula is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .covariance import STRUCTURES
from .errors import FormulaError

_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class RandomBar:
    """One random-effects term ``(lhs | group)``.

    Attributes
    ----------
    lhs : str
        Formula text of the term's covariates, e.g. ``"1 + Days"`` or ``"0 + Days"``.
    group : str
        The grouping expression as written, e.g. ``"Subject"`` or ``"batch:cask"``.
    factors : tuple of str
        The data columns whose interaction forms the grouping factor.
    structure : str
        The covariance structure of the term's coefficients: ``"us"`` for lme4's
        ``(lhs | group)``, or glmmTMB's ``us``/``diag``/``cs``/``ar1``/``toep`` written
        around the bar (``ar1(0 + f | g)``); see :mod:`henderson.covariance`.
    """

    lhs: str
    group: str
    factors: tuple[str, ...]
    structure: str = "us"

    @property
    def text(self) -> str:
        bar = f"({self.lhs} | {self.group})"
        return bar if self.structure == "us" else f"{self.structure}{bar}"


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed part, offsets and random terms.

    ``fixed`` and each bar's ``lhs`` are formulaic specs (R arithmetic inside calls
    rewritten for Python); ``response`` and ``offsets`` are R expressions as written;
    ``source`` is the formula as the user wrote it.
    """

    response: str
    fixed: str
    bars: tuple[RandomBar, ...]
    offsets: tuple[str, ...] = ()
    source: str = field(default="", compare=False)

    @property
    def text(self) -> str:
        if self.source:
            return self.source
        parts = [self.fixed] + [f"offset({o})" for o in self.offsets] \
            + [b.text for b in self.bars]
        return f"{self.response} ~ " + " + ".join(parts)

    @property
    def response_is_column(self) -> bool:
        """The response is a column name (not an expression such as ``log(y)``)."""
        return _NAME.match(self.response) is not None


# ---------------------------------------------------------------- R expressions
#: a term written as a call around a bar: glmmTMB's covariance structures (and others,
#: refused by name)
_STRUCTURE_CALL = re.compile(r"([A-Za-z][A-Za-z0-9_.]*)\s*\((.*)\)", flags=re.S)

_R_OPERATORS = (("%/%", "//"), ("%%", "%"), ("^", "**"))
#: R's logical constants (not T and F, which R lets a data column mask: a column named
#: T is read as the column, as R reads it)
_R_CONSTANTS = {"TRUE": "True", "FALSE": "False"}
_WORD = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")


def python_expression(text: str) -> str:
    """Rewrite R arithmetic inside function calls for Python: ``^`` -> ``**``,
    ``%%`` -> ``%``, ``%/%`` -> ``//``, ``TRUE``/``FALSE`` -> ``True``/``False``.
    Outside calls the formula's own operators (``(a + b)^2`` crossing) are kept.

    Examples
    --------
    >>> python_expression("x + I(x^2) + (a + b)^2 + log(y %% 3)")
    'x + I(x**2) + (a + b)^2 + log(y % 3)'
    """
    out: list[str] = []
    calls: list[bool] = []  # per open parenthesis: whether it opens a function call
    i = 0
    while i < len(text):
        char = text[i]
        if char == "(":
            before = "".join(out).rstrip()
            calls.append(bool(before) and (before[-1].isalnum() or before[-1] in "._"))
        elif char == ")" and calls:
            calls.pop()
        if any(calls):
            for r_op, py_op in _R_OPERATORS:
                if text.startswith(r_op, i):
                    out.append(py_op)
                    i += len(r_op)
                    break
            else:
                word = _WORD.match(text, i) if (char.isalpha() or char in "._") else None
                if word and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "._")):
                    out.append(_R_CONSTANTS.get(word.group(), word.group()))
                    i = word.end()
                else:
                    out.append(char)
                    i += 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


def r_label(value) -> str:
    """A value as a level label: integers and integral floats without a decimal point
    (``308.0`` -> ``"308"``), other floats to 15 significant digits (R's precision;
    R would write 100000 as ``"1e+05"``, here ``"100000"``), strings as they are.
    Level labels of grouping factors are these, so that 308 and 308.0 (and "308")
    name the same level, as in R, whose levels are strings.
    """
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{float(value):.15g}"
    return str(value)


def r_labels(values) -> np.ndarray:
    """:func:`r_label` of every value (an object array), vectorised for numbers."""
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(str).astype(object)
    if array.dtype.kind == "f":
        out = np.empty(len(array), dtype=object)
        integral = np.isfinite(array) & (np.mod(array, 1.0) == 0) & (np.abs(array) < 1e15)
        out[integral] = array[integral].astype(np.int64).astype(str)
        out[~integral] = [f"{v:.15g}" for v in array[~integral]]
        return out
    return np.array([r_label(v) for v in array], dtype=object)


def factor(values):
    """R's ``factor(x)``: a categorical whose levels are the distinct values, sorted
    (numbers by value), labelled as R labels them (``factor(x)2`` for the level 2)."""
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        return values
    series = pd.Series(np.asarray(values, dtype=object))
    uniques = pd.unique(series.dropna())
    try:
        uniques = np.sort(uniques)
    except TypeError:  # mixed types: order by label, as R orders character levels
        uniques = np.array(sorted(uniques, key=r_label), dtype=object)
    labels = list(dict.fromkeys(r_label(v) for v in uniques))
    codes = pd.Index(labels).get_indexer(
        np.where(series.isna().to_numpy(), None, r_labels(series.to_numpy())))
    return pd.Series(pd.Categorical.from_codes(codes, categories=labels),
                     index=getattr(values, "index", None))


def _log(x, base=np.e):
    """R's ``log(x, base)``."""
    if base == np.e:
        return np.log(x)
    return np.log(x) / np.log(base)


#: R functions for formulaic's evaluation of formula terms (numpy's where R has the
#: same function); formulaic's own ``C``, ``center``, ``scale``, ``poly`` are R's
R_FUNCTIONS = {
    "log": _log, "log2": np.log2, "log10": np.log10, "log1p": np.log1p,
    "exp": np.exp, "expm1": np.expm1, "sqrt": np.sqrt, "abs": np.abs,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos,
    "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh,
    "floor": np.floor, "ceiling": np.ceil, "round": np.round, "trunc": np.trunc,
    "sign": np.sign, "pmin": np.minimum, "pmax": np.maximum, "factor": factor,
    "as.factor": factor, "as_factor": factor,
}


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` characters that are outside parentheses."""
    pieces, depth, start = [], 0, 0
    for pos, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced ')' in formula term {text!r}")
        elif char == sep and depth == 0:
            pieces.append(text[start:pos])
            start = pos + 1
    if depth != 0:
        raise FormulaError(f"unbalanced '(' in formula {text!r}")
    pieces.append(text[start:])
    return [p.strip() for p in pieces]


def _strip_outer_parens(term: str) -> str | None:
    """Return the inside of ``(...)`` when the parentheses enclose the whole term."""
    if not (term.startswith("(") and term.endswith(")")):
        return None
    depth = 0
    for pos, char in enumerate(term):
        depth += char == "("
        depth -= char == ")"
        if depth == 0 and pos < len(term) - 1:
            return None
    return term[1:-1].strip()


def _split_names(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside backticks (R quotes names such as `my subj` so)."""
    pieces, current, quoted = [], [], False
    for char in text:
        if char == "`":
            quoted = not quoted
        if char == sep and not quoted:
            pieces.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if quoted:
        raise FormulaError(f"unbalanced backtick in {text!r}")
    pieces.append("".join(current).strip())
    return pieces


def _column_name(factor: str, group: str) -> str:
    """A grouping column named in a bar: a plain name or a backticked one."""
    if len(factor) > 2 and factor.startswith("`") and factor.endswith("`"):
        return factor[1:-1]
    if not _NAME.match(factor):
        raise FormulaError(f"grouping factor {factor!r} in '| {group}' must be a column "
                           "name (in backticks if it has spaces or symbols)")
    return factor


def _expand_group(group: str) -> list[tuple[str, tuple[str, ...]]]:
    """``a/b/c`` -> ``[a, b:a, c:b:a]`` (lme4's names); ``a:b`` -> ``[a:b]``;
    backticked names are columns whatever they hold."""
    nested = _split_names(group, "/")
    out = []
    for depth in range(1, len(nested) + 1):
        factors: list[str] = []
        for piece in reversed(nested[:depth]):
            factors.extend(_column_name(f, group) for f in _split_names(piece, ":"))
        out.append((":".join(factors), tuple(factors)))
    return out


def _lhs_has_intercept(terms: list[str]) -> bool:
    if any(t in ("0", "-1") or t.endswith("- 1") or t.endswith("-1") for t in terms):
        return False
    return True


def parse_formula(formula: str) -> ParsedFormula:
    """Parse an lme4 model formula.

    Parameters
    ----------
    formula : str
        ``"response ~ fixed terms + (lhs | group) + ..."``.

    Returns
    -------
    ParsedFormula

    Examples
    --------
    >>> f = parse_formula("y ~ x + (x || g) + (1 | a/b)")
    >>> [(b.lhs, b.group) for b in f.bars]
    [('1', 'g'), ('0 + x', 'g'), ('1', 'a'), ('1', 'b:a')]
    """
    if not isinstance(formula, str) or formula.count("~") != 1:
        raise FormulaError(f"formula must have the form 'y ~ terms', got {formula!r}")
    source = " ".join(formula.split())
    response, rhs = (s.strip() for s in formula.split("~"))
    if not response:
        raise FormulaError(f"formula {formula!r} has no response left of '~'")
    if not rhs:
        raise FormulaError(f"formula {formula!r} has no terms right of '~'")
    fixed_terms: list[str] = []
    offsets: list[str] = []
    bars: list[RandomBar] = []
    for term in _split_top_level(rhs, "+"):
        if term == "":
            raise FormulaError(f"empty term (a stray '+') in formula {formula!r}")
        while (inner := _strip_outer_parens(term)) is not None and inner.startswith("(") \
                and _strip_outer_parens(inner) is not None:
            term = inner  # ((1 | g)) is (1 | g), as in R
        offset = re.fullmatch(r"offset\s*\((.*)\)", term, flags=re.S)
        if offset and _strip_outer_parens(term[term.index("("):]) is not None:
            offsets.append(offset.group(1).strip())
            continue
        if term == "." or re.search(r"(^|[\s+*:(])\.($|[\s+*:)-])", term):
            raise FormulaError("'.' (all other columns) is not supported in formulas; "
                               "name the columns")
        structure = "us"
        call = _STRUCTURE_CALL.fullmatch(term)
        if call and call.group(1) in STRUCTURES and "|" not in call.group(2) \
                and _strip_outer_parens(term[len(call.group(1)):].strip()) is not None:
            raise FormulaError(f"{term!r}: a covariance structure needs a grouping factor, "
                               f"e.g. {call.group(1)}(0 + {call.group(2).strip()} | g)")
        if call and "|" in call.group(2) \
                and _strip_outer_parens(term[len(call.group(1)):].strip()):
            structure = call.group(1)
            if structure not in STRUCTURES:
                raise FormulaError(
                    f"covariance structure {structure!r} in {term!r} is not one henderson "
                    f"fits; it has {', '.join(STRUCTURES)}")
            inside = call.group(2).strip()
            if "||" in inside:
                raise FormulaError(f"{term!r}: '||' inside a structure; write "
                                   f"diag(...) for independent coefficients")
        else:
            inside = _strip_outer_parens(term)
        if inside is None or "|" not in inside:
            if "|" in term:
                raise FormulaError(f"random term {term!r} must be wrapped in parentheses")
            fixed_terms.append(term)
            continue
        double = "||" in inside
        lhs, _, group = inside.partition("||" if double else "|")
        lhs, group = python_expression(lhs.strip()), group.strip()
        if not lhs or not group or "|" in group:
            raise FormulaError(f"malformed random term {term!r}")
        lhs_terms = _split_top_level(lhs, "+")
        for gname, factors in _expand_group(group):
            if not double:
                bars.append(RandomBar(lhs, gname, factors, structure))
                continue
            covariates = [t for t in lhs_terms if t not in ("0", "1", "-1")]
            if _lhs_has_intercept(lhs_terms):
                bars.append(RandomBar("1", gname, factors))
            for cov in covariates:
                bars.append(RandomBar(f"0 + {cov}", gname, factors))
    fixed = python_expression(" + ".join(fixed_terms)) if fixed_terms else "1"
    return ParsedFormula(response=response, fixed=fixed, bars=tuple(bars),
                         offsets=tuple(offsets), source=source)
