import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kvpress_rl import HeadScores, KvrlError, plan_from_scores
from kvpress_rl.plan import token_plan
from kvpress_rl.policies import H2O, Budget, Streaming


def official_rule(path, sparsity: float) -> np.ndarray:
    """The RLKV / DuoAttention evaluation's `sparsify_attention_heads`, written out independently:
    gates from the TSV, clipped, seeded noise through NumPy's global generator, quantile threshold."""
    gates = np.clip(np.loadtxt(path, dtype=float, ndmin=2), 0, 1)
    np.random.seed(42)
    gates = gates + np.random.uniform(0, 1e-6, gates.shape)
    threshold = np.quantile(gates, sparsity)
    return gates >= threshold  # True: the head keeps its full cache


def plan_marks(output: str) -> np.ndarray:
    """`kvrl plan`'s per-layer lines (`layer 3  F..F  full: 2/4`) as a bool matrix."""
    rows = re.findall(r"^layer\s+\d+\s+([F.]+)\s+full:", output, flags=re.M)
    return np.array([[mark == "F" for mark in row] for row in rows])


@pytest.mark.parametrize("model", ["Llama-3.1-8B-R1", "Qwen-2.5-7B-R1", "Qwen-3-4B-Thinking"])
@pytest.mark.parametrize("pattern", ["rlkv.tsv", "duo_attention.tsv"])
def test_kvrl_plan_keeps_the_heads_of_the_official_rule(head_patterns, model, pattern):
    from kvpress_rl.cli.main import app

    path = head_patterns / model / pattern
    for sparsity in (0.2, 0.4, 0.5, 0.6, 0.8):
        result = CliRunner().invoke(app, ["plan", "--heads", str(path), "--sparsity", str(sparsity)])
        assert result.exit_code == 0, result.output
        expected = official_rule(path, sparsity)
        assert np.array_equal(plan_marks(result.output), expected), (model, pattern, sparsity)
        assert "rule official" in result.output


def test_published_counts_differ_between_the_rules_as_measured(head_patterns):
    qwen = HeadScores.load(head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv")  # 112 heads
    assert plan_from_scores(qwen, 0.2).num_compressed == 23
    assert plan_from_scores(qwen, 0.2, rule="round").num_compressed == 22
    assert plan_from_scores(qwen, 0.8).num_compressed == 89
    assert plan_from_scores(qwen, 0.8, rule="round").num_compressed == 90


def test_official_rule_compresses_ceil_of_n_minus_one_times_s_with_distinct_scores():
    scores = torch.randperm(90).reshape(30, 3).float() / 100
    for sparsity in (0.1, 0.25, 0.5, 0.75, 0.9):
        plan = plan_from_scores(scores, sparsity)
        assert plan.num_compressed == math.ceil(89 * sparsity)
        assert plan.rule == "official"
        # and the compressed heads are the lowest scores
        assert plan.full.flatten()[scores.flatten().argsort()[: plan.num_compressed]].logical_not().all()


def test_official_ties_break_by_seeded_noise_not_by_position():
    ties = torch.ones(32, 8)  # e.g. DuoAttention gates saturated at 1.0
    plan = plan_from_scores(ties, 0.5)
    assert torch.equal(plan.full, plan_from_scores(ties, 0.5).full)  # deterministic
    compressed = (~plan.full).nonzero()[:, 0]
    # index order would compress layers 0..15 only; the noise spreads the choice over the model
    assert compressed.max() >= 24 and compressed.min() <= 8


def test_sparsity_one_compresses_every_head_and_zero_none():
    assert plan_from_scores(torch.rand(4, 4), 1.0).num_compressed == 16
    assert plan_from_scores(torch.rand(4, 4), 0.0).num_compressed == 0


def test_unknown_rule_is_refused():
    with pytest.raises(KvrlError, match="accepted: official, round"):
        plan_from_scores(torch.rand(2, 2), 0.5, rule="quantile")


def test_global_ranking_compresses_the_lowest_fraction_across_layers():
    scores = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.7, 0.3]])
    for rule in ("official", "round"):  # ceil(5 * 0.5) = round(6 * 0.5) = 3
        plan = plan_from_scores(HeadScores(scores), 0.5, rule=rule)
        # the three lowest: 0.1 (layer 0), 0.2 and 0.3 (layer 1) - no per-layer quota
        assert plan.full.tolist() == [[True, False, True], [False, True, False]]
        assert plan.num_compressed == 3


def test_round_rule_ties_break_toward_earlier_heads_deterministically():
    plan = plan_from_scores(torch.full((2, 4), 0.5), 0.25, rule="round")
    assert plan.full.flatten().tolist() == [False, False] + [True] * 6
    assert torch.equal(plan_from_scores(torch.full((2, 4), 0.5), 0.25, rule="round").full, plan.full)


def test_round_rule_clips_before_ranking_and_ties_break_by_raw_score():
    plan = plan_from_scores(torch.tensor([[1.3, 1.0, -0.2, 0.0]]), 0.5, rule="round")
    assert plan.full.tolist() == [[True, True, False, False]]
    # 1.3 and 1.1 both clip to 1 (keep the full cache); among them the lower raw gate goes first
    plan = plan_from_scores(torch.tensor([[1.3, 1.1, 0.9, 0.95]]), 0.25, rule="round")
    assert plan.full.tolist() == [[True, True, False, True]]
    plan = plan_from_scores(torch.tensor([[1.3, 1.1, 1.2, 1.0]]), 0.5, rule="round")
    assert plan.full.tolist() == [[True, False, True, False]]


def test_official_rule_clips_before_the_threshold():
    # 1.3 and 1.0 both clip to 1 and -0.2 and 0.0 to 0: the two zeros are compressed
    with pytest.warns(UserWarning, match="2 of 4 head scores lie outside"):
        plan = plan_from_scores(torch.tensor([[1.3, 1.0, -0.2, 0.0]]), 0.5)
    assert plan.full.tolist() == [[True, True, False, False]]


def test_official_rule_warns_when_clipping_scores_far_outside_the_unit_interval():
    scores = torch.tensor([[3.0, 7.5, 0.5, 12.0]])  # another scale: 3, 7.5 and 12 all clip to 1
    with pytest.warns(UserWarning, match=r"3 of 4 head scores lie outside \[0, 1\] by more than 0.02.*clips.*rescale"):
        plan_from_scores(scores, 0.5)


def test_official_rule_does_not_warn_on_published_gates_or_small_strays(head_patterns):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_from_scores(torch.tensor([[1.015, -0.011, 0.5, 0.0]]), 0.5)  # within 0.02 of the interval
        for model in ("Llama-3.1-8B-R1", "Qwen-2.5-7B-R1", "Qwen-3-4B-Thinking"):
            for pattern in ("rlkv.tsv", "duo_attention.tsv"):
                plan_from_scores(HeadScores.load(head_patterns / model / pattern), 0.5)


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


def test_a_hybrid_plan_counts_the_full_heads_budget(cli):
    from dataclasses import replace

    from kvpress_rl.policies import full_head_policy

    plan = replace(plan_from_scores(torch.arange(8.0).reshape(2, 4) / 8, 0.5),
                   full_policy=full_head_policy("rkv", "0.25"))
    assert plan.tokens_held(1000).tolist() == [[80, 80, 80, 80], [250, 250, 250, 250]]
    assert plan.kv_bytes(1000, head_dim=2, dtype=torch.float32) == (4 * 80 + 4 * 250) * 2 * 2 * 4
    assert "full heads keep rkv(budget=int(L*(1-0.75))+0" in plan.summary()
    assert full_head_policy("snapkv", "512").budget(10_000) == 512
    for bad, message in (("1.5", "must lie in"), ("0", "whole number"), ("half", "fraction of the sequence"),
                         ("12.5e3", "must lie in")):
        with pytest.raises(KvrlError, match=message):
            full_head_policy("h2o", bad)
    HeadScores(torch.arange(8.0).reshape(2, 4) / 8).save("h.safetensors")
    result = cli("plan", "--heads", "h.safetensors", "--sparsity", "0.5", "--seq-len", "1000", "--head-dim", "2",
                 "--full-policy", "rkv", "--full-budget", "0.25")
    assert result.exit_code == 0 and "16.5%" in result.output  # (4 * 80 + 4 * 250) / (8 * 1000)
    refused = cli("plan", "--heads", "h.safetensors", "--sparsity", "0.5", "--full-policy", "rkv")
    assert refused.exit_code == 2 and "go together" in refused.output
