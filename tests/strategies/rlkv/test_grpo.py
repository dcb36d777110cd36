import math

import pytest
import torch

from kvpress_rl.strategies.rlkv.grpo import batch_advantages, clipped_surrogate, group_advantages, penalty_weight
from kvpress_rl.strategies.rlkv.learner import completion_mask


def test_group_advantages_are_z_scores_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4, rtol=0)
    assert torch.all(adv[1] == 0)  # a group that agrees carries no signal


def test_batch_advantages_follow_the_official_code():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    adv = batch_advantages(rewards)
    scaled = torch.tensor([5.0, -5.0, -5.0, -5.0])
    expected = (scaled - scaled.mean()) / scaled.std(unbiased=False)
    torch.testing.assert_close(adv.flatten(), expected, atol=1e-4, rtol=0)


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
