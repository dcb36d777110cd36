"""Gated mixed attention for training head gates (RLKV, DuoAttention).

Per KV head, `alpha * full + (1 - alpha) * streaming`, both from the same queries, keys and values
(after RoPE). The streaming branch sees the first `sink` real keys and the last `window` keys
(causal). `alpha` is a trainable `[layers, kv_heads]` tensor, clamped to [0, 1] in every forward;
the model's own weights are untouched, so gradients reach the gates alone when the model is frozen.
Works in teacher-forced forward passes and inside `generate` (rollouts from the gated model).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvpress_rl.errors import KvrlError
from kvpress_rl.models import ModelShape, check_supported

TRAIN_SINK = 128
TRAIN_WINDOW = 256
_names = itertools.count()


def streaming_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, sink: int, window: int, device) -> torch.Tensor:
    """Bool `(batch or 1, 1, q_len, kv_len)`: causal, not padding, and a sink or within the window."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    if attention_mask is None:
        allowed = (key_pos <= query_pos)[None, None]
        rank = key_pos[None, None]
    else:
        allowed = attention_mask.bool()
        key_valid = allowed[:, :, -1:, :]  # the last query sees every real key
        rank = key_valid.long().cumsum(-1) - 1
    near = (query_pos - key_pos < window)[None, None]
    mask = allowed & ((rank < sink) | near)
    if attention_mask is not None:  # rows that would be empty (padding queries) keep the model's own row
        mask = torch.where(mask.any(-1, keepdim=True), mask, allowed)
    return mask


def mixed_attention(gates: torch.Tensor, sink: int, window: int):
    """The attention function for a given gate tensor."""

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
        full, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        mask = streaming_mask(attention_mask, query.shape[2], key.shape[2], sink, window, query.device)
        stream, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        alpha = gates[module.layer_idx].clamp(0.0, 1.0).repeat_interleave(module.num_key_value_groups)
        alpha = alpha.to(full.dtype)[None, None, :, None]  # output layout: (batch, q_len, heads, head_dim)
        return alpha * full + (1.0 - alpha) * stream, None

    return attention


def new_gates(model, init: float = 1.0) -> torch.nn.Parameter:
    """A trainable `[layers, kv_heads]` gate tensor, initialised to `init` (the paper: 1.0)."""
    shape = ModelShape.from_config(model.config)
    return torch.nn.Parameter(torch.full((shape.num_layers, shape.num_kv_heads), float(init), device=model.device))


@contextmanager
def gated(model, gates: torch.Tensor, *, sink: int = TRAIN_SINK, window: int = TRAIN_WINDOW) -> Iterator[torch.Tensor]:
    """Run `model` with gated mixed attention; restores the model's attention on exit."""
    check_supported(model.config)
    shape = ModelShape.from_config(model.config)
    if tuple(gates.shape) != (shape.num_layers, shape.num_kv_heads):
        raise KvrlError(f"gates have shape {tuple(gates.shape)}, the model needs ({shape.num_layers}, {shape.num_kv_heads})")
    if sink < 0 or window < 1:
        raise KvrlError(f"gated attention needs sink >= 0 and window >= 1, got {sink}, {window}")
    name = f"kvrl_gated_{next(_names)}"
    AttentionInterface.register(name, mixed_attention(gates, sink, window))
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield gates
    finally:
        model.config._attn_implementation = previous
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
