"""Why a wrong answer was wrong: `overlength` (hit the token limit), `repetitive` (the repetition early
stop: the last 400 tokens hold fewer than 40 distinct ids) or `incorrect`.

Whether an answer is right is `kvpress_rl.answers` (shared with the training reward).
"""

from __future__ import annotations

REPETITION_WINDOW = 400
REPETITION_DISTINCT = 40


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
