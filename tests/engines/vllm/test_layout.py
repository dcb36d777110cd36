"""The engine plan, kept positions, freed blocks and the capacity formula (pure Python, no vLLM)."""

from __future__ import annotations

import pytest
import torch

from kvpress_rl import KvrlError
from kvpress_rl.engines.vllm.layout import (
    EnginePlan,
    freeable_blocks,
    head_blocks_held,
    ideal_capacity_ratio,
    kept_history,
)
from kvpress_rl.plan import CompressionPlan, plan_from_scores
from kvpress_rl.policies import SnapKV, Streaming


@pytest.mark.parametrize("computed, expected", [(0, []), (10, list(range(10))), (80, list(range(80))),
                                                (81, list(range(16)) + list(range(17, 81))),
                                                (1000, list(range(16)) + list(range(936, 1000)))])
def test_kept_history_is_sinks_and_window(computed, expected):
    assert kept_history(computed) == expected


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("processed", [79, 80, 81, 95, 96, 97, 143, 144, 1000])
def test_freed_blocks_are_never_read_again(block_size, processed):
    freed = set(freeable_blocks(processed, block_size))
    # every later step reads its kept history: nothing there may lie in a freed block
    for later in range(processed, processed + 3 * block_size):
        assert not {p // block_size for p in kept_history(later)} & freed
    # and a block is freed as soon as no later step reads it
    needed = {p // block_size for later in range(processed, processed + 10_000) for p in kept_history(later)}
    assert set(range(processed // block_size)) - needed - freed == set()


def test_a_long_request_holds_a_constant_number_of_blocks():
    held = {head_blocks_held(tokens, 32, full=False) for tokens in range(200, 5000)}
    assert held <= {3, 4}  # the sink block and the 64-token window over two or three blocks
    assert head_blocks_held(4096, 32, full=True) == 128


def test_ideal_capacity():
    assert ideal_capacity_ratio(0.0, 4096) == 1.0
    assert ideal_capacity_ratio(1.0, 4096) == pytest.approx(4096 / 80)
    assert ideal_capacity_ratio(0.5, 4096) == pytest.approx(1 / (0.5 + 0.5 * 80 / 4096))


def test_plan_round_trips_through_json():
    plan = EnginePlan.from_plan(plan_from_scores(torch.arange(12.0).reshape(3, 4) / 12, 0.5, rule="round"))
    assert EnginePlan.from_json(plan.to_json()) == plan
    assert plan.num_compressed == 6 and plan.num_heads == 12
    with pytest.raises(KvrlError, match="the model has 2 x 4"):
        plan.check_shape(2, 4)


def test_token_and_hybrid_plans_are_refused():
    token = CompressionPlan(torch.zeros(2, 2, dtype=torch.bool), SnapKV(), 0.5)
    with pytest.raises(KvrlError, match="keep sink \\+ recent tokens"):
        EnginePlan.from_plan(token)
    hybrid = CompressionPlan(torch.ones(2, 2, dtype=torch.bool), Streaming(), 0.5, full_policy=SnapKV())
    with pytest.raises(KvrlError, match="full heads"):
        EnginePlan.from_plan(hybrid)


def test_group_layout_keeps_full_groups_exact_where_vllm_would_pad_them():
    from kvpress_rl.engines.vllm.layout import group_layout, padded_head_blocks, vllm_group_size

    assert vllm_group_size(45, 67) == 67  # vLLM alone: the 45 full heads padded to 67
    per_group = group_layout(45, 67, 4096, 16)
    assert 45 % per_group == 0 and 67 >= 1.5 * per_group
    assert padded_head_blocks(45, 67, per_group, 4096, 16) < 0.7 * padded_head_blocks(45, 67, 67, 4096, 16)
    assert group_layout(45, 45, 4096, 16) is None and group_layout(0, 90, 4096, 16) is None  # nothing to gain
