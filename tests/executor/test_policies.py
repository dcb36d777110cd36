import pytest
import torch

from kvpress_rl import KvrlError
from kvpress_rl.executor import compressed
from kvpress_rl.executor.cache import HeadwiseLayer
from kvpress_rl.models import cache_kwargs, random_model, small_config
from kvpress_rl.plan import token_plan
from kvpress_rl.policies import H2O, RKV, Budget, SnapKV, Streaming, make_policy


def layer_with(policy, slots: int, heads: int = 1) -> HeadwiseLayer:
    """A layer whose compressed heads hold `slots` tokens; key[..., 0] records each token's position."""
    layer = HeadwiseLayer(torch.tensor([], dtype=torch.long), torch.arange(heads), policy, groups=1)
    keys = torch.zeros(1, heads, slots, 4)
    keys[..., 0] = torch.arange(slots, dtype=torch.float32)
    layer.update(keys, keys.clone())
    return layer


def kept_positions(layer: HeadwiseLayer) -> list[int]:
    return layer.compressed_keys[0, 0, :, 0].long().tolist()


def test_snapkv_keeps_what_the_observation_window_attends_to():
    policy = SnapKV(budget_spec=Budget(fixed=4), window=2, kernel=1)
    layer = layer_with(policy, 20)
    attention = torch.full((1, 1, 2, 20), 0.01)
    attention[..., 3] = 0.5  # the two observation queries look at positions 3 and 7
    attention[..., 7] = 0.3
    policy.observe(layer.stats, attention)
    layer.compress()
    assert kept_positions(layer) == [3, 7, 18, 19]  # the heavy two + the observation window


def test_snapkv_pooling_spreads_scores_to_neighbours():
    policy = SnapKV(budget_spec=Budget(fixed=3), window=1, kernel=3)
    layer = layer_with(policy, 12)
    attention = torch.zeros(1, 1, 1, 12)
    attention[..., 4], attention[..., 5], attention[..., 6] = 0.1, 0.9, 0.3
    attention[..., 9] = 0.5  # second-highest alone, but pooled it averages 0.5 / 3 and loses to slot 6
    policy.observe(layer.stats, attention)
    layer.compress()
    assert kept_positions(layer) == [5, 6, 11]


def test_snapkv_pools_only_the_slots_before_the_observation_window():
    # the window's attention to itself must not leak into the slot before it (the old pooling kept slot 9)
    policy = SnapKV(budget_spec=Budget(fixed=3), window=2, kernel=3)
    layer = layer_with(policy, 12)
    attention = torch.zeros(1, 1, 2, 12)
    attention[..., 3], attention[..., 4], attention[..., 5] = 0.05, 0.1, 0.05
    attention[..., 10] = 0.5  # the window queries attend to themselves
    attention[..., 11] = 0.3
    policy.observe(layer.stats, attention)
    layer.compress()
    assert kept_positions(layer) == [4, 10, 11]


def test_rkv_pools_and_normalises_only_the_slots_before_the_window():
    policy = RKV(budget_spec=Budget(fixed=5), window=2, kernel=3, mix=1.0, buffer=0)
    layer = layer_with(policy, 12)
    attention = torch.zeros(1, 1, 2, 12)
    attention[..., 3] = 0.05  # pooled by max: 2, 3 and 4 share its score
    attention[..., 7] = 0.01
    attention[..., 10], attention[..., 11] = 0.6, 0.34  # the window's self-attention
    policy.observe(layer.stats, attention)
    layer.compress()
    assert kept_positions(layer) == [2, 3, 4, 10, 11]  # the old pooling over all slots kept 9


def test_rkv_redundancy_keeps_the_last_of_near_copies():
    # slots 1, 3, 5 are near-copies (cos > 0.5); in every row the last similar key is zeroed, so the
    # copy at 5 gets no redundancy and 1 and 3 go; the old symmetric mean dropped 5 (most similar)
    policy = RKV(budget_spec=Budget(fixed=8), window=2, kernel=1, mix=0.0, buffer=0)
    layer = HeadwiseLayer(torch.tensor([], dtype=torch.long), torch.arange(1), policy, groups=1)
    keys = torch.zeros(1, 1, 10, 16)
    for slot, dim in zip((0, 2, 4, 6, 7, 8, 9), (3, 4, 5, 6, 7, 8, 9)):
        keys[0, 0, slot, dim] = 1.0
    keys[0, 0, (1, 3, 5), 0] = 1.0
    keys[0, 0, 1, 10] = keys[0, 0, 3, 11] = 0.3
    keys[..., 15] = torch.arange(10) * 1e-3  # distinguishable slots (cosines stay far from 0.5)
    layer.update(keys, keys.clone())
    layer.compress()
    kept = [int(torch.nonzero((keys[0, 0] == row).all(-1))[0]) for row in layer.compressed_keys[0, 0]]
    assert kept == [0, 2, 4, 5, 6, 7, 8, 9]


def test_rkv_redundancy_follows_the_threshold_rule():
    policy = RKV(budget_spec=Budget(fixed=4), window=2)
    keys = torch.randn(1, 2, 9, 8, generator=torch.Generator().manual_seed(5))
    keys[0, 0, 4] = keys[0, 0, 1] + 0.05
    valid = torch.ones(1, 2, 9, dtype=torch.bool)
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    for h in range(2):
        sim[0, h].fill_diagonal_(0.0)
        for row in range(9):
            above = [j for j in range(9) if sim[0, h, row, j] > 0.5]
            sim[0, h, row, above[-1] if above else 0] = 0.0
    torch.testing.assert_close(policy.redundancy(keys, valid), sim.mean(dim=-2).softmax(dim=-1))


def test_decode_attention_is_observed_over_budget_plus_one_then_trimmed():
    seen = []

    class Recording(H2O):
        def observe(self, stats, probs):
            seen.append(probs.shape[-1])
            super().observe(stats, probs)

    model = random_model(small_config("llama"), seed=0)
    policy = Recording(budget_spec=Budget(fixed=20))
    with compressed(model, token_plan((4, 4), 0.5, policy)) as session:
        cache = session.new_cache()
        ids = torch.randint(0, 256, (1, 40))
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        seen.clear()
        model(input_ids=ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
        assert all(layer.compressed_keys.shape[2] == 20 for layer in cache.layers)
    assert seen and set(seen) == {21}


def test_h2o_keeps_half_heavy_hitters_half_recent():
    policy = H2O(budget_spec=Budget(fixed=6))
    layer = layer_with(policy, 20)
    accumulated = torch.rand(1, 1, 3, 20) * 0.01
    accumulated[..., 2] = 1.0
    accumulated[..., 5] = 0.8
    accumulated[..., 11] = 0.6
    policy.observe(layer.stats, accumulated)
    layer.compress()
    assert kept_positions(layer) == [2, 5, 11, 17, 18, 19]


def test_h2o_accumulates_over_queries_and_group_heads():
    probs = torch.rand(1, 4, 3, 10)  # 2 KV heads x 2 query heads each
    layer = HeadwiseLayer(torch.tensor([], dtype=torch.long), torch.arange(2), H2O(budget_spec=Budget(fixed=4)),
                          groups=2)
    summed = layer.compressed._sum_groups(probs)
    torch.testing.assert_close(summed[0, 1], probs[0, 2] + probs[0, 3])
    policy = H2O(budget_spec=Budget(fixed=4))
    stats = policy.new_stats(torch.zeros(1, 2, 10, 4))
    policy.observe(stats, summed)
    torch.testing.assert_close(stats["accumulated_attention"], summed.sum(dim=2))


def test_streaming_keeps_sinks_and_window():
    layer = layer_with(Streaming(sink=3, window=4), 20)
    layer.compress()
    assert kept_positions(layer) == [0, 1, 2, 16, 17, 18, 19]


def test_rkv_drops_redundant_keys_first():
    policy = RKV(budget_spec=Budget(fixed=5), window=2, kernel=1, mix=0.0, buffer=0)
    layer = HeadwiseLayer(torch.tensor([], dtype=torch.long), torch.arange(1), policy, groups=1)
    keys = torch.randn(1, 1, 10, 8, generator=torch.Generator().manual_seed(0))
    keys[0, 0, 1:5] = keys[0, 0, 0] + 0.01 * torch.randn(4, 8)  # positions 0..4 are near-copies
    keys[..., 0] += torch.arange(10) * 1e-4
    layer.update(keys, keys.clone())
    layer.compress()
    kept = layer.compressed_keys[0, 0]
    duplicates = sum(int(torch.allclose(row, keys[0, 0, i], atol=1e-6)) for row in kept for i in range(5))
    assert duplicates <= 1  # of five near-copies at most one survives


@pytest.mark.parametrize("name", ["streaming", "snapkv", "h2o", "rkv"])
def test_every_token_policy_keeps_exactly_its_budget_at_every_step(name):
    model = random_model(small_config("llama"), seed=0)
    options = {"buffer": 0} if name == "rkv" else {}
    policy = make_policy(name, sparsity=0.5, **options)
    plan = token_plan((4, 4), 0.5, policy)
    ids = torch.randint(0, 256, (2, 160))
    with compressed(model, plan) as session:
        cache = session.new_cache()
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        for step in range(40):
            seen = 160 + step
            for layer in cache.layers:
                assert layer.compressed_keys.shape[2] == min(seen, policy.budget(seen))
            model(input_ids=ids[:, step : step + 1], **cache_kwargs(model, cache), use_cache=True)


def test_rkv_buffer_lets_the_cache_grow_then_cuts_back_to_budget():
    model = random_model(small_config("llama"), seed=0)
    policy = RKV(budget_spec=Budget(fixed=100), buffer=16)
    with compressed(model, token_plan((4, 4), 0.5, policy)) as session:
        cache = session.new_cache()
        ids = torch.randint(0, 256, (1, 150))
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        sizes = []
        for step in range(40):
            model(input_ids=ids[:, step : step + 1], **cache_kwargs(model, cache), use_cache=True)
            sizes.append(cache.layers[0].compressed_keys.shape[2])
    # compression fires once a head holds budget + buffer (after that step's attention over 116 slots)
    assert max(sizes) == 115 and sizes.count(100) >= 2 and sizes[0] == 101


def test_generate_runs_with_every_policy():
    model = random_model(small_config("qwen3"), seed=0)
    ids = torch.randint(0, 256, (2, 120))
    for name in ("snapkv", "h2o", "rkv"):
        with compressed(model, token_plan((4, 4), 0.6, make_policy(name, sparsity=0.6))) as session:
            out = session.generate(ids, max_new_tokens=10, do_sample=False)
        assert out.shape == (2, 130)


def test_bad_policies_are_refused():
    with pytest.raises(KvrlError, match="unknown token policy 'lru'; accepted: streaming, snapkv, h2o, rkv"):
        make_policy("lru")
    with pytest.raises(KvrlError, match="smaller than its protected window"):
        SnapKV(budget_spec=Budget(fixed=8), window=32)
    with pytest.raises(KvrlError, match="window >= 1"):
        Streaming(sink=16, window=0)
    with pytest.raises(KvrlError, match="outside"):
        Budget(sparsity=1.2)
