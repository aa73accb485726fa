"""Stage 1 of the pipeline: lme4 formula syntax.

Splits ``y ~ fixed + (lhs | group) + (lhs || group)`` into the response, the fixed part
(handed to formulaic later) and one :class:`RandomBar` per random term, expanding
``a/b`` into ``a + a:b`` and ``||`` into independent terms, as lme4's ``findbars`` and
``expandDoubleVerts`` do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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
    """

    lhs: str
    group: str
    factors: tuple[str, ...]


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed part and random terms."""

    response: str
    fixed: str
    bars: tuple[RandomBar, ...]

    @property
    def text(self) -> str:
        parts = [self.fixed] + [f"({b.lhs} | {b.group})" for b in self.bars]
        return f"{self.response} ~ " + " + ".join(parts)


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


def _expand_group(group: str) -> list[tuple[str, tuple[str, ...]]]:
    """``a/b/c`` -> ``[a, b:a, c:b:a]`` (lme4's names); ``a:b`` -> ``[a:b]``."""
    nested = [g.strip() for g in group.split("/")]
    out = []
    for depth in range(1, len(nested) + 1):
        factors: list[str] = []
        for piece in reversed(nested[:depth]):
            factors.extend(f.strip() for f in piece.split(":"))
        for factor in factors:
            if not _NAME.match(factor):
                raise FormulaError(
                    f"grouping factor {factor!r} in '| {group}' must be a column name"
                )
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
    response, rhs = (s.strip() for s in formula.split("~"))
    if not response:
        raise FormulaError(f"formula {formula!r} has no response left of '~'")
    if not rhs:
        raise FormulaError(f"formula {formula!r} has no terms right of '~'")
    fixed_terms: list[str] = []
    bars: list[RandomBar] = []
    for term in _split_top_level(rhs, "+"):
        if term == "":
            raise FormulaError(f"empty term (a stray '+') in formula {formula!r}")
        inside = _strip_outer_parens(term)
        if inside is None or "|" not in inside:
            if "|" in term:
                raise FormulaError(f"random term {term!r} must be wrapped in parentheses")
            fixed_terms.append(term)
            continue
        double = "||" in inside
        lhs, _, group = inside.partition("||" if double else "|")
        lhs, group = lhs.strip(), group.strip()
        if not lhs or not group or "|" in group:
            raise FormulaError(f"malformed random term {term!r}")
        lhs_terms = _split_top_level(lhs, "+")
        for gname, factors in _expand_group(group):
            if not double:
                bars.append(RandomBar(lhs, gname, factors))
                continue
            covariates = [t for t in lhs_terms if t not in ("0", "1", "-1")]
            if _lhs_has_intercept(lhs_terms):
                bars.append(RandomBar("1", gname, factors))
            for cov in covariates:
                bars.append(RandomBar(f"0 + {cov}", gname, factors))
    fixed = " + ".join(fixed_terms) if fixed_terms else "1"
    return ParsedFormula(response=response, fixed=fixed, bars=tuple(bars))
