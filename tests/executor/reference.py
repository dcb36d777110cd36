"""An independent reference for the executor: full attention over a full-length cache, with an
explicit per-head mask for compressed heads during decoding: the first `sink` real keys, the
`window` keys held before the step and the new one (RLKV's streaming heads attend over 16 + 64 + 1
and trim afterwards)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvpress_rl.models import cache_kwargs, using_attention


def reference_mask(valid: torch.Tensor, compressed: torch.Tensor, sink: int, window: int,
                   full_sink: int | None = None, full_window: int | None = None) -> torch.Tensor:
    """`valid (batch, kv)` real tokens, `compressed (kv_heads,)` bool -> `(batch, kv_heads, kv)` allowed keys
    for the newest query: for a compressed head the first `sink` real keys and the keys among the last
    `window + 1` positions (the held window and the new token); for a full head every real key, or (a hybrid
    plan whose full heads stream) the same rule with `full_sink` and `full_window`."""
    valid = valid.bool()
    kv = valid.shape[1]
    rank = valid.long().cumsum(-1) - 1  # a key's index among the real keys
    position = torch.arange(kv)

    def rule(head_sink: int | None, head_window: int | None) -> torch.Tensor:
        if head_sink is None:
            return valid
        return valid & ((rank < head_sink) | (position >= kv - 1 - head_window))

    compressed_keys, full_keys = rule(sink, window), rule(full_sink, full_window)
    return torch.where(compressed.bool()[None, :, None], compressed_keys[:, None, :], full_keys[:, None, :])


@contextmanager
def masked_reference(model, full: torch.Tensor, sink: int, window: int, full_sink: int | None = None,
                     full_window: int | None = None):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] > 1:  # prefill: full attention for every head, as the paper evaluates
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        kv = key.shape[2]
        if attention_mask is not None:
            valid = attention_mask[:, 0, -1, :]
        else:
            valid = torch.ones(key.shape[0], kv, dtype=torch.bool)
        allowed = reference_mask(valid, ~full[module.layer_idx], sink, window, full_sink, full_window)
        allowed = allowed.repeat_interleave(module.num_key_value_groups, dim=1)[:, :, None, :]
        keys = key.repeat_interleave(module.num_key_value_groups, dim=1)
        values = value.repeat_interleave(module.num_key_value_groups, dim=1)
        logits = (query @ keys.transpose(-1, -2)) * scaling
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ values).transpose(1, 2), None

    AttentionInterface.register("kvrl_test_reference", attention)
    AttentionMaskInterface.register("kvrl_test_reference", sdpa_mask)
    with using_attention(model, "kvrl_test_reference"):
        yield


def left_padded_batch(batch: int, length: int, vocab: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):  # rows get 0, 3, 6, ... padding tokens on the left
        mask[row, : 3 * row] = 0
        ids[row, : 3 * row] = 0
    return ids, mask


def teacher_forced_logits(model, ids, mask, continuation, cache):
    """Prefill `ids`, then feed `continuation` one token per step; logits of every step."""
    position = mask.long().cumsum(-1) - 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=position.clamp_min(0), **cache_kwargs(model, cache),
                use_cache=True)
    logits = [out.logits[:, -1]]
    for step in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position[:, -1:] + 1
        out = model(input_ids=continuation[:, step : step + 1], attention_mask=mask, position_ids=position,
                    **cache_kwargs(model, cache), use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def explicit_streaming_mask(valid: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Loops, not tensor tricks: query i may see key j if j <= i, j is real, and j is one of the first
    `sink` real keys or i - j < window. Padding queries keep their ordinary causal row."""
    batch, length = valid.shape
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        real = [j for j in range(length) if valid[b, j]]
        for i in range(length):
            for j in range(i + 1):
                if valid[b, j] and (real.index(j) < sink or i - j < window):
                    mask[b, 0, i, j] = True
    return mask


def explicit_block_mask(valid: torch.Tensor, sink: int, window: int, block: int) -> torch.Tensor:
    """Loops: with real positions p (rank among the row's real tokens), query at p_q may see a real key at
    p_k <= p_q if the key's block p_k // block is one of the first ceil(sink / block) blocks, or one of the
    ceil(window / block) blocks that end with the query's own block."""
    batch, length = valid.shape
    sink_blocks, recent_blocks = math.ceil(sink / block), math.ceil(window / block)
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        real = [j for j in range(length) if valid[b, j]]
        for i in real:
            for j in real:
                pq, pk = real.index(i), real.index(j)
                if pk <= pq and (pk // block < sink_blocks or pq // block - pk // block < recent_blocks):
                    mask[b, 0, i, j] = True
    return mask
