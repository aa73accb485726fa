import pytest

from henderson import FormulaError, parse_formula


def bars(formula):
    return [(b.lhs, b.group, b.factors) for b in parse_formula(formula).bars]


def test_correlated_bar_and_fixed_part():
    parsed = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert parsed.response == "Reaction"
    assert parsed.fixed == "Days"
    assert bars("Reaction ~ Days + (Days | Subject)") == [("Days", "Subject", ("Subject",))]


def test_double_bar_splits_into_independent_terms():
    assert bars("y ~ x + (1 + x + z || g)") == [
        ("1", "g", ("g",)), ("0 + x", "g", ("g",)), ("0 + z", "g", ("g",))]
    assert bars("y ~ (0 + x || g)") == [("0 + x", "g", ("g",))]


def test_nested_and_interaction_groups_use_lme4_names():
    assert bars("y ~ 1 + (1 | batch/cask)") == [
        ("1", "batch", ("batch",)), ("1", "cask:batch", ("cask", "batch"))]
    assert bars("y ~ (1 | a:b)") == [("1", "a:b", ("a", "b"))]
    assert bars("y ~ (1 | a/b/c)")[2] == ("1", "c:b:a", ("c", "b", "a"))


def test_several_bars_and_no_fixed_terms():
    parsed = parse_formula("y ~ (1 | s) + (1 | d) + (0 + x | d)")
    assert parsed.fixed == "1"
    assert [b.group for b in parsed.bars] == ["s", "d", "d"]


def test_function_calls_in_fixed_part_are_kept_with_r_arithmetic_for_python():
    parsed = parse_formula("y ~ log(x) + I(x^2) + (1 | g)")
    assert parsed.fixed == "log(x) + I(x**2)"
    assert parsed.text == "y ~ log(x) + I(x^2) + (1 | g)"
    # the formula's own ^ (crossing) stays; inside calls R's operators become Python's
    assert parse_formula("y ~ (a + b)^2 + I(x %% 3 + x %/% 2) + (1 | g)").fixed == \
        "(a + b)^2 + I(x % 3 + x // 2)"
    assert parse_formula("y ~ I(x > 1 & TRUE) + (1 | g)").fixed == "I(x > 1 & True)"


def test_offsets_are_taken_out_of_the_fixed_part():
    parsed = parse_formula("y ~ x + offset(log(n)) + (1 | g)")
    assert parsed.fixed == "x" and parsed.offsets == ("log(n)",)


@pytest.mark.parametrize("formula", [
    "y x + (1|g)", "y ~ ~ x", "~ x + (1|g)", "y ~ x + (1|g", "y ~ x + 1|g)",
    "y ~ x + (|g)", "y ~ x + (1|)", "y ~ x + + (1|g)", "y ~ x + (1|log(g))", "y ~ ",
])
def test_malformed_formulas_raise(formula):
    with pytest.raises(FormulaError):
        parse_formula(formula)
