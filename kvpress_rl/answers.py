"""Answer checking, the one rule shared by the training reward and the evaluation metric.

- `math_equal(response, gold)`: math answers (MATH-500, GSM8K). The response's last `\\boxed{...}`
  (nested braces allowed), or the whole text when nothing is boxed, is compared with `gold` by
  math-verify (symbolic equality: `\\frac{1}{2}` is `0.5`, `x^2+2x+1` is `(x+1)^2`); commas are dropped
  from both first, so thousands separators are accepted (`2,125` is 2125) and `gold` may be bare LaTeX.
- `integer_equal(response, gold)`: AIME. The final integer (in the last `\\boxed{}`, else the last one
  in the text) equals `gold` as an integer (the offline data pads some with zeros: `025` is 25).
- `embedded_equal(response, gold)`: the embedded link-following task. The word after the last
  `Answer:` (case, surrounding markup and a final period tolerated) is `gold`.
- `gsm8k_gold(answer)`: the gold number of a GSM8K answer, after `####`, thousands separators removed.
- `last_boxed(text)`: the content of the last `\\boxed{...}`, or None.
"""

from __future__ import annotations

import re

from kvpress_rl.embedded.task import extract_answer


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
    # Imported here: math_verify (with sympy) is a heavy optional module that only math answers need.
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


def embedded_equal(response: str, gold: str) -> bool:
    """The embedded task: the word after the last `Answer:` is `gold`."""
    return extract_answer(response) == gold
