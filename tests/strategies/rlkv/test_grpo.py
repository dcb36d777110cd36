import math

import pytest
import torch

from kvpress_rl.strategies.rlkv.grpo import (
    batch_advantages,
    clipped_surrogate,
    group_advantages,
    level_weight,
    penalty_weight,
    step_advantages,
)
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


# The official batch advantage: two groups of 2, the first agreeing. (r - 0.5) * 10 = +5, +5 | +5, -5 on 1, 3 | 2, 2
# completion tokens:
# token-weighted mean 20 / 8 = 2.5; squared deviations 6 * 2.5^2 + 2 * 7.5^2 = 150 over 8 - 1 tokens (unbiased);
# advantages (x - 2.5) / (sqrt(150 / 7) + 1e-5) = 2.5 / 4.6291105, -7.5 / 4.6291105.
AGREEING = torch.tensor([1.0, 1.0, 1.0, 0.0])
AGREEING_TOKENS = torch.tensor([1, 3, 2, 2])
AGREEING_BATCH = [0.5400606, 0.5400606, 0.5400606, -1.6201817]


def test_the_official_batch_z_score_gives_a_group_that_agrees_the_batch_s_signal():
    adv = batch_advantages(AGREEING, AGREEING_TOKENS)
    assert adv.tolist() == pytest.approx(AGREEING_BATCH, abs=1e-6)
    # not the biased std, sqrt(150 / 8)
    assert adv.tolist() != pytest.approx([0.57735, 0.57735, 0.57735, -1.73205], abs=1e-4)
    assert step_advantages("batch", AGREEING, AGREEING_TOKENS, 2).tolist() == pytest.approx(AGREEING_BATCH, abs=1e-6)
    # the paper's per-group z-score: the agreeing group gets nothing
    assert step_advantages("group", AGREEING, AGREEING_TOKENS, 2).tolist() == pytest.approx([0.0, 0.0, 1.0, -1.0],
                                                                                            abs=1e-4)
    with pytest.raises(ValueError, match="advantage must be one of group, batch"):
        step_advantages("token", AGREEING, AGREEING_TOKENS, 2)


def test_the_batch_z_score_is_taken_over_every_process_s_sequences():
    # process A holds the agreeing group alone, process B the other; `reduce` adds the other's sums (an all_sum)
    def sums(rewards, tokens):
        x, n = (rewards.double() - 0.5) * 10, tokens.double()
        return torch.stack([n.sum(), (n * x).sum(), (n * x * x).sum()])

    parts = [(AGREEING[:2], AGREEING_TOKENS[:2]), (AGREEING[2:], AGREEING_TOKENS[2:])]
    seen = []
    for mine, other in (parts, parts[::-1]):
        seen += batch_advantages(*mine, reduce=lambda local, other=other: local + sums(*other)).tolist()
    assert seen == pytest.approx(AGREEING_BATCH, abs=1e-6)
    assert torch.all(batch_advantages(*parts[0]) == 0)  # alone, process A's agreeing group would carry nothing


def test_l1_weight_by_reward_level():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # groups of 4: r_bar 0.5 and 1.0
    e = math.exp
    assert level_weight(rewards, "batch", 1.0, 0.5) == pytest.approx(e(0.75) - 1)
    # 0.5 is not above tau
    assert level_weight(rewards, "group", 1.0, 0.5, group_size=4) == pytest.approx((0.0 + e(1.0) - 1) / 2)
    # micro-batches: r_bar 1.0 (2 tokens), 4/6 (10)
    parts, tokens = [slice(0, 2), slice(2, 8)], torch.tensor([1, 1, 3, 3, 1, 1, 1, 1])
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
