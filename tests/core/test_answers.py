"""The answer checks, each case through both the training reward's verifier and the evaluation's checker."""

import json

import pytest

from kvpress_rl.answers import embedded_equal, gsm8k_gold, integer_equal, last_boxed, math_equal
from kvpress_rl.strategies.rlkv.problems import VERIFIERS, jsonl_problems, verify_embedded, verify_math

# per answer kind, the training reward's verifier and the evaluation's checker: every case goes through both
CHECKERS = {"math": (verify_math, math_equal), "embedded": (verify_embedded, embedded_equal)}


@pytest.mark.parametrize("side", [0, 1], ids=["training", "evaluation"])
@pytest.mark.parametrize(("kind", "response", "gold", "expected"), [(kind, *case) for kind, cases in {"math": [
    ("We get \\boxed{\\frac{1}{2}}", "0.5", True),
    ("We get \\boxed{0.5}", "\\frac{1}{2}", True),
    ("We get \\boxed{\\frac{1}{3}}", "0.5", False),
    ("\\boxed{3}", "2", False),
    ("Total: \\boxed{2,125}", gsm8k_gold("... so 2,125\n#### 2,125"), True),
    ("Total: \\boxed{2125}", gsm8k_gold("#### 2,125"), True),
    ("Total: \\boxed{2126}", gsm8k_gold("#### 2,125"), False),
    ("The answer is 4.", "4", True),  # nothing boxed: the whole text
    # the final box decides, whatever numbers come before it or after it
    ("I first thought 3, then \\boxed{4}", "4", True),
    ("I first thought 3, then \\boxed{4}", "3", False),
    ("We have 2 apples and 7 pears, so 9 minus 5 gives \\boxed{4}", "4", True),
    ("\\boxed{3} was wrong: \\boxed{4}", "4", True),
    ("\\boxed{4}, though one might say 3", "3", False),
    # a bare-LaTeX gold is parsed as LaTeX, by the training verifier as by evaluation
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("so \\boxed{\\sqrt{2}}", "\\sqrt{2}", True),
    ("\\boxed{2\\pi}", "2\\pi", True),
], "embedded": [  # the word after the last `Answer:`
    ("1. a -> b\nAnswer: b", "b", True),
    ("Answer: c", "b", False),
    ("Answer: c\nno, Answer: **B**.", "b", True),
    ("no answer line", "b", False),
]}.items() for case in cases])
def test_training_and_evaluation_check_answers_alike(side, kind, response, gold, expected):
    assert CHECKERS[kind][side](response, gold) is expected


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("so the answer is \\boxed{25}", "025", True),
    ("The final answer is 025.", "25", True),
    ("\\boxed{24}", "025", False),
    ("no number here", "25", False),
    ("\\boxed{1,000}", "1000", True),
])
def test_aime_answers_compare_as_integers(response, gold, expected):
    assert integer_equal(response, gold) is expected


def test_gsm8k_gold_strips_thousands_separators():
    assert gsm8k_gold("She pays 2,125 dollars.\n#### 2,125") == "2125"


def test_training_reads_gsm8k_gold_as_evaluation_does(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "How much?", "answer": "She pays 2,125 dollars.\n#### 2,125"}) + "\n")
    [problem] = jsonl_problems(data, 1)
    assert problem.answer == gsm8k_gold("She pays 2,125 dollars.\n#### 2,125") == "2125"


def test_last_boxed_handles_nesting_and_absence():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("none") is None


def test_the_training_verifiers_keep_the_names_saved_training_sets_record():
    assert {name: fn.__name__ for name, fn in VERIFIERS.items()} == {"verify_embedded": "verify_embedded",
                                                                     "verify_math": "verify_math"}
