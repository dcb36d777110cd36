"""`retrieval`: the retrieval-head score of Wu et al. 2024 ("Retrieval Head Mechanistically
Explains Long-Context Factuality", arXiv 2404.15574), aggregated to KV heads.

A needle (random tokens) is hidden at some depth of a haystack (random tokens from the model's own
vocabulary, or the embedded task's words for the embedded model); after the haystack comes the
needle's first token, and the model copies the rest (teacher-forced, so every step is scored). At a
step where the model predicts the next needle token, a query head scores `1 / |needle|` when its
top-1 attended position lies in the needle and holds that very token. Scores are averaged over the
samples the model copied at least partly; query heads become their KV head by mean (or max).
Assumes copying from context is done by a few attention heads, as Wu et al. found in pretrained LLMs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvpress_rl.errors import KvrlError
from kvpress_rl.haystack import token_pool
from kvpress_rl.models import ModelShape, model_id, using_attention
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext


@dataclass
class RetrievalOptions:
    needles: int = field(default=3, metadata={"help": "needles per (length, depth)"})
    needle_length: int = field(default=8, metadata={"help": "tokens per needle"})
    lengths: tuple[int, ...] = field(default=(256, 512), metadata={"help": (
        "haystack lengths in tokens (comma-separated)")})
    depths: tuple[float, ...] = field(default=(0.1, 0.3, 0.5, 0.7, 0.9), metadata={"help": (
        "needle depths in [0, 1] (comma-separated)")})
    aggregate: str = field(default="mean", metadata={"help": "query heads to KV head: mean or max"})


def copy_hits(attentions: list[torch.Tensor], tokens: torch.Tensor, needle_span: tuple[int, int],
              copy_positions: torch.Tensor, targets: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per (layer, query head) count of copy events.

    `attentions[layer]` is `(query_heads, seq, seq)` for one sequence; `copy_positions` are the query
    positions that predict `targets`; `correct` says where the model's top-1 prediction was right.
    """
    start, stop = needle_span
    hits = torch.zeros(len(attentions), attentions[0].shape[0])
    for layer, attention in enumerate(attentions):
        top = attention[:, copy_positions, :].argmax(dim=-1)  # (heads, steps)
        in_needle = (top >= start) & (top < stop)
        same_token = tokens[top] == targets[None, :]
        hits[layer] = (in_needle & same_token & correct[None, :]).sum(dim=-1).float()
    return hits


class RetrievalHeads(HeadSelector):
    __doc__ = __doc__
    name = "retrieval"
    kind = "head"
    description = "retrieval-head score (Wu et al. 2024): heads that copy a needle from context"
    Options = RetrievalOptions

    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        o = self.options
        if o.aggregate not in ("mean", "max"):
            raise KvrlError(f"--aggregate must be mean or max, got {o.aggregate!r}")
        if o.needle_length < 2 or o.needles < 1 or not o.lengths or not all(0 <= d <= 1 for d in o.depths):
            raise KvrlError("retrieval needs needle_length >= 2, needles >= 1, some lengths and depths in [0, 1]")
        start_time = time.perf_counter()
        shape = ModelShape.from_config(model.config)
        pool = token_pool(model, tokenizer)
        generator = torch.Generator().manual_seed(context.seed)
        total = torch.zeros(shape.num_layers, shape.num_query_heads)
        successes = samples = 0
        with using_attention(model, "eager"):  # attention maps are needed
            for length in o.lengths:
                for depth in o.depths:
                    for _ in range(o.needles):
                        hits, copied = self._one_needle(model, pool, length, depth, generator)
                        samples += 1
                        if copied:
                            successes += 1
                            total += hits / o.needle_length
        per_query_head = total / max(successes, 1)
        grouped = per_query_head.reshape(shape.num_layers, shape.num_kv_heads, shape.num_groups)
        values = grouped.mean(-1) if o.aggregate == "mean" else grouped.amax(-1)
        return self.scores(values, model_id(model), context, time.perf_counter() - start_time,
                           successful_retrievals=successes, samples=samples)

    def _one_needle(self, model, pool: torch.Tensor, length: int, depth: float, generator: torch.Generator):
        n = self.options.needle_length
        haystack = pool[torch.randint(len(pool), (length,), generator=generator)]
        needle = pool[torch.randperm(len(pool), generator=generator)[:n]]
        at = int(depth * length)
        tokens = torch.cat([haystack[:at], needle, haystack[at:], needle])  # the trailing copy is teacher-forced
        copy_start = length + n  # position of the copy's first token
        copy_positions = torch.arange(copy_start, copy_start + n - 1)  # each predicts the next needle token
        targets = needle[1:]
        with torch.inference_mode():
            out = model(input_ids=tokens[None].to(model.device), output_attentions=True)
        predictions = out.logits[0, copy_positions].argmax(-1).cpu()
        correct = predictions == targets
        attentions = [a[0].float().cpu() for a in out.attentions]
        hits = copy_hits(attentions, tokens, (at, at + n), copy_positions, targets, correct)
        return hits, bool(correct.any())
