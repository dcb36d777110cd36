"""Greedy evaluation on the embedded task, with the full cache or under a `CompressionPlan`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvpress_rl.embedded.data import left_pad, prompt_ids
from kvpress_rl.embedded.task import EmbeddedProblem, score
from kvpress_rl.executor import generate
from kvpress_rl.throughput import Throughput


@dataclass
class EvalResult(Throughput):
    correct: int = 0
    total: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    output_lengths: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    solved: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def evaluate(model, tokenizer, items: list[EmbeddedProblem], plan=None, batch_size: int = 16, max_new_tokens: int = 64,
             on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Accuracy of greedy answers on `items` (the plan, if any, runs through the executor)."""
    result = EvalResult()
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, p) for p in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        begin = time.perf_counter()
        with torch.inference_mode():
            out = generate(model, plan, ids.to(model.device), attention_mask=mask.to(model.device),
                           max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
        result.seconds += time.perf_counter() - begin
        for problem, prompt, row in zip(chunk, prompts, out[:, ids.shape[1]:]):
            tokens = [t for t in row.tolist() if t != tokenizer.pad_token_id]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            result.solved.append(score(text, problem))
            result.correct += int(result.solved[-1])
            result.total += 1
            result.generated_tokens += len(tokens)
            result.prompt_lengths.append(len(prompt))
            result.output_lengths.append(len(tokens))
            result.outputs.append(text)
        if on_batch:
            on_batch(len(chunk))
    return result
