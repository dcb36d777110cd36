"""`random`: uniformly random head scores (the paper's "random heads" baseline)."""

from __future__ import annotations

import time

import torch

from kvpress_rl.models import ModelShape, model_id
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext


class RandomHeads(HeadSelector):
    """Random scores in [0, 1) per (layer, KV head), then the same global selection as RLKV.

    RLKV (arXiv 2510.08525) uses it as the floor every learned selection must beat. It assumes
    nothing about the model but its shape; the same seed always gives the same scores.
    """

    name = "random"
    kind = "head"
    averaged_over_seeds = True
    description = "random head scores (seeded by --seed): the floor a learned selection must beat"

    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        start = time.perf_counter()
        shape = ModelShape.from_config(model.config)
        generator = torch.Generator().manual_seed(context.seed)
        values = torch.rand((shape.num_layers, shape.num_kv_heads), generator=generator)
        return self.scores(values, model_id(model), context, time.perf_counter() - start)
