"""The gated model in vLLM, for RLKV's rollouts: every head keeps its whole cache and outputs
`alpha * full + (1 - alpha) * streaming`, the learner's gated attention (`kvpress_rl.executor.gated`).

Each decoder layer's attention becomes one `GatedAttention` (all its KV heads, vLLM's full-attention cache) whose
backend, `KVRL_GATED`, is plain torch (CPU and GPU): the builder maps each request's cached positions to slots once per
step; a prompt (or chunk) runs the two branches as two SDPA calls, as the learner's teacher-forced forward, the
streaming one under `streaming_mask` (token-exact sink + window, or the official blocks); decoding steps are batched
and read every key once (`mixed_decode`: one score product, two masked softmaxes, one product with the values).
Positions are the request's own (vLLM has no padding), which is what the learner's rank-based masks count.

The gates are a float32 `[kv_heads]` buffer of each layer, replaced in place after every learner step through
`collective_rpc` (`GatedRollouts.set_gates`): the engine is never restarted. `GatedRollouts` is what
`kvrl select --rollout-engine vllm` gives RLKV: prompts as token ids in, rollouts in the learner's tensor layout out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata

from kvpress_rl.engines.vllm.backend import RequestSpan, TorchAttentionImpl, TorchBackend, split_requests
from kvpress_rl.engines.vllm.layout import GATED_KEY, GatedBranch
from kvpress_rl.executor.gated import mixed_decode, streaming_mask

BACKEND_NAME = "KVRL_GATED"


@dataclass
class GatedMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    prefills: list[RequestSpan]  # requests with more than one query token this step; history: every cached position
    decode_tokens: torch.Tensor  # token index of each one-token request, [R]
    decode_history: torch.Tensor  # cache slots of every cached position, left-padded, [R, K] (padding: slot 0, masked)
    decode_valid: torch.Tensor  # [R, K + 1]: real keys (the last: the new token), left-padded as the learner's rows
    decode_stream: torch.Tensor  # [R, 1, 1, K + 1]: the keys the streaming branch sees (`streaming_mask`), once per step


class GatedMetadataBuilder(AttentionMetadataBuilder[GatedMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.branch = GatedBranch.from_json(getattr(vllm_config.model_config.hf_config, GATED_KEY, None))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> GatedMetadata:
        meta = common_attn_metadata
        prefills, decode_tokens, decode_rows = split_requests(meta, self.block_size, self.device, torch.arange)  # every cached position
        width = max((len(s) for s in decode_rows), default=0)
        history = torch.zeros((len(decode_rows), width), dtype=torch.long)
        valid = torch.zeros((len(decode_rows), width + 1), dtype=torch.bool)
        valid[:, width] = True
        for i, slots in enumerate(decode_rows):
            if len(slots):
                history[i, width - len(slots):] = slots
                valid[i, width - len(slots): width] = True
        valid = valid.to(self.device)
        b = self.branch
        stream = streaming_mask(valid[:, None, None, :], 1, width + 1, b.sink, b.window, self.device, mode=b.mask, block_size=b.block_size)
        return GatedMetadata(num_actual_tokens=meta.num_actual_tokens, slot_mapping=meta.slot_mapping, prefills=prefills,
                             decode_tokens=torch.tensor(decode_tokens, dtype=torch.long, device=self.device),
                             decode_history=history.to(self.device), decode_valid=valid, decode_stream=stream)


class GatedImpl(TorchAttentionImpl):
    """Reads its settings (`branch`) and gates from the layer it is called with (`GatedAttention`)."""

    label = "kvpress-rl gated"

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        slots = slot_mapping.long()
        count = slots.shape[0]
        entries = torch.cat([key[:count], value[:count]], dim=-1).to(kv_cache.dtype)  # [T, kv_heads, 2 D]
        written = slots >= 0  # padding tokens have no slot
        slots, entries = slots[written], entries[written]
        block_size = kv_cache.shape[2]  # kv_cache: [blocks, kv_heads, block size, 2 D]
        kv_cache[slots // block_size, :, slots % block_size] = entries

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantisation is not supported by the kvpress-rl gated backend")
        if attn_metadata is None:  # vLLM's warm-up and profiling runs
            return output
        branch: GatedBranch = layer.branch
        gates = layer.gates.clamp(0.0, 1.0)
        groups = self.num_heads // self.num_kv_heads
        block_size, dim = kv_cache.shape[2], self.head_size

        by_slot = kv_cache.transpose(1, 2)  # [blocks, block size, kv_heads, 2 D]: one row per slot when the layout allows
        flat = by_slot.reshape(-1, *by_slot.shape[2:]) if by_slot.is_contiguous() else None

        def read(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if flat is not None:
                entries = flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat.shape[1:])
            else:
                entries = kv_cache[slots // block_size, :, slots % block_size]  # [..., kv_heads, 2 D]
            return entries[..., :dim], entries[..., dim:]

        def stream_mask(valid: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor:
            return streaming_mask(valid, q_len, kv_len, branch.sink, branch.window, query.device, mode=branch.mask,
                                  block_size=branch.block_size)

        alpha = gates.repeat_interleave(groups).to(query.dtype)[:, None, None]  # per query head: [heads, 1, 1]
        for span in attn_metadata.prefills:
            n, h = span.end - span.start, span.history.shape[0]
            q = query[span.start : span.end].transpose(0, 1)[None]  # [1, heads, n, D]
            keys, values = key[span.start : span.end], value[span.start : span.end]  # [n, kv_heads, D]
            if h:
                old_k, old_v = read(span.history)
                keys, values = torch.cat([old_k.to(q.dtype), keys]), torch.cat([old_v.to(q.dtype), values])
            keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, kv_heads, h + n, D]
            causal = torch.ones((n, h + n), dtype=torch.bool, device=q.device).tril(diagonal=h)
            full = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, scale=self.scale, enable_gqa=True)
            stream = F.scaled_dot_product_attention(q, keys, values, attn_mask=stream_mask(None, n, h + n), scale=self.scale,
                                                    enable_gqa=True)
            mixed = alpha * full[0] + (1.0 - alpha) * stream[0]  # [heads, n, D]
            output[span.start : span.end] = mixed.transpose(0, 1).to(output.dtype)
        tokens = attn_metadata.decode_tokens
        if tokens.numel():
            valid = attn_metadata.decode_valid  # [R, K + 1]
            old_k, old_v = read(attn_metadata.decode_history)  # [R, K, kv_heads, D]
            padding = ~valid[:, :-1, None, None]  # padding reads block 0: never trust its bytes (a NaN would survive a 0 weight)
            old_k, old_v = old_k.masked_fill(padding, 0.0), old_v.masked_fill(padding, 0.0)
            keys = torch.cat([old_k.to(query.dtype), key[tokens, None]], dim=1).transpose(1, 2)  # [R, kv_heads, K + 1, D]
            values = torch.cat([old_v.to(query.dtype), value[tokens, None]], dim=1).transpose(1, 2)
            mask = valid[:, None, None, :]
            q = query[tokens].unsqueeze(2)  # [R, heads, 1, D]
            out = mixed_decode(q, keys, values, mask, attn_metadata.decode_stream, gates, self.scale)
            output[tokens] = out[:, 0].to(output.dtype)
        return output


class GatedBackend(TorchBackend):
    name, impl, builder = BACKEND_NAME, GatedImpl, GatedMetadataBuilder


class GatedAttention(Attention):
    """One layer's attention under gates: vLLM's attention layer (full cache, all KV heads) with the gated backend, the
    streaming branch's settings and its gates (float32, `[kv_heads]`, 1.0 until the learner sends its own)."""

    def __init__(self, *args, branch: GatedBranch, **kwargs) -> None:
        super().__init__(*args, attn_backend=GatedBackend, **kwargs)
        self.branch = branch
        self.register_buffer("gates", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)


def gate_attention(model: nn.Module, vllm_config) -> GatedBranch:
    """Give every decoder layer of `model` (the inner `...Model`) a `GatedAttention` in place of its stock one."""
    hf_config = vllm_config.model_config.hf_config
    branch = GatedBranch.from_json(getattr(hf_config, GATED_KEY, None))
    if vllm_config.parallel_config.tensor_parallel_size != 1 or vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise ValueError("the kvpress-rl gated engine runs on one device (tensor and pipeline parallel size 1)")
    forward_context = vllm_config.compilation_config.static_forward_context
    for layer in model.layers:
        stock = layer.self_attn.attn
        if stock.sliding_window is not None or stock.has_sink or stock.kv_sharing_target_layer_name is not None:
            raise ValueError(f"{stock.layer_name}: the kvpress-rl gated engine runs plain causal attention layers")
        forward_context.pop(stock.layer_name)
        layer.self_attn.attn = GatedAttention(stock.num_heads, stock.head_size, stock.impl.scale, num_kv_heads=stock.num_kv_heads,
                                              cache_config=vllm_config.cache_config, prefix=stock.layer_name, branch=branch)
    return branch


def set_model_gates(model: nn.Module, gates: torch.Tensor) -> float:
    """Copy `gates` (`[layers, kv_heads]`) into the layers' buffers; returns their sum as the engine now holds them."""
    layers = list(model.model.layers)
    if tuple(gates.shape) != (len(layers), layers[0].self_attn.attn.num_kv_heads):
        raise ValueError(f"gates of shape {tuple(gates.shape)} for a model of {len(layers)} layers x "
                         f"{layers[0].self_attn.attn.num_kv_heads} KV heads")
    for layer, row in zip(layers, gates):
        layer.self_attn.attn.gates.copy_(row)
    return float(sum(layer.self_attn.attn.gates.double().sum() for layer in layers))
