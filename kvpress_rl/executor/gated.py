"""Gated mixed attention for training head gates (RLKV, DuoAttention).

Per KV head, `alpha * full + (1 - alpha) * streaming`, both from the same queries, keys and values
(after RoPE). `alpha` is a trainable `[layers, kv_heads]` tensor, clamped to [0, 1] in every forward;
the model's own weights are untouched, so gradients reach the gates alone when the model is frozen.
Works in teacher-forced forward passes and inside `generate` (rollouts from the gated model).

The streaming branch sees a sink + window of each query's keys, token-exact or in the official
training kernel's blocks (`mask`): `kvpress_rl.masks.streaming_mask`, where both are defined.

How the gates reach the attention function: transformers passes no per-call argument through
`generate` to it, so on entry `gated()` registers the block's `Gating.attention` (a bound method:
the gates travel with it, also into autograd's backward threads when checkpointed layers replay)
under the one name `GATED_ATTENTION`, through the public `AttentionInterface.register`, and sets the
model to it with the public `set_attn_implementation`. On exit the model's attention is set back and
the name points to a function that refuses to run. One `gated()` block at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from kvpress_rl.errors import KvrlError
from kvpress_rl.masks import BLOCK_SIZE, MASKS, TRAIN_SINK, TRAIN_WINDOW, streaming_mask
from kvpress_rl.models import ModelShape, check_supported, using_attention

GATED_ATTENTION = "kvrl_gated"


@dataclass
class Gating:
    """The gates of one `gated()` block, its streaming branch's settings, and its attention function."""

    gates: torch.Tensor
    sink: int
    window: int
    mode: str = "token"
    block_size: int = BLOCK_SIZE
    one_pass_decode: bool = True  # decoding steps through `mixed_decode` (False: the two SDPA calls, for comparison)
    open: bool = True
    # (attention_mask, shape, streaming mask): every layer of a forward shares it
    last_mask: list = field(default_factory=list)

    def streaming_mask_for(self, attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor:
        shape = (q_len, kv_len, device)
        if not (self.last_mask and self.last_mask[0] is attention_mask and self.last_mask[1] == shape):
            mask = streaming_mask(attention_mask, q_len, kv_len, self.sink, self.window, device, mode=self.mode,
                                  block_size=self.block_size)
            self.last_mask[:] = [attention_mask, shape, mask]
        return self.last_mask[2]

    def attention(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
        """`alpha * full + (1 - alpha) * streaming` per KV head."""
        mask = self.streaming_mask_for(attention_mask, query.shape[2], key.shape[2], query.device)
        gates = self.gates[module.layer_idx].clamp(0.0, 1.0)
        scaling_or_default = module.scaling if scaling is None else scaling
        if self.one_pass_decode and query.shape[2] == 1 and not torch.is_grad_enabled():  # a decoding step of a rollout
            return mixed_decode(query, key, value, attention_mask, mask, gates, scaling_or_default), None
        full, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                         **kwargs)
        stream, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        # output layout: (batch, q_len, heads, head_dim)
        return mix_branches(full, stream, gates, groups=module.num_key_value_groups, axis=-2), None


def mix_branches(full: torch.Tensor, streaming: torch.Tensor, gates: torch.Tensor, *, groups: int,
                 axis: int) -> torch.Tensor:
    """`alpha * full + (1 - alpha) * streaming`: the gated attention's two branches mixed per KV head (their outputs,
    or their probabilities). `gates` `[kv_heads]` (clamped by the caller), each repeated over its `groups` query heads
    along `axis` of `full`, counted from the end (-2 for `(batch, q_len, heads, head_dim)`); in `full`'s dtype."""
    alpha = (gates if groups == 1 else gates.repeat_interleave(groups)).to(full.dtype)
    alpha = alpha.view(-1, *(1,) * (-axis - 1))
    return alpha * full + (1.0 - alpha) * streaming


def mixed_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, full_mask: torch.Tensor | None,
                 stream_mask: torch.Tensor, gates: torch.Tensor, scaling: float) -> torch.Tensor:
    """One decoding step of the gated attention, `(batch, 1, heads, head_dim)`, reading every key once.

    Both branches attend with the same query to the same keys and differ only in which keys they may see,
    so `alpha * softmax_full(s) V + (1 - alpha) * softmax_stream(s) V = (alpha * P_full + (1 - alpha) *
    P_stream) V`: one score product, two masked softmaxes over it, one product with the values. The
    streaming branch costs a softmax, not a second pass over the keys (the two-SDPA path reads the cache
    twice). Query heads are grouped by KV head (`h // groups`, as transformers' `repeat_kv`), so keys and
    values are never repeated. Softmaxes in float32, products in the model's dtype.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.view(batch, kv_heads, groups, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # (batch, kv_heads, groups, kv_len)
    # masks arrive as (batch or 1, 1, 1, kv_len): one row for every head
    full = scores if full_mask is None else scores.masked_fill(~full_mask[:, :, 0, None, :], float("-inf"))
    stream = scores.masked_fill(~stream_mask[:, :, 0, None, :], float("-inf"))
    probs = mix_branches(torch.softmax(full, dim=-1), torch.softmax(stream, dim=-1), gates, groups=1, axis=-3)
    out = torch.matmul(probs.to(value.dtype), value)  # (batch, kv_heads, groups, head_dim)
    return out.reshape(batch, 1, heads, dim)


def outside_gated(*args, **kwargs):
    raise KvrlError(f"the {GATED_ATTENTION!r} attention runs only inside kvpress_rl.gated(model, gates)")


def new_gates(model, init: float = 1.0) -> torch.nn.Parameter:
    """A trainable float32 `[layers, kv_heads]` gate tensor, initialised to `init` (the paper: 1.0).

    The gates stay float32 whatever the model's dtype; the mixed output is cast to the model's.
    """
    shape = ModelShape.from_config(model.config)
    size = (shape.num_layers, shape.num_kv_heads)
    return torch.nn.Parameter(torch.full(size, float(init), device=model.device, dtype=torch.float32))


@contextmanager
def gated(model, gates: torch.Tensor, *, sink: int = TRAIN_SINK, window: int = TRAIN_WINDOW, mask: str = "token",
          block_size: int = BLOCK_SIZE, one_pass_decode: bool = True) -> Iterator[torch.Tensor]:
    """Run `model` with gated mixed attention; restores the model's attention on exit.

    `mask`: the streaming branch's mask, `"token"` (exact sink + window) or `"block"` (the official
    training kernel's blocks of `block_size`); see the module docstring. `one_pass_decode`: decoding
    steps without gradients read the keys once (`mixed_decode`); False runs them through the two SDPA
    calls of the teacher-forced path (the same numbers, kept to measure one against the other).
    """
    check_supported(model.config)
    shape = ModelShape.from_config(model.config)
    if tuple(gates.shape) != (shape.num_layers, shape.num_kv_heads):
        raise KvrlError(f"gates have shape {tuple(gates.shape)}, "
                        f"the model needs ({shape.num_layers}, {shape.num_kv_heads})")
    if sink < 0 or window < 1:
        raise KvrlError(f"gated attention needs sink >= 0 and window >= 1, got {sink}, {window}")
    if mask not in MASKS:
        raise KvrlError(f"gated attention mask must be one of {', '.join(MASKS)}, got {mask!r}")
    if block_size < 1:
        raise KvrlError(f"gated attention needs block_size >= 1, got {block_size}")
    current = ALL_ATTENTION_FUNCTIONS.get(GATED_ATTENTION)
    if isinstance(getattr(current, "__self__", None), Gating) and current.__self__.open:
        raise KvrlError("gated() blocks do not nest: one set of gates at a time")
    gating = Gating(gates, sink, window, mask, block_size, one_pass_decode)
    AttentionInterface.register(GATED_ATTENTION, gating.attention)
    AttentionMaskInterface.register(GATED_ATTENTION, sdpa_mask)
    try:
        with using_attention(model, GATED_ATTENTION):
            yield gates
    finally:
        gating.open = False
        AttentionInterface.register(GATED_ATTENTION, outside_gated)
