import torch

from kvpress_rl import SelectionContext, plan_from_scores
from kvpress_rl.models import random_model, small_config
from kvpress_rl.strategies.random import RandomHeads


def test_same_seed_same_scores_other_seed_other_scores():
    model = random_model(small_config("qwen3"))
    first = RandomHeads().select(model, None, SelectionContext(seed=5))
    again = RandomHeads().select(model, None, SelectionContext(seed=5))
    other = RandomHeads().select(model, None, SelectionContext(seed=6))
    assert torch.equal(first.scores, again.scores) and not torch.equal(first.scores, other.scores)
    assert first.shape == (4, 4) and first.seed == 5 and first.strategy == "random"


def test_random_plan_compresses_the_requested_fraction():
    model = random_model(small_config("llama", num_hidden_layers=5))
    scores = RandomHeads().select(model, None, SelectionContext(seed=0))
    assert plan_from_scores(scores, 0.4).num_compressed == 8  # 40% of 20 heads
