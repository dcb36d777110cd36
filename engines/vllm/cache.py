"""The KV cache of a compressed head in vLLM: a spec (what one head's page holds, how much a request can need) and a
manager (which of a request's blocks it keeps). Registered with vLLM's `KVCacheSpecRegistry` by `plugin.register`.

A compressed head is one attention sub-layer with one KV head (`models.py`), so its page is the same size as a full
head's and vLLM groups the two kinds without padding pages. The manager keeps the blocks holding the sinks and the
window of the next step; every block wholly between them goes back to the block pool (its place in the block table
is vLLM's null block), so a long request holds `cdiv(16, B) + cdiv(64, B) + 1` blocks per compressed head whatever
its length. Under the gated model (`windowed_prompts`) a cached prefix needs only those blocks, so prefix caching
works there: the copies of a GRPO prompt prefill it once.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from kvpress_rl.engines.vllm.layout import freeable_blocks, resume_blocks
from kvpress_rl.engines.vllm.vllm_compat import remove_blocks
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(AttentionSpec):
    """The cache of a head that keeps its first `sink` tokens and its last `window` (its own base type in the registry:
    grouped with full attention, its blocks would never be freed)."""

    sink: int = SINK_TOKENS
    window: int = WINDOW_TOKENS
    # the gated model's streaming branch in blocks of `block` tokens (the official mask): a token reads the sinks and
    # the recent keys of its own block and the ones before it, a subset of `window`; 0: token-exact
    block: int = 0
    # True: prompt tokens too read only the sinks and the window (the gated model's streaming branch), so a request
    # can go on from a cached prefix that kept only those blocks (prefix caching); False: a head plan's compressed
    # head, whose prompt is plain causal attention over all of it
    windowed_prompts: bool = False

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """Blocks a request can hold at once: the sinks and the window, plus the tokens of one scheduling step (a
        prompt is cached whole while it is prefilled), plus one block the window straddles."""
        tokens = min(vllm_config.model_config.max_model_len, self.sink + self.window + vllm_config.max_in_flight_tokens)
        return (cdiv(tokens, self.block_size) + 1) * self.page_size_bytes


@dataclass(frozen=True, kw_only=True)
class TaggedFullSpec(FullAttentionSpec):
    """A full head's cache, vLLM's full attention with a `group_tag`: heads with different tags never share a KV-cache
    group, which is how `layout.group_layout` keeps vLLM from padding full groups (managed as full attention)."""

    group_tag: int = 0

    @classmethod
    def merge(cls, specs):
        if len({getattr(spec, "group_tag", 0) for spec in specs}) > 1:
            raise AssertionError("full heads of different group tags never share a KV-cache group")
        return super().merge(specs)


class SinkWindowManager(SingleTypeKVCacheManager):
    """Frees a request's blocks between its sinks and its window as the window moves on."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink = kv_cache_spec.sink
        self.window = kv_cache_spec.window

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        gap = freeable_blocks(processed_computed_tokens, self.block_size, self.sink, self.window)
        remove_blocks(self, request_id, gap.start, gap.stop)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        """The longest cached prefix of at most `max_length` tokens whose sink and window blocks are all still in the
        pool (`layout.resume_blocks`; null blocks in between): the copies of a GRPO prompt prefill it once. A head
        plan's compressed heads never hit (a cached prefix lost the middle their prompt attends to)."""
        size = kv_cache_spec.block_size
        misses = tuple([] for _ in kv_cache_group_ids), 0
        if not kv_cache_spec.windowed_prompts or drop_eagle_block or block_pool.hash_block_size != size:
            return misses
        for blocks in range(min(max_length // size, len(block_hashes)), 0, -1):
            if (blocks * size) % alignment_tokens:
                continue
            needed = resume_blocks(blocks * size, size, kv_cache_spec.sink, kv_cache_spec.window)
            found = []
            for i in needed:
                cached = block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)
                if not cached:
                    break
                found.append(cached)
            if len(found) == len(needed):
                hit = tuple([block_pool.null_block] * blocks for _ in kv_cache_group_ids)
                for i, cached in zip(needed, found):
                    for group, block in zip(hit, cached):
                        group[i] = block
                return hit, blocks * size
        return misses
