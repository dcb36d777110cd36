"""The one-KV-head attention sub-layers a decoder layer registers with vLLM under a head plan or the gated model: each
only gives vLLM one head's cache (its spec and backend); its layer attends for it (`heads.py`).
"""

from __future__ import annotations

from dataclasses import fields

from vllm.model_executor.layers.attention import Attention
from vllm.platforms import current_platform

from kvpress_rl.engines.vllm.backend import SinkWindowBackend
from kvpress_rl.engines.vllm.cache import SinkWindowSpec, TaggedFullSpec


class SinkWindowAttention(Attention):
    """A compressed head: vLLM's attention layer with the sink + window backend and cache spec (`block`: the
    streaming branch's blocks of the gated model, 0 for token-exact; `windowed_prompts`: the gated model's streaming
    branch, whose prompt tokens read their sinks and window too)."""

    def __init__(self, *args, sink: int, window: int, block: int = 0, windowed_prompts: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, attn_backend=SinkWindowBackend, **kwargs)
        self.sink, self.window, self.block, self.windowed_prompts = sink, window, block, windowed_prompts

    def get_kv_cache_spec(self, vllm_config) -> SinkWindowSpec:
        return SinkWindowSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1,
                              head_size=self.head_size, head_size_v=self.head_size_v, dtype=self.kv_cache_torch_dtype,
                              sink=self.sink, window=self.window, block=self.block,
                              windowed_prompts=self.windowed_prompts)


class FullHeadAttention(Attention):
    """A full head: vLLM's attention layer and backend, its spec tagged with the KV-cache group it belongs to."""

    def __init__(self, *args, group_tag: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_tag = group_tag

    def get_kv_cache_spec(self, vllm_config) -> TaggedFullSpec:
        spec = super().get_kv_cache_spec(vllm_config)
        settings = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
        return TaggedFullSpec(**settings, group_tag=self.group_tag)



def full_backend() -> type | None:
    """The full heads' backend: on vLLM's CPU build its kernel with schedules for several heads, elsewhere the
    platform's own (None)."""
    if not current_platform.is_cpu():
        return None
    from kvpress_rl.engines.vllm.cpu_full import FullHeadsCPUBackend

    return FullHeadsCPUBackend
