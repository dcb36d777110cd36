import pytest
import torch

from kvpress_rl import HeadScores, KvrlError, plan_from_scores
from kvpress_rl.executor.policies import H2O, Budget, Streaming
from kvpress_rl.plan import token_plan


def test_global_ranking_compresses_the_lowest_fraction_across_layers():
    scores = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.7, 0.3]])
    plan = plan_from_scores(HeadScores(scores), 0.5)
    # the three lowest: 0.1 (layer 0), 0.2 and 0.3 (layer 1) - no per-layer quota
    assert plan.full.tolist() == [[True, False, True], [False, True, False]]
    assert plan.num_compressed == 3


def test_ties_break_toward_earlier_heads_deterministically():
    plan = plan_from_scores(torch.full((2, 4), 0.5), 0.25)
    assert plan.full.flatten().tolist() == [False, False] + [True] * 6
    assert torch.equal(plan_from_scores(torch.full((2, 4), 0.5), 0.25).full, plan.full)


def test_scores_are_clipped_before_ranking_and_ties_break_by_raw_score():
    plan = plan_from_scores(torch.tensor([[1.3, 1.0, -0.2, 0.0]]), 0.5)
    assert plan.full.tolist() == [[True, True, False, False]]
    # 1.3 and 1.1 both clip to 1 (keep the full cache); among them the lower raw gate goes first
    plan = plan_from_scores(torch.tensor([[1.3, 1.1, 0.9, 0.95]]), 0.25)
    assert plan.full.tolist() == [[True, True, False, True]]
    plan = plan_from_scores(torch.tensor([[1.3, 1.1, 1.2, 1.0]]), 0.5)
    assert plan.full.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    with pytest.raises(KvrlError, match="outside"):
        plan_from_scores(torch.rand(2, 2), sparsity)


def test_kv_bytes_is_exact():
    plan = plan_from_scores(torch.rand(4, 8), 0.5, Streaming(sink=16, window=64))
    # 16 full heads x 1000 tokens + 16 compressed heads x 80 tokens, K and V, batch 2, head dim 64, bf16
    assert plan.kv_bytes(1000, 2, head_dim=64, dtype=torch.bfloat16) == (16 * 1000 + 16 * 80) * 2 * 2 * 64 * 2
    assert plan.kv_bytes(50, 1, head_dim=64, dtype=torch.float32) == 32 * 50 * 2 * 64 * 4  # shorter than the budget
    assert plan.full_kv_bytes(1000, 2, head_dim=64, dtype=torch.bfloat16) == 32 * 1000 * 2 * 2 * 64 * 2


def test_token_plan_budget_grows_with_length_like_the_paper():
    plan = token_plan((2, 2), 0.6, H2O(budget_spec=Budget(sparsity=0.6)))
    assert plan.tokens_held(1000).tolist() == [[480, 480], [480, 480]]  # int(1000 * 0.4) + 80
    assert plan.tokens_held(10).tolist() == [[10, 10], [10, 10]]


def test_summary_marks_full_heads_per_layer():
    text = plan_from_scores(torch.tensor([[0.9, 0.1], [0.2, 0.7]]), 0.5).summary()
    assert "layer 0  F.  full: 1/2" in text and "layer 1  .F  full: 1/2" in text
    assert "2/4 KV heads compressed" in text
