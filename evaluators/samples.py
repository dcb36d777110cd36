"""What lm-eval recorded for a cell: its metric and answer limit, and each sample's prompt, answer, length and
classification (`kvpress_rl.evaluators.scoring`)."""

from __future__ import annotations

from typing import Any

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.scoring import classify


def first_metric(metrics: dict[str, Any]) -> str:
    """lm-eval's first accuracy-like key (`exact_match,strict-match`, `pass_at_1,none`, ...)."""
    keys = [k for k in metrics if "," in k and "_stderr" not in k]
    if not keys:
        raise KvrlError(f"lm-eval reported no metric: {sorted(metrics)}")
    return keys[0]


def task_token_limit(results: dict, task: str, default: int) -> int:
    generation = results.get("configs", {}).get(task, {}).get("generation_kwargs", {}) or {}
    return int(generation.get("max_gen_toks", default))


def sample_context(sample: dict) -> str:
    """The prompt lm-eval sent (its `arguments` are `[[context, gen_kwargs]]` or `{"gen_args_0": {"arg_0": ...}}`)."""
    arguments = sample.get("arguments")
    if isinstance(arguments, dict):
        arguments = [list(a.values()) if isinstance(a, dict) else a for a in arguments.values()]
    return str(arguments[0][0]) if arguments and arguments[0] else ""


def sample_response(sample: dict) -> str:
    """The answer lm-eval recorded for a sample (its `resps` are `[[text]]` or `[text]`)."""
    responses = sample["resps"]
    return responses[0][0] if responses and isinstance(responses[0], list) else str(responses[0])


def sample_length(lm, sample: dict, answer_ids: list[int] | None = None) -> int:
    """A sample's total length in tokens: the prompt lm-eval sent and the answer."""
    if answer_ids is None:
        answer_ids = lm.tok_encode(sample_response(sample), add_special_tokens=False)
    return len(lm.tok_encode(sample_context(sample))) + len(answer_ids)


def classify_samples(lm, samples: list[dict], metric: str, token_limit: int) -> tuple[list[str], list[int]]:
    """Each sample's classification, and its total length (prompt + answer tokens)."""
    kinds, lengths = [], []
    for sample in samples:
        answer_ids = lm.tok_encode(sample_response(sample), add_special_tokens=False)
        kinds.append(classify(bool(sample.get(metric, 0)), answer_ids, token_limit))
        lengths.append(sample_length(lm, sample, answer_ids))
    return kinds, lengths
