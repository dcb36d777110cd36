"""The executor's attention function, registered through transformers' `AttentionInterface`.

Each head group attends over its own cache: full heads over the whole history, compressed heads
over the slots their policy kept. Under GQA every query head follows its KV head; outputs return
in head order. A prefill attends fully for every head (as the RLKV paper evaluates), then the
compressed heads are cut to their budget. A decoding step appends the new token first, attends
over the held slots and the new one (16 + 64 + 1 for RLKV's streaming heads, as the official
patch does), lets attention policies observe those probabilities, and only then trims the head.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvpress_rl.executor.cache import HeadwiseLayer, LayerView

ATTENTION_NAME = "kvrl_headwise"
_OBSERVE_CHUNK = 256  # query rows per chunk when a policy needs attention probabilities of a long prefill


def register() -> str:
    """Make `ATTENTION_NAME` known to transformers (idempotent; called when the executor is installed)."""
    AttentionInterface.register(ATTENTION_NAME, headwise_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def headwise_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Returns `(output (batch, q_len, query_heads, head_dim), None)` like transformers' SDPA."""
    if not isinstance(key, LayerView):  # no cache (e.g. use_cache=False): a prefill, so full attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = key.layer
    batch, _, q_len, head_dim = query.shape
    scaling = scaling if scaling is not None else head_dim**-0.5
    output = query.new_empty((batch, q_len, query.shape[1], head_dim))
    if layer.has_full:
        full_query = query.index_select(1, layer.full_query_heads)
        full_out, _ = sdpa_attention_forward(module, full_query, layer.keys, layer.values, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        output.index_copy_(2, layer.full_query_heads, full_out)
    if layer.has_compressed:
        compressed_query = query.index_select(1, layer.compressed_query_heads)
        compressed_out = _compressed_attention(module, layer, compressed_query, attention_mask, scaling, dropout, **kwargs)
        output.index_copy_(2, layer.compressed_query_heads, compressed_out)
    return output, None


def _compressed_attention(module, layer: HeadwiseLayer, query, attention_mask, scaling, dropout, **kwargs):
    q_len = query.shape[2]
    if q_len == 1:
        return _decode_step(module, layer, query, scaling)
    if attention_mask is not None:
        layer.mark_padding(attention_mask[:, 0, -1, -q_len:])
    old = layer.compressed_keys.shape[2] - q_len
    if old == 0:
        mask = attention_mask  # a fresh prefill: the model's own causal + padding mask
    else:  # a prefill continuing a compressed history: kept slots, then causal over the new tokens
        new_part = attention_mask[..., -q_len:] if attention_mask is not None else torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
        kept = layer.valid[:, :, None, :old].expand(-1, -1, q_len, -1)
        mask = torch.cat([kept, new_part.expand(kept.shape[0], kept.shape[1], -1, -1)], dim=-1)
        mask = mask.repeat_interleave(layer.groups, dim=1)
    out, _ = sdpa_attention_forward(module, query, layer.compressed_keys, layer.compressed_values, mask, dropout=dropout, scaling=scaling, **kwargs)
    if layer.policy.needs_attention:
        _observe_prefill(layer, query, mask, scaling)
    layer.compress()
    return out


def _decode_step(module, layer: HeadwiseLayer, query, scaling):
    """One new query per sequence over the kept slots and itself (budget + 1, or more under a
    policy's slack), then the head is trimmed back to its budget, the new token included."""
    keys = repeat_kv(layer.compressed_keys, layer.groups)
    values = repeat_kv(layer.compressed_values, layer.groups)
    mask = None if layer.all_valid else layer.valid.repeat_interleave(layer.groups, dim=1)[:, :, None, :]
    if not layer.policy.needs_attention:
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    else:
        logits = (query @ keys.transpose(-1, -2)).float() * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        layer.policy.observe(layer.stats, _sum_groups(probs, layer.groups))  # over the slots attended
        out = probs.to(values.dtype) @ values
    layer.compress(slack=layer.policy.slack())
    return out.transpose(1, 2)


def _observe_prefill(layer: HeadwiseLayer, query, mask, scaling) -> None:
    """Feed the policy the attention probabilities of the prefill queries it observes."""
    q_len = query.shape[2]
    window = getattr(layer.policy, "window", None)
    first = 0 if window is None else max(0, q_len - window)
    keys = repeat_kv(layer.compressed_keys, layer.groups)
    offset = keys.shape[2] - q_len
    for start in range(first, q_len, _OBSERVE_CHUNK):
        stop = min(q_len, start + _OBSERVE_CHUNK)
        logits = (query[:, :, start:stop] @ keys.transpose(-1, -2)).float() * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask[:, :, start:stop], float("-inf"))
        else:
            rows = torch.arange(start, stop, device=query.device)[:, None] + offset
            logits = logits.masked_fill(torch.arange(keys.shape[2], device=query.device)[None, :] > rows, float("-inf"))
        probs = logits.softmax(dim=-1).nan_to_num(0.0)
        layer.policy.observe(layer.stats, _sum_groups(probs, layer.groups))


def _sum_groups(probs: torch.Tensor, groups: int) -> torch.Tensor:
    """`(batch, kv_heads * groups, q, slots)` -> `(batch, kv_heads, q, slots)`."""
    batch, heads, q_len, slots = probs.shape
    return probs.reshape(batch, heads // groups, groups, q_len, slots).sum(dim=2)
