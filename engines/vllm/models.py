"""Llama, Mistral, Qwen2 and Qwen3 in vLLM with one attention sub-layer per KV head.

vLLM gives each attention layer one KV-cache spec and one block table per group of layers with the same spec. A plan
compresses some heads of a layer and not others, so each decoder layer's attention becomes one sub-layer per KV head
(`...self_attn.attn.kvh{j}`, its `G` query heads and one KV head): full heads are vLLM's own `Attention` (the
platform's backend and cache), compressed heads are `SinkWindowAttention` (`cache.py`, `backend.py`). Every sub-layer
has the same page size (one head), so vLLM's hybrid allocator groups them without padding pages.

The classes extend vLLM's stock ones (weights, RoPE, qk-norm unchanged) and, after the stock constructor, swap each
layer's `self_attn.attn` for a `HeadSplitAttention` built from the plan in the model config (`layout.OVERRIDES_KEY`);
the stock attention layer is taken out of vLLM's forward context so that it gets no cache. Nothing else is replaced.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from kvpress_rl.engines.vllm.backend import SinkWindowBackend
from kvpress_rl.engines.vllm.cache import SinkWindowSpec, TaggedFullSpec
from kvpress_rl.engines.vllm.gated import gate_attention, set_model_gates
from kvpress_rl.engines.vllm.layout import GATED_KEY, OVERRIDES_KEY, EnginePlan, group_layout


class SinkWindowAttention(Attention):
    """A compressed head: vLLM's attention layer with the sink + window backend and cache spec."""

    def __init__(self, *args, sink: int, window: int, **kwargs) -> None:
        super().__init__(*args, attn_backend=SinkWindowBackend, **kwargs)
        self.sink, self.window = sink, window

    def get_kv_cache_spec(self, vllm_config) -> SinkWindowSpec:
        return SinkWindowSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1, head_size=self.head_size,
                              head_size_v=self.head_size_v, dtype=self.kv_cache_torch_dtype, sink=self.sink, window=self.window)


class FullHeadAttention(Attention):
    """A full head: vLLM's attention layer and backend, its spec tagged with the KV-cache group it belongs to."""

    def __init__(self, *args, group_tag: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_tag = group_tag

    def get_kv_cache_spec(self, vllm_config) -> TaggedFullSpec:
        spec = super().get_kv_cache_spec(vllm_config)
        return TaggedFullSpec(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.init}, group_tag=self.group_tag)


class HeadSplitAttention(nn.Module):
    """Takes the place of one layer's attention: splits q, k, v by KV head, runs each head's sub-layer, concatenates."""

    def __init__(self, stock: Attention, full: tuple[bool, ...], plan: EnginePlan, cache_config, tags: list[int]) -> None:
        super().__init__()
        if stock.sliding_window is not None or stock.has_sink or stock.kv_sharing_target_layer_name is not None:
            raise ValueError(f"{stock.layer_name}: the kvpress-rl engine runs plain causal attention layers "
                             "(no sliding window, learned sinks or shared KV)")
        if len(full) != stock.num_kv_heads:
            raise ValueError(f"{stock.layer_name}: the plan has {len(full)} KV heads, the layer {stock.num_kv_heads}")
        self.num_kv_heads = stock.num_kv_heads
        self.group = stock.num_heads // stock.num_kv_heads
        self.head_size = stock.head_size
        for j, keeps_all in enumerate(full):
            name = f"{stock.layer_name}.kvh{j}"
            if keeps_all:
                layer = FullHeadAttention(self.group, stock.head_size, stock.impl.scale, num_kv_heads=1, cache_config=cache_config,
                                          prefix=name, group_tag=tags[j])
            else:
                layer = SinkWindowAttention(self.group, stock.head_size, stock.impl.scale, num_kv_heads=1, cache_config=cache_config,
                                            prefix=name, sink=plan.sink, window=plan.window)
            self.add_module(f"kvh{j}", layer)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tokens = q.shape[0]
        q = q.view(tokens, self.num_kv_heads, self.group * self.head_size)
        k = k.view(tokens, self.num_kv_heads, self.head_size)
        v = v.view(tokens, self.num_kv_heads, self.head_size)
        outs = [getattr(self, f"kvh{j}")(q[:, j].contiguous(), k[:, j].contiguous(), v[:, j].contiguous()) for j in range(self.num_kv_heads)]
        return torch.cat(outs, dim=-1)


def split_attention(model: nn.Module, vllm_config) -> EnginePlan:
    """Give every decoder layer of `model` (the inner `...Model`) one attention sub-layer per KV head, as the plan says."""
    hf_config = vllm_config.model_config.hf_config
    plan = EnginePlan.from_json(getattr(hf_config, OVERRIDES_KEY, None))
    if vllm_config.parallel_config.tensor_parallel_size != 1 or vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise ValueError("the kvpress-rl engine runs on one device (tensor and pipeline parallel size 1)")
    layers = list(model.layers)
    plan.check_shape(len(layers), layers[0].self_attn.attn.num_kv_heads)
    forward_context = vllm_config.compilation_config.static_forward_context
    full_heads = plan.num_heads - plan.num_compressed
    per_group = group_layout(full_heads, plan.num_compressed, vllm_config.model_config.max_model_len, vllm_config.cache_config.block_size)
    seen = 0
    for layer, full in zip(layers, plan.full):
        tags = []
        for keeps_all in full:  # full heads in order, `per_group` to a tag (None: all one tag, vLLM's own grouping)
            tags.append(seen // per_group if keeps_all and per_group else 0)
            seen += keeps_all
        stock = layer.self_attn.attn
        forward_context.pop(stock.layer_name)
        layer.self_attn.attn = HeadSplitAttention(stock, full, plan, vllm_config.cache_config, tags)
    return plan


class HeadwiseModel:
    """Mixed in before a stock vLLM model class: builds it, then gives its layers one attention sub-layer per KV head
    (a head plan, `kvrl_plan`) or the gated attention of RLKV's rollouts (`kvrl_gated`, `gated.py`)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if getattr(vllm_config.model_config.hf_config, GATED_KEY, None) is not None:
            self.kvrl_plan, self.kvrl_gated = None, gate_attention(self.model, vllm_config)
        else:
            self.kvrl_plan, self.kvrl_gated = split_attention(self.model, vllm_config), None

    def kvrl_set_gates(self, gates: torch.Tensor) -> float:
        """The learner's gates, `[layers, kv_heads]`, into a gated engine's layers (`GatedRollouts.set_gates`)."""
        if self.kvrl_gated is None:
            raise ValueError("this engine runs a head plan, not gated attention: it has no gates")
        return set_model_gates(self, gates)


class KvrlLlamaForCausalLM(HeadwiseModel, LlamaForCausalLM):
    pass


class KvrlMistralForCausalLM(HeadwiseModel, MistralForCausalLM):
    pass


class KvrlQwen2ForCausalLM(HeadwiseModel, Qwen2ForCausalLM):
    pass


class KvrlQwen3ForCausalLM(HeadwiseModel, Qwen3ForCausalLM):
    pass
