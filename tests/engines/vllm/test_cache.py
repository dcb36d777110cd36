"""The compressed heads' KV-cache manager on vLLM's real block pool: sinks kept, blocks freed as the window passes,
nothing freed for full heads, everything back to the pool when a request ends."""

from __future__ import annotations

import pytest
import torch

from kvpress_rl.engines.vllm.layout import kept_history

pytestmark = pytest.mark.usefixtures("vllm_installed")
BLOCK = 32
POOL = 64


def managers():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvpress_rl.engines.vllm.cache import SinkWindowManager, SinkWindowSpec

    pool = BlockPool(num_gpu_blocks=POOL, enable_caching=False, hash_block_size=BLOCK)
    common = dict(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32)
    compressed = SinkWindowManager(SinkWindowSpec(**common), block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                   scheduler_block_size=BLOCK)
    full = FullAttentionManager(FullAttentionSpec(**common), block_pool=pool, enable_caching=False, kv_cache_group_id=1,
                                scheduler_block_size=BLOCK)
    return pool, compressed, full


def step(manager, request: str, computed: int, new: int) -> None:
    """What vLLM's `KVCacheManager.allocate_slots` does for one scheduled step: free, then allocate."""
    manager.remove_skipped_blocks(request, computed)
    manager.allocate_new_blocks(request, computed + new, computed + new)


def test_a_long_request_keeps_the_sink_block_and_the_window():
    pool, compressed, full = managers()
    null = pool.null_block
    step(compressed, "r", 0, 300)  # the prompt, in one step: all of it is cached while it is prefilled
    assert len(compressed.req_to_blocks["r"]) == 10 and null not in compressed.req_to_blocks["r"]
    for computed in range(300, 800):
        step(compressed, "r", computed, 1)
        blocks = compressed.req_to_blocks["r"]
        held = [i for i, block in enumerate(blocks) if block is not null]
        # exactly the blocks this step reads: the sinks' block, the window's and the new token's
        assert set(held) == {p // BLOCK for p in kept_history(computed)} | {computed // BLOCK}
        assert len(held) <= 4
    assert pool.get_num_free_blocks() == POOL - 1 - len(held)  # block 0 of the pool is the null block
    compressed.free("r")
    assert pool.get_num_free_blocks() == POOL - 1


def test_full_heads_free_nothing_and_both_return_everything():
    pool, compressed, full = managers()
    step(full, "r", 0, 100)
    step(compressed, "r", 0, 100)
    for computed in range(100, 600):
        step(full, "r", computed, 1)
        step(compressed, "r", computed, 1)
    assert pool.null_block not in full.req_to_blocks["r"] and len(full.req_to_blocks["r"]) == 19
    assert sum(b is not pool.null_block for b in compressed.req_to_blocks["r"]) <= 5
    full.free("r")
    compressed.free("r")
    assert pool.get_num_free_blocks() == POOL - 1


def test_chunked_prefill_frees_behind_each_chunk():
    pool, compressed, _ = managers()
    for computed in range(0, 1024, 256):  # four chunks of 256 tokens
        step(compressed, "r", computed, 256)
        held = sum(b is not pool.null_block for b in compressed.req_to_blocks["r"])
        # the sink block, the previous chunk's last 64 tokens (2 or 3 blocks) and this chunk's 8 blocks
        assert held <= 1 + 3 + 8
    assert held < 1024 // BLOCK


@pytest.mark.parametrize("full, compressed", [(45, 67), (36, 54), (18, 72), (45, 45)])
def test_vllm_groups_tagged_full_heads_without_padding_them(full, compressed):
    """vLLM's own grouping of the specs the model reports: full groups hold full heads only, never padding."""
    from vllm.v1.core.kv_cache_utils import _get_kv_cache_groups_uniform_page_size

    from kvpress_rl.engines.vllm.cache import SinkWindowSpec, TaggedFullSpec
    from kvpress_rl.engines.vllm.layout import group_layout, head_blocks_held, padded_head_blocks

    common = dict(block_size=16, num_kv_heads=1, head_size=128, dtype=torch.bfloat16)
    per_group = group_layout(full, compressed, 4096, 16)
    tags = [i // per_group if per_group else 0 for i in range(full)]
    specs = {f"model.layers.{i}.self_attn.attn.kvh0": TaggedFullSpec(**common, group_tag=tags[i]) for i in range(full)}
    specs.update({f"model.layers.{full + i}.self_attn.attn.kvh0": SinkWindowSpec(**common) for i in range(compressed)})
    groups = _get_kv_cache_groups_uniform_page_size(specs)
    size = max(len(g.layer_names) for g in groups)  # vLLM's group size: a shorter group is padded to it
    full_groups = [g for g in groups if isinstance(g.kv_cache_spec, TaggedFullSpec)]
    assert {len(g.layer_names) for g in full_groups} == {size}  # no full group is padded
    assert sum(len(g.layer_names) for g in full_groups) == full
    compressed_group_blocks = size * (head_blocks_held(4096, 16, full=False) + 1)
    held = len(full_groups) * size * 256 + (len(groups) - len(full_groups)) * compressed_group_blocks
    assert held == padded_head_blocks(full, compressed, size, 4096, 16)
    assert len(groups) <= 16


class CachedBlocks:
    """vLLM's block pool as the cache-hit search sees it: block `i` of the prompt is cached when `i` is in `cached`
    (its hash is its index)."""

    def __init__(self, cached: set[int]) -> None:
        from vllm.v1.core.block_pool import BlockPool

        self.null_block = BlockPool(num_gpu_blocks=2, enable_caching=False, hash_block_size=BLOCK).null_block
        self.hash_block_size = BLOCK
        self.cached = cached

    def get_cached_block(self, block_hash, group_ids):
        return [f"block {block_hash}" for _ in group_ids] if block_hash in self.cached else None


def cache_hit(cached: set[int], prompt_blocks: int, max_length: int, windowed: bool = True):
    from kvpress_rl.engines.vllm.cache import SinkWindowManager, SinkWindowSpec

    spec = SinkWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.float32, sink=16, window=63,
                          windowed_prompts=windowed)
    pool = CachedBlocks(cached)
    blocks, length = SinkWindowManager.find_longest_cache_hit(
        list(range(prompt_blocks)), max_length, [0, 1], pool, spec, drop_eagle_block=False, alignment_tokens=BLOCK)
    return [[None if b is pool.null_block else b for b in group] for group in blocks], length


def test_a_cached_prefix_needs_only_its_sink_and_window_blocks():
    """The gated model's streaming branch goes on from a cached prefix that kept its sink block and the blocks of its
    last 63 tokens: everything between them may have gone back to the pool."""
    blocks, length = cache_hit({0, 5, 6}, prompt_blocks=8, max_length=7 * BLOCK)
    assert length == 7 * BLOCK  # reads position 0..15 (block 0) and 161..223 (blocks 5, 6)
    assert blocks[0] == ["block 0", None, None, None, None, "block 5", "block 6"] and blocks[1] == blocks[0]
    # the full heads' hit bounds it; a window block missing moves the hit back to where the window is whole
    assert cache_hit({0, 5, 6}, 8, max_length=6 * BLOCK)[1] == BLOCK  # 2 to 6 blocks need blocks 1 to 4 too
    assert cache_hit({0, 1, 2, 3, 6}, 8, max_length=7 * BLOCK)[1] == 4 * BLOCK
    assert cache_hit({1, 2, 3, 4, 5, 6}, 8, max_length=7 * BLOCK)[1] == 0  # no sink block: nothing to go on from


def test_a_head_plans_compressed_heads_never_hit():
    """A plan's compressed head attends to its whole prompt, which a cached prefix no longer holds."""
    assert cache_hit(set(range(8)), 8, max_length=7 * BLOCK, windowed=False) == ([[], []], 0)
