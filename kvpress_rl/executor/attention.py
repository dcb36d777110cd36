"""The executor's attention function, registered through transformers' `AttentionInterface`.

Each group of heads of the layer's cache (full heads, compressed heads: `HeadGroup`) attends over the
slots it holds and evicts (the protocol is in `cache.py`). Under GQA every query head follows its KV
head; outputs return in head order.
"""

from __future__ import annotations

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.cache import LayerView

ATTENTION_NAME = "kvrl_headwise"


def register() -> str:
    """Make `ATTENTION_NAME` known to transformers (idempotent: the same function under the same name)."""
    AttentionInterface.register(ATTENTION_NAME, headwise_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def headwise_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs):
    """Returns `(output (batch, q_len, query_heads, head_dim), None)` like transformers' SDPA."""
    if not isinstance(key, LayerView):
        if key.shape[2] != query.shape[2]:  # a cache other than ours holds history: it would keep it all
            raise KvrlError("inside compressed(model, plan), generate with session.generate(...) or pass the "
                            "session's cache, session.new_cache() (as `cache=`, or `past_key_values=` on transformers "
                            "5.19); another cache would keep the full history")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = key.layer
    batch, _, q_len, head_dim = query.shape
    scaling = scaling if scaling is not None else head_dim**-0.5
    held = [group for group in layer.head_groups if len(group)]
    if len(held) == 1:  # every head of the layer in one group, in head order: no split, no copy
        return held[0].attend(module, query, attention_mask, scaling, layer.seen, dropout, **kwargs), None
    output = query.new_empty((batch, q_len, query.shape[1], head_dim))
    for group in held:
        if len(group):
            out = group.attend(module, query.index_select(1, group.query_heads), attention_mask, scaling, layer.seen,
                               dropout, **kwargs)
            output.index_copy_(2, group.query_heads, out)
    return output, None
