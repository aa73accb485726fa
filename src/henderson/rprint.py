"""R's printing of numbers, so that a summary reads digit for digit as lme4's.

lme4's ``summary()`` is R's ``format()`` (``formatReal`` in R's C code: the fewest
decimals that show every value to ``digits`` significant digits, scientific when that
is narrower), ``printCoefmat`` (estimates and SEs rounded together, ``< 2e-16`` p-values
from ``format.pval``, significance stars), ``abbreviate`` (the column names of the
correlation of fixed effects) and ``print.default`` of a character matrix. This module
ports those four, checked against R 4's own output in ``tests/test_rprint.py``.

Examples
--------
>>> format_numbers([612.0921, 35.0713, 654.9414], digits=4)
['612.09', ' 35.07', '654.94']
>>> format_pvalues([1.2e-17, 3.263e-06, 0.4], digits=3)
['< 2e-16', '3.26e-06', '0.4']
>>> abbreviate(["(Intercept)", "Days"], minlength=6)
['(Intr)', 'Days']
"""
from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import numpy as np

#: R's .Machine$double.eps, printCoefmat's ``eps.Pvalue``
DOUBLE_EPS = 2.220446049250313e-16

SIGNIF_LEGEND = "Signif. codes:  0 ‘***’ 0.001 ‘**’ 0.01 ‘*’ 0.05 ‘.’ 0.1 ‘ ’ 1"


def _scientific(x: float, digits: int) -> tuple[int, int, int, bool]:
    """R's ``scientific()``: sign, decimal exponent, significant digits (trailing zeros
    dropped) of ``x`` shown to ``digits`` digits, and whether rounding widens it."""
    if x == 0.0:
        return 0, 0, 1, False
    negative = int(x < 0)
    r = abs(x)
    with localcontext() as context:
        context.prec = 60
        exact = Decimal(r)
        kp = exact.adjusted() - digits + 1
        scaled = exact.scaleb(-kp)
        if scaled < Decimal(10) ** (digits - 1):
            scaled, kp = scaled * 10, kp - 1
        alpha = int(scaled.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    nsig = digits
    for _ in range(digits):
        if alpha % 10 == 0:
            nsig -= 1
            alpha //= 10
        else:
            break
    if nsig == 0 and digits > 0:
        nsig, kp = 1, kp + 1
    kpower = kp + digits - 1
    right = min(max(digits - kpower, 0), 22)
    widens = 0 < kpower <= 22 and r < 10.0 ** kpower - 0.5 / 10.0 ** right
    return negative, kpower, nsig, widens


def _layout(values: np.ndarray, digits: int, nsmall: int = 0):
    """R's ``formatReal``: (width, decimals, exponent digits or 0 for fixed)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0, 0, 0
    negative = 0
    right_max = left_max = signed_left_max = nsig_max = -10 ** 9
    e_max, e_min = -10 ** 9, 10 ** 9
    for x in finite:
        neg, kpower, nsig, widens = _scientific(float(x), digits)
        left = kpower + 1 - int(widens)
        signed_left = neg + (1 if left <= 0 else left)
        negative |= neg
        right_max = max(right_max, nsig - left)
        left_max = max(left_max, left)
        signed_left_max = max(signed_left_max, signed_left)
        nsig_max = max(nsig_max, nsig)
        e_max, e_min = max(e_max, kpower), min(e_min, kpower)
    if left_max < 0:
        signed_left_max = 1 + negative
    right = max(right_max, 0)
    width_fixed = signed_left_max + right + (right != 0)
    exponent = 2 if (e_max >= 100 or e_min <= -99) else 1
    decimals = nsig_max - 1
    width = negative + (decimals > 0) + decimals + 4 + exponent
    if width_fixed <= width:
        if nsmall > right:
            right = nsmall
            width_fixed = signed_left_max + right + (right != 0)
        return width_fixed, right, 0
    return width, decimals, exponent


def format_numbers(values, digits: int = 7, nsmall: int = 0, na: str = "NaN") -> list[str]:
    """R's ``format(x, digits=, nsmall=)`` of a double vector: one common width and
    number of decimals (or scientific notation when that is narrower). A NaN prints
    as ``na``: ``"NaN"`` (what R prints for a NaN it computed, e.g. a correlation of a
    zero SD), or ``"NA"`` for a value that is missing.

    Examples
    --------
    >>> format_numbers([24.7405, 5.9221, 25.5918], digits=4)
    ['24.741', ' 5.922', '25.592']
    >>> format_numbers([3.2e-06, 0.5], digits=3)
    ['3.2e-06', '5.0e-01']
    """
    values = np.asarray(values, dtype=float).ravel()
    width, decimals, exponent = _layout(values, digits, nsmall)
    if np.isnan(values).any():
        width = max(width, len(na))
    if np.isinf(values).any():
        width = max(width, 4 if (values == -np.inf).any() else 3)
    out = []
    for x in values:
        if np.isnan(x):
            text = na
        elif np.isinf(x):
            text = "Inf" if x > 0 else "-Inf"
        elif exponent:
            text = f"{x + 0.0:.{decimals}e}"     # R prints -0 as 0
            mantissa, power = text.split("e")
            sign, power = power[0], power[1:].lstrip("0")
            text = f"{mantissa}e{sign}{power.rjust(exponent + (exponent == 1), '0')}"
        else:
            text = f"{x + 0.0:.{decimals}f}"      # R prints -0 as 0
        out.append(text.rjust(width))
    return out


def _round_one(x: float, digits: int) -> float:
    """R 4's ``fround``: of the two neighbours ``floor(x·10^d)/10^d`` and
    ``ceil(x·10^d)/10^d``, the nearer in double arithmetic, the even one on a tie."""
    if not math.isfinite(x) or x == 0.0:
        return x
    if x < 0:
        return -_round_one(-x, digits)
    if digits > 0 and math.log10(x) + digits > 15:
        return x
    scale = 10.0 ** abs(digits)
    scaled = x * scale if digits >= 0 else x / scale
    low, high = math.floor(scaled), math.ceil(scaled)
    if digits >= 0:
        down, up = low / scale, high / scale
    else:
        down, up = low * scale, high * scale
    below, above = x - down, up - x
    return up if (above < below or (above == below and low % 2 == 1)) else down


def round_half_even(x, decimals: int):
    """R's ``round(x, digits)`` (R 4's algorithm: the nearer of the two decimal
    neighbours, ties to even), element by element."""
    values = np.asarray(x, dtype=float)
    return np.array([_round_one(float(v), decimals) for v in values.ravel()]
                    ).reshape(values.shape)


def zapsmall(x, digits: int) -> np.ndarray:
    """R's ``zapsmall``: round so that values tiny beside the largest become 0."""
    x = np.asarray(x, dtype=float)
    finite = np.abs(x[np.isfinite(x)])
    largest = finite.max() if finite.size else 0.0
    # R 4.2's zapsmall: digits - log10(max), which round() takes to the nearest integer
    places = max(0, math.floor(digits - math.log10(largest) + 0.5)) if largest > 0 else digits
    return round_half_even(x, places)


def format_pvalues(pvalues, digits: int = 3, eps: float = DOUBLE_EPS) -> list[str]:
    """R's ``format.pval``: p-values below ``eps`` as ``< 2e-16`` (``<2e-16`` when
    nothing else is wider), the rest to ``digits`` significant digits.

    Examples
    --------
    >>> format_pvalues([0.0, 0.0], digits=3)
    ['<2e-16', '<2e-16']
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = [""] * len(p)
    small = p < eps
    rest = np.flatnonzero(~small)
    texts = {}
    if rest.size:
        values = p[rest]
        exponent = np.floor(np.log10(np.where(values > 0, values, 1e-50)))
        fixed = (exponent >= -3) | ((exponent == -4) & (digits > 1))
        for mask in (fixed, ~fixed):
            if mask.any():
                for i, text in zip(rest[mask], format_numbers(values[mask], digits)):
                    texts[i] = text
        for i in rest:
            out[i] = texts[i]
    if small.any():
        places = max(1, digits - 2)
        if rest.size:
            widest = max(len(t) for t in texts.values())
            if places > 1 and places + 6 > widest:
                places = max(1, widest - 7)
            sep = "" if (places == 1 and widest <= 6) else " "
        else:
            sep = "" if places == 1 else " "
        bound = "<" + sep + format_numbers([eps], places)[0]
        for i in np.flatnonzero(small):
            out[i] = bound
    return out


def matrix_lines(cells, row_names, col_names, right: bool = True,
                 width: int = 80) -> list[str]:
    """R's ``print.default`` of a character matrix (``quote = FALSE``): row names
    left-justified, columns one space apart, justified right or left, and the columns
    that do not fit in ``width`` printed below in further blocks, each with the row
    names again.

    Examples
    --------
    >>> print("\\n".join(matrix_lines([["1", "22"]], ["a"], ["x", "y"])))
      x  y
    a 1 22
    """
    cells = [list(map(str, row)) for row in cells]
    row_width = max([len(r) for r in row_names] + [0])
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(col_names)]
    just = str.rjust if right else str.ljust
    blocks, start = [], 0
    while start < len(widths) or not blocks:
        stop, used = start, row_width
        while stop < len(widths) and (stop == start or used + 1 + widths[stop] < width):
            used += 1 + widths[stop]
            stop += 1
        blocks.append(range(start, stop))
        start = stop
        if not widths:
            break
    lines = []
    for block in blocks:
        lines.append(" " * row_width + "".join(" " + just(col_names[j], widths[j])
                                                for j in block))
        for name, row in zip(row_names, cells):
            lines.append(name.ljust(row_width)
                         + "".join(" " + just(row[j], widths[j]) for j in block))
    return lines


def named_vector_lines(texts, names, gap: int = 1, width: int = 80) -> list[str]:
    """R's ``print`` of a named vector of formatted values: names above values, every
    column as wide as the widest, ``gap`` spaces after each, wrapped at ``width``."""
    column = max([len(t) for t in texts] + [len(n) for n in names])
    per_line = max(1, width // (column + gap))
    lines = []
    for start in range(0, len(texts), per_line):
        chunk = slice(start, start + per_line)
        lines.append("".join(n.rjust(column) + " " * gap for n in names[chunk]))
        lines.append("".join(t.rjust(column) + " " * gap for t in texts[chunk]))
    return lines


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    for cut, symbol in ((0.001, "***"), (0.01, "**"), (0.05, "*"), (0.1, ".")):
        if p <= cut:
            return symbol
    return " "


def coefficient_lines(values, row_names, col_names, digits: int = 4,
                      signif_stars: bool = True, legend: bool = True,
                      na: str = "NaN") -> list[str]:
    """R's ``printCoefmat``: estimate, SE (and df) columns rounded and formatted
    together, the test statistic to ``digits - 1`` places, ``format.pval`` p-values with
    stars when the last column is ``Pr(...)``; a NaN prints as ``na`` (R's ``NaN``; its
    ``NA`` for a missing value); wide tables wrap at 80 columns, as R's.

    Examples
    --------
    >>> print("\\n".join(coefficient_lines(
    ...     [[251.405, 6.825, 36.838], [10.467, 1.546, 6.771]],
    ...     ["(Intercept)", "Days"], ["Estimate", "Std. Error", "t value"])))
                Estimate Std. Error t value
    (Intercept)  251.405      6.825  36.838
    Days          10.467      1.546   6.771
    """
    x = np.array(values, dtype=float).reshape(len(row_names), len(col_names))
    n_cols = x.shape[1]
    has_p = n_cols >= 4 and col_names[-1][:3] in ("Pr(", "p-v")
    k = n_cols - has_p - 1
    cs, tst = list(range(k)), k
    cells = np.full(x.shape, "", dtype=object)
    ok = ~np.isnan(x)
    test_digits = max(1, min(5, digits - 1))
    if cs:
        coef_se = x[:, cs]
        magnitudes = np.abs(coef_se[np.isfinite(coef_se)])
        magnitudes = magnitudes[magnitudes != 0]
        if np.isfinite(coef_se).any():
            digmin = (1 + np.floor(np.log10([magnitudes.min(), magnitudes.max()]))
                      if magnitudes.size else np.array([1.0]))
            places = int(max(1, (digits - digmin).max()))
            rounded = round_half_even(coef_se, places)
            cells[:, cs] = np.array(format_numbers(rounded.T.ravel(), digits),
                                    dtype=object).reshape(len(cs), -1).T
    cells[:, tst] = format_numbers(round_half_even(x[:, tst], test_digits), digits)
    check = ok.copy()
    check[:, tst] = False
    if has_p:
        check[:, -1] = False
    for i, j in zip(*np.nonzero(check)):
        if (x[i, j] == 0) != (float(cells[i, j]) == 0):
            cells[i, j] = format_numbers([x[i, j]], max(1, digits - 1))[0]
    cells[~ok] = na
    names = list(col_names)
    stars = None
    if has_p:
        finite_p = ok[:, -1]
        if finite_p.any():
            cells[finite_p, -1] = format_pvalues(x[finite_p, -1], test_digits)
            if signif_stars and (x[finite_p, -1] < 0.1).any():
                stars = [_stars(p) for p in x[:, -1]]
    rows = [list(r) for r in cells]
    if stars is not None:
        width = max(len(s) for s in stars)
        rows = [r + [s.ljust(width)] for r, s in zip(rows, stars)]
        names.append("")
    lines = matrix_lines(rows, list(row_names), names, right=True)
    if stars is not None and legend:
        lines += ["---", SIGNIF_LEGEND]
    return lines


def _abbreviate_one(name: str, minlength: int) -> str:
    """R's C ``stripchars`` (``abbreviate(use.classes = TRUE)``)."""
    s = list(name.strip())
    if len(s) < minlength:
        return "".join(s)

    def length() -> int:
        return len(s) - sum(1 for c in s if c.isspace())

    def first(i: int) -> bool:
        return s[i - 1].isspace()

    def last(i: int) -> bool:
        return (not s[i - 1].isspace()) and (i + 1 >= len(s) or s[i + 1].isspace())

    def vowel(i: int) -> bool:
        return s[i] in "aeiou"

    def strip(drop) -> bool:
        for i in range(len(s) - 1, 0, -1):
            if i < len(s) and drop(i):
                del s[i]
            if length() <= minlength:
                return True
        return False

    def lower(i: int) -> bool:
        return s[i].islower() and s[i].isascii()

    passes = (lambda i: vowel(i) and last(i), lambda i: vowel(i) and not first(i),
              lambda i: lower(i) and last(i), lambda i: lower(i) and not first(i),
              lambda i: not first(i) and not s[i].isspace())
    if length() > minlength:
        for drop in passes:
            if strip(drop):
                break
    if len(s) > minlength:
        s = [c for i, c in enumerate(s) if i == 0 or not c.isspace()]
    return "".join(s)


def abbreviate(names, minlength: int = 4) -> list[str]:
    """R's ``abbreviate(names, minlength)``: lower-case vowels dropped from the right,
    then lower-case letters, then anything, never the first letter of a word; names
    that would collide are abbreviated again, one letter longer.

    Examples
    --------
    >>> abbreviate(["service1:dept2", "poly(x, 2)1"], minlength=6)
    ['srv1:2', 'p(,2)1']
    """
    names = [str(n).strip() for n in names]
    out = list(names)
    todo = list(range(len(names)))
    while True:
        for i in todo:
            out[i] = _abbreviate_one(names[i], minlength)
        counts: dict[str, int] = {}
        for value in out:
            counts[value] = counts.get(value, 0) + 1
        todo = [i for i, value in enumerate(out) if counts[value] > 1]
        if not todo:
            return out
        minlength += 1
