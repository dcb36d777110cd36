"""Full heads on vLLM's CPU build: its own attention kernel, called over all of a layer's full heads at once.

vLLM's CPU kernel takes a schedule (`cpu_attn_get_scheduler_metadata`) sized by the call's head counts, and a KV-cache
group's builder makes it for the group's layers (here: one KV head each). `FullHeadsCPUBuilder` builds vLLM's metadata
and lets `heads.FullHeads` ask for the schedule of a call over `n` KV heads (`for_heads(n)`), made at most once per
head count and step. The kernel reads strided multi-head views as they are (checked by the engine tests).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadata, CPUAttentionMetadataBuilder

from kvpress_rl.engines.vllm.engine import CPU_BLOCK_SIZE
from kvpress_rl.engines.vllm.plugin import CPU_FULL_BACKEND
from kvpress_rl.engines.vllm.vllm_compat import cpu_attention_isa, ops


@dataclass
class FullHeadsCPUMetadata(CPUAttentionMetadata):
    heads: int = 1  # the KV heads of a call this metadata's own schedule is for
    schedule: Callable[[int], torch.Tensor] | None = None
    by_heads: dict[int, CPUAttentionMetadata] = field(default_factory=dict)

    def for_heads(self, heads: int) -> CPUAttentionMetadata:
        if heads == self.heads:
            return self
        if heads not in self.by_heads:
            values = {f.name: getattr(self, f.name) for f in fields(CPUAttentionMetadata)}
            self.by_heads[heads] = CPUAttentionMetadata(**{**values, "scheduler_metadata": self.schedule(heads)})
        return self.by_heads[heads]


class FullHeadsCPUBuilder(CPUAttentionMetadataBuilder):
    """Builds vLLM's CPU metadata with the schedule of the group's most common call (a layer's full heads in this
    group: its sub-layers `...kvh{j}` counted by layer), and the others' on demand."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        per_layer = Counter(name.rsplit(".kvh", 1)[0] for name in layer_names)
        self.common_heads = Counter(per_layer.values()).most_common(1)[0][0] if per_layer else 1

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> FullHeadsCPUMetadata:
        per_kv_head = self.num_heads // self.num_kv_heads
        one_head = self.num_heads, self.num_kv_heads
        self.num_heads, self.num_kv_heads = per_kv_head * self.common_heads, self.common_heads
        try:
            metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        finally:
            self.num_heads, self.num_kv_heads = one_head
        meta = common_attn_metadata

        def schedule(heads: int) -> torch.Tensor:
            return ops.cpu_attn_get_scheduler_metadata(
                num_reqs=meta.num_reqs, num_heads=heads * per_kv_head, num_kv_heads=heads, head_dim=self.head_dim,
                seq_lens=meta.seq_lens, dtype=self.dtype, query_start_loc=meta.query_start_loc, causal=metadata.causal,
                sliding_window_size=self.window_size, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=metadata.dynamic_causal, kv_cache_dtype=self.kv_cache_dtype)

        values = {f.name: getattr(metadata, f.name) for f in fields(CPUAttentionMetadata)}
        return FullHeadsCPUMetadata(**values, heads=self.common_heads, schedule=schedule)


class FullHeadsCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return CPU_FULL_BACKEND

    @staticmethod
    def get_builder_cls() -> type[FullHeadsCPUBuilder]:
        return FullHeadsCPUBuilder


PROMPT_BLOCK = CPU_BLOCK_SIZE  # the scratch cache's block size: the engine's own on the CPU


@dataclass(frozen=True)
class ScratchCache:
    """A paged cache made for one call of the kernel, holding the keys and values of prompts `spans`."""

    key_cache: torch.Tensor  # [blocks, kv_heads, PROMPT_BLOCK, D]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [prompts, most blocks of a prompt]
    query_start_loc: torch.Tensor  # [prompts + 1]
    seq_lens: torch.Tensor  # [prompts]
    isa: str

    @classmethod
    def of(cls, key: torch.Tensor, value: torch.Tensor, lengths: list[int]) -> ScratchCache:
        """Keys and values `[T, C, D]` of consecutive prompts of `lengths` tokens written into a new paged cache."""
        kv_heads, dim = key.shape[1], key.shape[2]
        blocks = [-(-n // PROMPT_BLOCK) for n in lengths]
        table = torch.zeros((len(lengths), max(blocks)), dtype=torch.int32)
        slots, first = [], 0
        for r, (n, count) in enumerate(zip(lengths, blocks)):
            table[r, :count] = torch.arange(first, first + count, dtype=torch.int32)
            slots.append(first * PROMPT_BLOCK + torch.arange(n))
            first += count
        cache = torch.zeros((first, kv_heads, PROMPT_BLOCK * 2, dim), dtype=key.dtype)  # the kernel reads whole blocks
        key_cache, value_cache = cache.chunk(2, dim=2)
        isa = cpu_attention_isa(key.dtype, PROMPT_BLOCK, dim)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.cat(slots), isa, k_scale=1.0,
                                       v_scale=1.0, kv_cache_dtype="auto")
        starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(key_cache=key_cache, value_cache=value_cache, block_table=table, query_start_loc=starts,
                   seq_lens=torch.tensor(lengths, dtype=torch.int32), isa=isa)


def prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[tuple[int, int]],
                     scale: float, output: torch.Tensor) -> None:
    """Causal attention of prompts prefilled in one step (`spans`: `(start, end)` token ranges of the step, nothing
    cached before them) through vLLM's CPU kernel, all spans in one call: query `[T, H, D]`, key and value
    `[T, C, D]`, output `[T, H, D]` written at the spans' tokens. The keys go through a scratch paged cache made for
    this call (the compressed heads' own pages hold rows of `[key | value]`, not the kernel's layout)."""
    if len(spans) == 1:
        tokens = slice(*spans[0])
    else:
        tokens = torch.cat([torch.arange(start, end) for start, end in spans])
    q, k, v = query[tokens], key[tokens], value[tokens]
    cache = ScratchCache.of(k, v, [end - start for start, end in spans])
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(spans), num_heads=query.shape[1], num_kv_heads=key.shape[1], head_dim=key.shape[2],
        seq_lens=cache.seq_lens, dtype=key.dtype, query_start_loc=cache.query_start_loc, causal=True,
        sliding_window_size=-1, isa=cache.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
        kv_cache_dtype="auto")
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q.contiguous(), key_cache=cache.key_cache, value_cache=cache.value_cache, output=out,
        query_start_loc=cache.query_start_loc, seq_lens=cache.seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=cache.block_table, softcap=0.0, scheduler_metadata=schedule, s_aux=None,
        dynamic_causal=None, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    output[tokens] = out
