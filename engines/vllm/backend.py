"""The attention of a compressed head in vLLM: exact attention over the kept tokens, in plain torch (CPU and GPU).

The layer has one KV head and its `G` query heads. Its cache is its own: a block is `[B slots, key | value]`, written
by `do_kv_cache_update` at vLLM's slot mapping and read only here (the CPU backend's packed layout is never indexed).
Once per step the builder turns each request's kept history (`layout.kept_history`: at most 16 + 64 positions) into
cache slots; it never reads a freed block. A request's query `c + i` then attends to that history and to the step's
own keys `c..c+i`: decoding steps are batched (`[R, G, 1, <= 81]`), prompts and chunks run one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata

from kvpress_rl.engines.vllm.layout import kept_history

BACKEND_NAME = "KVRL_SINK_WINDOW"


@dataclass
class RequestSpan:
    start: int  # first token of the request in the step
    end: int
    history: torch.Tensor  # cache slots of the kept history, [h]


@dataclass
class SinkWindowMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    prefills: list[RequestSpan]  # requests with more than one query token this step
    decode_tokens: torch.Tensor  # token index of each one-token request, [R]
    decode_history: torch.Tensor  # cache slots, [R, K] (padding: 0, masked)
    decode_mask: torch.Tensor  # [R, K + 1]: True where a key is attended (the last: the new token)
    decode_padded: bool  # some request keeps fewer than K tokens (short so far)


def split_requests(meta: CommonAttentionMetadata, block_size: int, device, history: Callable[[int], torch.Tensor]):
    """`(prefills, decode_tokens, decode_rows)` of a step: each request with more than one query token as a `RequestSpan`,
    each one-token request as its token index and the cache slots of its history; `history(computed)` gives the
    positions a request with `computed` cached tokens attends to."""
    starts = meta.query_start_loc_cpu[: meta.num_reqs + 1].tolist()
    seq_lens = meta.seq_lens[: meta.num_reqs].cpu().tolist()
    tables = meta.block_table_tensor[: meta.num_reqs].cpu()
    prefills, decode_tokens, decode_rows = [], [], []
    for r in range(meta.num_reqs):
        start, end = starts[r], starts[r + 1]
        if end == start:
            continue
        positions = history(seq_lens[r] - (end - start))
        slots = tables[r, positions // block_size].long() * block_size + positions % block_size
        if end - start == 1:
            decode_tokens.append(start)
            decode_rows.append(slots)
        else:
            prefills.append(RequestSpan(start, end, slots.to(device)))
    return prefills, decode_tokens, decode_rows


class SinkWindowMetadataBuilder(AttentionMetadataBuilder[SinkWindowMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.sink = kv_cache_spec.sink
        self.window = kv_cache_spec.window

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> SinkWindowMetadata:
        meta = common_attn_metadata
        budget = self.sink + self.window
        prefills, decode_tokens, decode_rows = split_requests(
            meta, self.block_size, self.device, lambda computed: torch.tensor(kept_history(computed, self.sink, self.window), dtype=torch.long))
        history = torch.zeros((len(decode_rows), budget), dtype=torch.long)
        mask = torch.zeros((len(decode_rows), budget + 1), dtype=torch.bool)
        mask[:, budget] = True
        for i, slots in enumerate(decode_rows):
            history[i, : len(slots)] = slots
            mask[i, : len(slots)] = True
        return SinkWindowMetadata(num_actual_tokens=meta.num_actual_tokens, slot_mapping=meta.slot_mapping, prefills=prefills,
                                  decode_tokens=torch.tensor(decode_tokens, dtype=torch.long, device=self.device),
                                  decode_history=history.to(self.device), decode_mask=mask.to(self.device),
                                  decode_padded=not bool(mask.all()))


class TorchAttentionImpl(AttentionImpl):
    """What kvpress-rl's plain-torch backends accept (`label`: the backend's name in errors; `one_kv_head`: a layer of
    one KV head only): plain causal decoder attention over an unquantised, unshared cache."""

    label = "kvpress-rl"
    one_kv_head = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype: str = "auto", logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **unsupported) -> None:
        if self.one_kv_head and (num_kv_heads or num_heads) != 1:
            raise ValueError(f"the {self.label} backend runs one KV head")
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap or unsupported:
            raise ValueError(f"the {self.label} backend runs attention without alibi, sliding window, soft cap or sinks")
        if kv_cache_dtype != "auto" or attn_type != AttentionType.DECODER or kv_sharing_target_layer_name is not None:
            raise ValueError(f"the {self.label} backend runs decoder attention with an unquantised, unshared cache")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None


class TorchBackend(AttentionBackend):
    """vLLM's backend interface for a plain-torch attention: a subclass names itself, its impl and its builder."""

    forward_includes_kv_cache_update = False
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]
    name = ""
    impl: type = TorchAttentionImpl
    builder: type = AttentionMetadataBuilder

    @classmethod
    def get_name(cls) -> str:
        return cls.name

    @classmethod
    def get_impl_cls(cls):
        return cls.impl

    @classmethod
    def get_builder_cls(cls):
        return cls.builder


class SinkWindowImpl(TorchAttentionImpl):
    label = "kvpress-rl compressed-head"
    one_kv_head = True

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        slots = slot_mapping.long()
        count = slots.shape[0]
        entries = torch.cat([key[:count, 0], value[:count, 0]], dim=-1).to(kv_cache.dtype)
        if bool((slots < 0).any()):  # padding tokens have no slot
            written = slots >= 0
            slots, entries = slots[written], entries[written]
        pages = kv_cache[:, 0]  # [blocks, B, 2 * D]
        if pages.is_contiguous():
            pages.view(-1, pages.shape[-1]).index_copy_(0, slots, entries)
        else:
            pages[slots // pages.shape[1], slots % pages.shape[1]] = entries

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantisation is not supported by the kvpress-rl compressed-head backend")
        if attn_metadata is None:  # vLLM's warm-up and profiling runs
            return output
        pages = kv_cache[:, 0]
        block_size, dim = pages.shape[1], self.head_size
        flat = pages.reshape(-1, pages.shape[-1]) if pages.is_contiguous() else None

        def read(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            entries = flat[slots] if flat is not None else pages[slots // block_size, slots % block_size]
            return entries[..., :dim], entries[..., dim:]

        for span in attn_metadata.prefills:
            # 4-d inputs with one KV head and `enable_gqa`: SDPA's fused kernels (an expanded KV head would fall back to math)
            q = query[span.start : span.end].transpose(0, 1)[None]  # [1, G, n, D]
            own_k, own_v = key[span.start : span.end, 0], value[span.start : span.end, 0]
            if not span.history.numel():  # a prompt in one step: plain causal attention
                out = F.scaled_dot_product_attention(q, own_k[None, None], own_v[None, None], is_causal=True, scale=self.scale, enable_gqa=True)
                output[span.start : span.end] = out[0].transpose(0, 1).to(output.dtype)
                continue
            old_k, old_v = read(span.history)
            keys = torch.cat([old_k.to(q.dtype), own_k], dim=0)[None, None]
            values = torch.cat([old_v.to(q.dtype), own_v], dim=0)[None, None]
            n, h = span.end - span.start, span.history.shape[0]
            mask = torch.ones((n, h + n), dtype=torch.bool, device=q.device)
            mask[:, h:] = torch.ones((n, n), dtype=torch.bool, device=q.device).tril()
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
            output[span.start : span.end] = out[0].transpose(0, 1).to(output.dtype)
        tokens = attn_metadata.decode_tokens
        if tokens.numel():
            q = query[tokens].unsqueeze(2)  # [R, G, 1, D]
            old_k, old_v = read(attn_metadata.decode_history)  # [R, K, D]
            if attn_metadata.decode_padded:  # padding reads vLLM's null block: never trust its bytes
                padding = ~attn_metadata.decode_mask[:, :-1, None]
                old_k, old_v = old_k.masked_fill(padding, 0.0), old_v.masked_fill(padding, 0.0)
            keys = torch.cat([old_k.to(q.dtype), key[tokens]], dim=1).unsqueeze(1)  # [R, 1, K + 1, D]
            values = torch.cat([old_v.to(q.dtype), value[tokens]], dim=1).unsqueeze(1)
            mask = attn_metadata.decode_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
            output[tokens] = out.squeeze(2).to(output.dtype)
        return output


class SinkWindowBackend(TorchBackend):
    name, impl, builder = BACKEND_NAME, SinkWindowImpl, SinkWindowMetadataBuilder
