import pytest

from kvpress_rl.evaluators.scoring import classify, gsm8k_gold, integer_equal, is_repetitive, last_boxed, math_equal


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("so the answer is \\boxed{25}", "025", True),
    ("The final answer is 025.", "25", True),
    ("\\boxed{24}", "025", False),
    ("no number here", "25", False),
    ("\\boxed{1,000}", "1000", True),
])
def test_aime_answers_compare_as_integers(response, gold, expected):
    assert integer_equal(response, gold) is expected


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("We get \\boxed{\\frac{1}{2}}", "0.5", True),
    ("We get \\boxed{0.5}", "\\frac{1}{2}", True),
    ("We get \\boxed{\\frac{1}{3}}", "0.5", False),
    ("Total: \\boxed{2,125}", gsm8k_gold("... so 2,125\n#### 2,125"), True),
    ("Total: \\boxed{2125}", gsm8k_gold("#### 2,125"), True),
    ("Total: \\boxed{2126}", gsm8k_gold("#### 2,125"), False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
])
def test_math_answers_are_checked_symbolically(response, gold, expected):
    assert math_equal(response, gold) is expected


def test_gsm8k_gold_strips_thousands_separators():
    assert gsm8k_gold("She pays 2,125 dollars.\n#### 2,125") == "2125"


def test_last_boxed_handles_nesting_and_absence():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("none") is None


def test_repetition_rule_and_classification():
    looping = list(range(10)) * 50  # 500 tokens, 10 distinct ids
    varied = list(range(500))
    assert is_repetitive(looping) and not is_repetitive(varied) and not is_repetitive(looping[:399])
    assert classify(True, looping, 500) == "correct"
    assert classify(False, looping, 500) == "repetitive"
    assert classify(False, varied, 500) == "overlength"
    assert classify(False, varied[:20], 500) == "incorrect"
