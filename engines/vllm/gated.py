"""The gated model in vLLM, for RLKV's rollouts: every head keeps its whole cache and outputs
`alpha * full + (1 - alpha) * streaming`, the learner's gated attention (`kvpress_rl.executor.gated`).

Each decoder layer's attention becomes one `GatedAttention` (all its KV heads, vLLM's full-attention cache;
`models.gate_attention`) whose backend, `KVRL_GATED`, is plain torch (CPU and GPU): the builder maps each request's
cached positions to slots once per step; a prompt (or chunk) runs the two branches as two SDPA calls, as the learner's
teacher-forced forward, the streaming one under `streaming_mask` (token-exact sink + window, or the official blocks);
decoding steps are batched and read every key once (`mixed_decode`: one score product, two masked softmaxes, one
product with the values). Positions are the request's own (vLLM has no padding), which is what the learner's
rank-based masks count. The cache is written and read as rows of `[key | value]` (`paged_rows.PagedRows`).

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
from kvpress_rl.engines.vllm.layout import GATED_KEY
from kvpress_rl.engines.vllm.paged_rows import PagedRows
from kvpress_rl.engines.vllm.plugin import GATED_BACKEND
from kvpress_rl.executor.gated import mix_branches, mixed_decode
from kvpress_rl.masks import history_causal_mask, streaming_mask
from kvpress_rl.sampling import GatedBranch


@dataclass
class GatedMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    prefills: list[RequestSpan]  # requests with more than one query token this step; history: every cached position
    decode_tokens: torch.Tensor  # token index of each one-token request, [R]
    decode_history: torch.Tensor  # cache slots of every cached position, left-padded, [R, K] (padding: slot 0, masked)
    decode_valid: torch.Tensor  # [R, K + 1]: real keys (the last: the new token), left-padded as the learner's rows
    decode_stream: torch.Tensor  # [R, 1, 1, K + 1]: what the streaming branch sees (`streaming_mask`), once per step


class GatedMetadataBuilder(AttentionMetadataBuilder[GatedMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.branch = GatedBranch.from_json(getattr(vllm_config.model_config.hf_config, GATED_KEY, None))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> GatedMetadata:
        meta = common_attn_metadata
        # every cached position is history
        prefills, decode_tokens, decode_rows = split_requests(meta, self.block_size, self.device, torch.arange)
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
        stream = streaming_mask(valid[:, None, None, :], 1, width + 1, b.sink, b.window, self.device, mode=b.mask,
                                block_size=b.block_size)
        return GatedMetadata(num_actual_tokens=meta.num_actual_tokens, slot_mapping=meta.slot_mapping,
                             prefills=prefills,
                             decode_tokens=torch.tensor(decode_tokens, dtype=torch.long, device=self.device),
                             decode_history=history.to(self.device), decode_valid=valid, decode_stream=stream)


class GatedImpl(TorchAttentionImpl):
    """Reads its settings (`branch`) and gates from the layer it is called with (`GatedAttention`)."""

    label = "kvpress-rl gated"
    bound_at = -1  # the cache `kv` views (vLLM binds it once, before the first real step)

    def paged(self, layer, kv_cache: torch.Tensor) -> PagedRows:
        """The layer's cache `[blocks, kv_heads, block size, 2 D]` as rows."""
        if self.bound_at != kv_cache.data_ptr():
            self.kv, self.bound_at = PagedRows.over([kv_cache], layer.layer_name), kv_cache.data_ptr()
        return self.kv

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        slots = slot_mapping.long().clamp_min(0)  # padding tokens (slot -1) write vLLM's null block, never read
        count = slots.shape[0]
        kv = self.paged(layer, kv_cache)
        kv.write(kv.index(slots[None]), key[:count], value[:count])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantisation is not supported by the kvpress-rl gated backend")
        if attn_metadata is None:  # vLLM's warm-up and profiling runs
            return output
        kv, gates = self.paged(layer, kv_cache), layer.gates.clamp(0.0, 1.0)
        for span in attn_metadata.prefills:
            self._prefill(layer.branch, gates, kv, span, query, key, value, output)
        if attn_metadata.decode_tokens.numel():
            self._decode(gates, kv, attn_metadata, query, key, value, output)
        return output

    def _prefill(self, branch: GatedBranch, gates: torch.Tensor, kv: PagedRows, span: RequestSpan, query, key, value,
                 output) -> None:
        """One request's tokens of the step after its cached history: the two branches as two SDPA calls."""
        n, h = span.end - span.start, span.history.shape[0]
        q = query[span.start:span.end].transpose(0, 1)[None]  # [1, heads, n, D]
        keys, values = key[span.start:span.end].transpose(0, 1), value[span.start:span.end].transpose(0, 1)
        if h:
            old_k, old_v = kv.read(kv.index(span.history[None]))  # [kv_heads, h, D]
            keys, values = torch.cat([old_k.to(q.dtype), keys], dim=1), torch.cat([old_v.to(q.dtype), values], dim=1)
        keys, values = keys[None], values[None]  # [1, kv_heads, h + n, D]
        stream_mask = streaming_mask(None, n, h + n, branch.sink, branch.window, q.device, mode=branch.mask,
                                     block_size=branch.block_size)
        full = F.scaled_dot_product_attention(q, keys, values, attn_mask=history_causal_mask(h, n, device=q.device),
                                              scale=self.scale, enable_gqa=True)
        stream = F.scaled_dot_product_attention(q, keys, values, attn_mask=stream_mask, scale=self.scale,
                                                enable_gqa=True)
        mixed = mix_branches(full[0], stream[0], gates, groups=self.num_heads // self.num_kv_heads, axis=-3)
        output[span.start:span.end] = mixed.transpose(0, 1).to(output.dtype)  # [n, heads, D]

    def _decode(self, gates: torch.Tensor, kv: PagedRows, metadata: GatedMetadata, query, key, value, output) -> None:
        """Every one-token request of the step at once, each key read once (`mixed_decode`)."""
        tokens, valid = metadata.decode_tokens, metadata.decode_valid  # valid: [R, K + 1]
        history = kv.read(kv.index(metadata.decode_history[None]))  # [kv_heads, R, K, D]
        old_k, old_v = (t.transpose(0, 1) for t in history)
        # padding reads block 0: never trust its bytes (a NaN would survive a 0 weight)
        padding = ~valid[:, None, :-1, None]
        old_k, old_v = old_k.masked_fill(padding, 0.0), old_v.masked_fill(padding, 0.0)
        keys = torch.cat([old_k.to(query.dtype), key[tokens][:, :, None]], dim=2)  # [R, kv_heads, K + 1, D]
        values = torch.cat([old_v.to(query.dtype), value[tokens][:, :, None]], dim=2)
        q = query[tokens].unsqueeze(2)  # [R, heads, 1, D]
        out = mixed_decode(q, keys, values, valid[:, None, None, :], metadata.decode_stream, gates, self.scale)
        output[tokens] = out[:, 0].to(output.dtype)


class GatedBackend(TorchBackend):
    name, impl, builder = GATED_BACKEND, GatedImpl, GatedMetadataBuilder


class GatedAttention(Attention):
    """One layer's attention under gates: vLLM's attention layer (full cache, all KV heads) with the gated backend, the
    streaming branch's settings and its gates (float32, `[kv_heads]`, 1.0 until the learner sends its own)."""

    def __init__(self, *args, branch: GatedBranch, **kwargs) -> None:
        super().__init__(*args, attn_backend=GatedBackend, **kwargs)
        self.branch = branch
        self.register_buffer("gates", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)


def set_model_gates(model: nn.Module, gates: torch.Tensor) -> float:
    """Copy `gates` (`[layers, kv_heads]`) into the layers' buffers; returns their sum as the engine now holds them."""
    layers = list(model.model.layers)
    kv_heads = layers[0].self_attn.attn.num_kv_heads
    if tuple(gates.shape) != (len(layers), kv_heads):
        raise ValueError(f"gates of shape {tuple(gates.shape)} for a model of {len(layers)} layers x "
                         f"{kv_heads} KV heads")
    for layer, row in zip(layers, gates):
        layer.self_attn.attn.gates.copy_(row)
    return float(sum(layer.self_attn.attn.gates.double().sum() for layer in layers))
