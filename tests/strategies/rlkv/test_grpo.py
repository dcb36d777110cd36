import math

import pytest
import torch

from kvpress_rl.strategies.rlkv.grpo import batch_advantages, clipped_surrogate, group_advantages, level_weight, penalty_weight
from kvpress_rl.strategies.rlkv.rollouts import completion_mask


def test_group_advantages_are_z_scores_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4, rtol=0)
    assert torch.all(adv[1] == 0)  # a group that agrees carries no signal


def test_batch_advantages_follow_the_official_code():
    # rewards 1, 0, 0 with 2, 1, 3 completion tokens: +5 on 2 tokens, -5 on 4 tokens
    adv = batch_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2, 1, 3]))
    mean = (2 * 5 - 4 * 5) / 6  # -5/3, token-weighted
    var = (2 * (5 - mean) ** 2 + 4 * (-5 - mean) ** 2) / 5  # unbiased over the 6 tokens
    expected = torch.tensor([5 - mean, -5 - mean, -5 - mean]) / (math.sqrt(var) + 1e-5)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-6)
    # hand values: mean -1.6667, std 5.1640; a per-sequence biased z-score would give +1.4142 / -0.7071
    assert adv.tolist() == pytest.approx([1.2910, -0.6455, -0.6455], abs=1e-4)
    assert torch.all(batch_advantages(torch.ones(4), torch.tensor([3, 1, 2, 5])) == 0)  # no signal


def test_l1_weight_by_reward_level():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # groups of 4: r_bar 0.5 and 1.0
    e = math.exp
    assert level_weight(rewards, "batch", 1.0, 0.5) == pytest.approx(e(0.75) - 1)
    assert level_weight(rewards, "group", 1.0, 0.5, group_size=4) == pytest.approx((0.0 + e(1.0) - 1) / 2)  # 0.5 is not above tau
    parts, tokens = [slice(0, 2), slice(2, 8)], torch.tensor([1, 1, 3, 3, 1, 1, 1, 1])  # micro-batches: r_bar 1.0 (2 tokens), 4/6 (10)
    expected = ((e(1.0) - 1) * 2 + (e(4 / 6) - 1) * 10) / 12
    assert level_weight(rewards, "micro-batch", 1.0, 0.5, parts=parts, tokens=tokens) == pytest.approx(expected)
    assert level_weight(rewards, "group", 2.0, 0.5, adaptive=False, group_size=4) == 2.0


def test_adaptive_penalty_weight():
    assert penalty_weight(0.4, 1e-3, 0.5) == 0.0  # below tau: off, gates recover
    assert penalty_weight(0.9, 1e-3, 0.5) == pytest.approx(1e-3 * (math.exp(0.9) - 1))
    assert penalty_weight(math.log(2), 1.0, 0.5) == pytest.approx(1.0)  # exp(r) - 1 = 1 at r ~ 0.69
    assert penalty_weight(0.1, 1e-3, 0.5, adaptive=False) == 1e-3


def test_clipped_surrogate_clips_large_ratios():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    big = torch.full((1, 2), math.log(3.0))  # ratio 3, clipped at 1.4 for a positive advantage
    assert clipped_surrogate(big, old, torch.tensor([1.0]), mask, 0.4).item() == pytest.approx(2 * 1.4)
    small = torch.full((1, 2), math.log(0.2))  # ratio 0.2 with a negative advantage: min picks the clipped -0.6
    assert clipped_surrogate(small, old, torch.tensor([-1.0]), mask, 0.4).item() == pytest.approx(2 * -0.6)
    masked = clipped_surrogate(big, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), 0.4)
    assert masked.item() == pytest.approx(1.4)


def test_completion_mask_stops_after_the_first_stop_token():
    completions = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5]])
    assert completion_mask(completions, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
