"""Answer checking for the reasoning tasks, and why a wrong answer was wrong.

- math answers: math-verify (symbolic equality of the last `\\boxed{}` or final expression);
- AIME: integers compared as integers (the offline data pads some with zeros: `025` is 25);
- GSM8K: the gold number after `####`, thousands separators removed (`2,125` is 2125);
- wrong answers are classified as `overlength` (hit the token limit), `repetitive` (the
  repetition early stop: the last 400 tokens hold fewer than 40 distinct ids) or `incorrect`.
"""

from __future__ import annotations

import re

REPETITION_WINDOW = 400
REPETITION_DISTINCT = 40


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer (`... #### 2,125` gives `2125`)."""
    return answer.split("####")[-1].strip().replace(",", "")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[brace + 1:index]
    return None


def math_equal(response: str, gold: str) -> bool:
    """math-verify: the response's final answer is symbolically equal to `gold`."""
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(gold.replace(",", "")))
    boxed = last_boxed(response)
    predicted = parse(_as_latex(boxed.replace(",", "")) if boxed is not None else response)
    return bool(gold_parsed) and bool(predicted) and bool(verify(gold_parsed, predicted))


def _as_latex(answer: str) -> str:
    return answer if answer.startswith("$") else f"${answer}$"


_INTEGER = re.compile(r"-?\d[\d,]*")


def integer_equal(response: str, gold: str | int) -> bool:
    """AIME: the final integer (boxed, else the last one in the text) equals `gold` as an integer."""
    boxed = last_boxed(response)
    candidates = _INTEGER.findall(boxed if boxed is not None else response)
    if not candidates:
        return False
    try:
        return int(candidates[-1].replace(",", "")) == int(str(gold).strip())
    except ValueError:
        return False


def is_repetitive(token_ids: list[int], window: int = REPETITION_WINDOW, distinct: int = REPETITION_DISTINCT) -> bool:
    """The repetition early-stop rule: the last `window` tokens hold fewer than `distinct` ids."""
    return len(token_ids) >= window and len(set(token_ids[-window:])) < distinct


def classify(correct: bool, token_ids: list[int], token_limit: int) -> str:
    """`correct`, or why not: `repetitive`, `overlength` or `incorrect`."""
    if correct:
        return "correct"
    if is_repetitive(token_ids):
        return "repetitive"
    if len(token_ids) >= token_limit:
        return "overlength"
    return "incorrect"
