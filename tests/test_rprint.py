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
    wrong = [(c["x"], c["digits"], c["out"], rprint.format_numbers(_values(c["x"]), c["digits"]))
             for c in _by_kind("format")
             if rprint.format_numbers(_values(c["x"]), c["digits"]) != c["out"]]
    assert not wrong, wrong[:5]


def test_format_nsmall_matches_r():
    for c in _by_kind("format_nsmall"):
        x = rprint.round_half_even(_values(c["x"]), c["digits"])
        assert rprint.format_numbers(x, 7, nsmall=c["digits"]) == c["out"], c


def test_format_pval_matches_r():
    for c in _by_kind("pval"):
        assert rprint.format_pvalues(_values(c["p"]), c["digits"]) == c["out"], c


def test_print_coefmat_matches_r():
    for c in _by_kind("coefmat"):
        lines = rprint.coefficient_lines(_values(c["values"]), c["rows"], c["cols"], digits=4)
        assert lines == c["out"], (c["out"], lines)


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
