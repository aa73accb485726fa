"""henderson.rprint against R 4's own output (tests/data/rformat/cases.jsonl, made by
make_reference.R): format(), format(round(), nsmall=), format.pval, printCoefmat,
abbreviate and the printed residual quantiles, on randomly drawn numbers."""
import json
from pathlib import Path

import numpy as np
import pytest

from henderson import rprint

CASES = [json.loads(line) for line in
         (Path(__file__).parent / "data" / "rformat" / "cases.jsonl").read_text().splitlines()]


def _values(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _by_kind(kind):
    chosen = [c for c in CASES if c["kind"] == kind]
    assert len(chosen) >= 2
    return chosen


def test_format_matches_r():
    # R's NA (a missing value) is the null of the file, printed "NA"
    wrong = [(c["x"], c["digits"], c["out"], ours)
             for c in _by_kind("format")
             if (ours := rprint.format_numbers(_values(c["x"]), c["digits"], na="NA")) != c["out"]]
    assert not wrong, wrong[:5]


def test_format_nsmall_matches_r():
    for c in _by_kind("format_nsmall"):
        x = rprint.round_half_even(_values(c["x"]), c["digits"])
        assert rprint.format_numbers(x, 7, nsmall=c["digits"], na="NA") == c["out"], c


def test_format_pval_matches_r():
    for c in _by_kind("pval"):
        assert rprint.format_pvalues(_values(c["p"]), c["digits"]) == c["out"], c


def test_print_coefmat_matches_r():
    for c in _by_kind("coefmat"):
        lines = rprint.coefficient_lines(_values(c["values"]), c["rows"], c["cols"], digits=4,
                                         na="NA")
        assert lines == c["out"], (c["out"], lines)


def test_wide_matrices_wrap_as_r_prints_them():
    cases = _by_kind("matrix")
    assert any(len(c["out"]) > len(c["rows"]) + 1 for c in cases)     # some do wrap
    for c in cases:
        k = len(c["cols"])
        cells = [c["cells"][i * k:(i + 1) * k] for i in range(len(c["rows"]))]
        assert rprint.matrix_lines(cells, c["rows"], c["cols"], right=c["right"]) == c["out"], c


def test_nan_prints_as_r_prints_a_computed_nan():
    assert rprint.format_numbers([np.nan, 0.5]) == ["NaN", "0.5"]
    assert rprint.format_numbers([1.0, np.inf]) == ["  1", "Inf"]
    assert rprint.format_numbers([-0.0, 3e-10]) == ["0e+00", "3e-10"]


def test_abbreviate_matches_r():
    for c in _by_kind("abbreviate"):
        assert rprint.abbreviate(c["names"], c["minlength"]) == c["out"]


def test_residual_quantiles_match_r():
    for c in _by_kind("quantiles"):
        q = rprint.zapsmall(np.quantile(_values(c["x"]), [0, .25, .5, .75, 1]), 5)
        texts = rprint.format_numbers(q, 4)
        assert rprint.named_vector_lines(texts, ["Min", "1Q", "Median", "3Q", "Max"]) == c["out"]


@pytest.mark.parametrize("p, text", [(0.0, "<2e-16"), (1e-300, "<2e-16"), (2.3e-16, "2.3e-16")])
def test_tiny_p_values_are_bounded_not_zero(p, text):
    assert rprint.format_pvalues([p]) == [text]
