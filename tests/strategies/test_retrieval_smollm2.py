"""Retrieval heads on real weights: SmolLM2-135M-Instruct has heads that copy a planted needle."""

import pytest
import torch

from kvpress_rl.selector import SelectionContext
from kvpress_rl.strategies.retrieval import RetrievalHeads, RetrievalOptions

pytestmark = pytest.mark.slow


def test_retrieval_finds_copying_heads_in_smollm2(smollm2):
    model, tokenizer = smollm2
    scores = RetrievalHeads(RetrievalOptions(needles=2)).select(model, tokenizer, SelectionContext(seed=0)).scores
    top = torch.topk(scores.flatten(), 5)
    report = ", ".join(f"layer {i // 3} head {i % 3}: {v:.2f}"
                       for v, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"top retrieval heads of SmolLM2-135M-Instruct: {report}")
    # measured: the top KV heads (layers 17, 18, 23) score 0.14 / 0.14 / 0.09 (mean of their 3 query heads)
    assert top.values[0] > 0.1  # some heads copy the needle at a tenth or more of the needle steps
    assert scores.median() < 0.01 and (scores > 0.05).float().mean() < 0.2  # and most heads never do
