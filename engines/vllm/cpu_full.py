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
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadata, CPUAttentionMetadataBuilder

BACKEND_NAME = "KVRL_CPU_FULL"


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
    """Builds vLLM's CPU metadata with the schedule of the group's most common call (a layer's full heads in this group:
    its sub-layers `...kvh{j}` counted by layer), and the others' on demand."""

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
        return BACKEND_NAME

    @staticmethod
    def get_builder_cls() -> type[FullHeadsCPUBuilder]:
        return FullHeadsCPUBuilder
