"""Training problems and their verifiers: the embedded task, GSM8K-style JSON Lines, MATH answers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.errors import KvrlError


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    verify: Callable[[str, str], bool]
    source: str = ""


def verify_embedded(text: str, answer: str) -> bool:
    from kvpress_rl.embedded.task import extract_answer

    return extract_answer(text) == answer


def verify_math(text: str, answer: str) -> bool:
    """Symbolic equivalence of the last boxed (or final) answer with math-verify."""
    from math_verify import parse, verify

    gold = parse(answer.replace(",", ""))
    predicted = parse(text)
    return bool(gold) and bool(predicted) and verify(gold, predicted)


def embedded_problems(count: int, seed: int) -> list[Problem]:
    from kvpress_rl.embedded.task import problems

    return [Problem(p.prompt(), p.answer, verify_embedded, f"embedded:{p.seed}") for p in problems("train", count, offset=seed * 100_000)]


def embedded_mixed_problems(count: int, seed: int) -> list[Problem]:
    """The embedded task at the difficulties the embedded model was trained on (4 to 10 hops, 20 to
    40 links), so its solutions vary in length and self-distillation has lengths to stratify."""
    from kvpress_rl.embedded.train import TrainConfig, curriculum_problem

    config = TrainConfig(seed=1 + seed)  # seed streams 1, 2, ...: disjoint from the adapter's own (0)
    drawn = (curriculum_problem(i, config) for i in range(count))
    return [Problem(p.prompt(), p.answer, verify_embedded, f"embedded-mixed:{p.seed}") for p in drawn]


R1_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def jsonl_problems(path: Path, count: int) -> list[Problem]:
    """A JSON Lines file with `question` (or `problem`) and `answer` fields; GSM8K's `#### n` is understood."""
    if not path.is_file():
        raise KvrlError(f"training data not found: {path}")
    rows = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question = row.get("question") or row["problem"]
                answer = str(row["answer"])
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise KvrlError(f"{path}:{line_no}: expected a JSON object with 'question' (or 'problem') and 'answer'") from None
            if "####" in answer:
                answer = answer.split("####")[-1].strip()
            rows.append(Problem(question + R1_SUFFIX, answer, verify_math, f"{path.name}:{line_no}"))
            if len(rows) == count:
                break
    return rows


NAMED_SETS = {"gsm8k": "gsm8k/train.jsonl", "math500": "math500/test.jsonl"}


def load_problems(data: str, count: int, seed: int, data_dir: str | None) -> list[Problem]:
    """`embedded`, `embedded-mixed`, a named set under `data_dir` (gsm8k, math500), or a JSON Lines path."""
    if data == "embedded":
        return embedded_problems(count, seed)
    if data == "embedded-mixed":
        return embedded_mixed_problems(count, seed)
    if data in NAMED_SETS:
        if not data_dir:
            raise KvrlError(f"training set {data!r} needs --data-dir (a folder laid out like shared/data)")
        return jsonl_problems(Path(data_dir) / NAMED_SETS[data], count)
    if re.search(r"\.jsonl?$", data):
        return jsonl_problems(Path(data), count)
    raise KvrlError(f"unknown training data {data!r}; accepted: embedded, embedded-mixed, {', '.join(NAMED_SETS)}, or a .jsonl file")
