"""`HeadwiseCache`: per layer, full-cache KV heads and compressed KV heads in separate tensors.

Compressed heads hold at most their budget of tokens (plus a policy's slack), so the memory is
really freed, unlike masking a full-length cache. Slots stay in chronological order, so "sink" and
"recent" are slot positions; attention over a set of keys does not depend on their order.

The protocol, all of it owned by `HeadwiseLayer`:

1. `update(keys, values)` (called by the model's attention module, as for any transformers cache)
   appends the new tokens to both groups and returns a `LayerView` in place of key/value tensors;
   the new slots count as real tokens and get empty policy statistics.
2. The attention function (`attention.headwise_attention`) attends the full heads over `layer.keys`
   and hands the compressed heads' queries to `layer.attend_compressed`, which
   - on a prefill (several new tokens): reads the padding flags of the new tokens from the model's
     attention mask, attends with that mask (the whole history: the paper evaluates with a full
     prefill), lets the policy observe the last `policy.observed_queries()` queries if it ranks by
     attention, and cuts each head to its budget;
   - on a decoding step (one new token): attends over the held slots and the new one (budget + 1:
     16 + 64 + 1 for RLKV's streaming heads, as the official patch does), lets the policy observe
     those probabilities, and trims the head back to its budget, the new token included (or only
     once it holds budget + `policy.slack()`, R-KV's buffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from kvpress_rl.models import ModelShape
from kvpress_rl.policies import TokenPolicy

_OBSERVE_CHUNK = 256  # query rows per chunk when a policy observes the attention of a long prefill

if TYPE_CHECKING:
    from kvpress_rl.plan import CompressionPlan


def query_heads_of(kv_heads: torch.Tensor, groups: int) -> torch.Tensor:
    """Query-head indices of the given KV heads under grouped-query attention, in head order."""
    return (kv_heads[:, None] * groups + torch.arange(groups)).flatten()


@dataclass
class LayerView:
    """What `HeadwiseLayer.update` hands to the attention function in place of key/value tensors."""

    layer: HeadwiseLayer
    query_length: int

    @property
    def shape(self) -> torch.Size:  # some code paths only look at the shape
        return torch.Size((self.layer.batch_size, self.layer.num_kv_heads, self.layer.seen, self.layer.head_dim))


class HeadwiseLayer(CacheLayerMixin):
    """One decoder layer's cache under a plan."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, full_heads: torch.Tensor, compressed_heads: torch.Tensor, policy: TokenPolicy, groups: int) -> None:
        super().__init__()
        self.full_heads = full_heads
        self.compressed_heads = compressed_heads
        self.full_query_heads = query_heads_of(full_heads, groups)
        self.compressed_query_heads = query_heads_of(compressed_heads, groups)
        self.policy = policy
        self.groups = groups
        self.num_kv_heads = len(full_heads) + len(compressed_heads)
        self.seen = 0
        self.all_valid = True
        self.batch_size = 0
        self.head_dim = 0
        # full heads: self.keys / self.values (transformers' names); compressed heads below
        self.compressed_keys: torch.Tensor | None = None
        self.compressed_values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # (batch, compressed_heads, slots) bool: False = padding
        self.stats: dict[str, torch.Tensor] = {}

    @property
    def has_full(self) -> bool:
        return len(self.full_heads) > 0

    @property
    def has_compressed(self) -> bool:
        return len(self.compressed_heads) > 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, _, _, self.head_dim = key_states.shape
        self.full_heads = self.full_heads.to(self.device)
        self.compressed_heads = self.compressed_heads.to(self.device)
        self.full_query_heads = self.full_query_heads.to(self.device)
        self.compressed_query_heads = self.compressed_query_heads.to(self.device)
        self.keys = key_states.new_empty((self.batch_size, len(self.full_heads), 0, self.head_dim))
        self.values = value_states.new_empty(self.keys.shape)
        self.compressed_keys = key_states.new_empty((self.batch_size, len(self.compressed_heads), 0, self.head_dim))
        self.compressed_values = value_states.new_empty(self.compressed_keys.shape)
        self.valid = torch.ones((self.batch_size, len(self.compressed_heads), 0), dtype=torch.bool, device=self.device)
        self.stats = self.policy.new_stats(self.compressed_keys)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[LayerView, LayerView]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[2]
        if self.has_full:
            self.keys = torch.cat([self.keys, key_states.index_select(1, self.full_heads)], dim=2)
            self.values = torch.cat([self.values, value_states.index_select(1, self.full_heads)], dim=2)
        if self.has_compressed:
            new_keys = key_states.index_select(1, self.compressed_heads)
            self.compressed_keys = torch.cat([self.compressed_keys, new_keys], dim=2)
            self.compressed_values = torch.cat([self.compressed_values, value_states.index_select(1, self.compressed_heads)], dim=2)
            # New tokens count as real until the attention function reads the padding mask (prefill).
            self.valid = torch.cat([self.valid, self.valid.new_ones(new_keys.shape[:3])], dim=2)
            # New slots have no statistics yet: zeros along the slot dimension (always last).
            self.stats = {name: torch.nn.functional.pad(stat, (0, new_tokens)) for name, stat in self.stats.items()}
        self.seen += new_tokens
        view = LayerView(self, new_tokens)  # eviction follows in `attend_compressed`, after the new queries attended
        return view, view

    def attend_compressed(self, module, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                          dropout: float = 0.0, **kwargs) -> torch.Tensor:
        """Attention of the compressed heads' queries `(batch, heads, q_len, head_dim)` over their slots, then
        eviction (see the module docstring). Returns `(batch, q_len, heads, head_dim)`."""
        q_len = query.shape[2]
        if q_len == 1:
            return self._decode_step(query, scaling)
        if attention_mask is not None:
            self.mark_padding(attention_mask[:, 0, -1, -q_len:])
        old = self.compressed_keys.shape[2] - q_len
        if old == 0:
            mask = attention_mask  # a fresh prefill: the model's own causal + padding mask
        else:  # a prefill continuing a compressed history: kept slots, then causal over the new tokens
            new_part = attention_mask[..., -q_len:] if attention_mask is not None else torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
            kept = self.valid[:, :, None, :old].expand(-1, -1, q_len, -1)
            mask = torch.cat([kept, new_part.expand(kept.shape[0], kept.shape[1], -1, -1)], dim=-1)
            mask = mask.repeat_interleave(self.groups, dim=1)
        out, _ = sdpa_attention_forward(module, query, self.compressed_keys, self.compressed_values, mask, dropout=dropout, scaling=scaling, **kwargs)
        if self.policy.needs_attention:
            self._observe_prefill(query, mask, scaling)
        self.compress()
        return out

    def _decode_step(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        keys = repeat_kv(self.compressed_keys, self.groups)
        values = repeat_kv(self.compressed_values, self.groups)
        mask = None if self.all_valid else self.valid.repeat_interleave(self.groups, dim=1)[:, :, None, :]
        if not self.policy.needs_attention:
            out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
        else:
            logits = (query @ keys.transpose(-1, -2)).float() * scaling
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            probs = logits.softmax(dim=-1)
            self.policy.observe(self.stats, self._sum_groups(probs))  # over the slots attended
            out = probs.to(values.dtype) @ values
        self.compress(slack=self.policy.slack())
        return out.transpose(1, 2)

    def _observe_prefill(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> None:
        """Feed the policy the attention probabilities of the prefill queries it observes, in chunks of rows."""
        q_len = query.shape[2]
        window = self.policy.observed_queries()
        first = 0 if window is None else max(0, q_len - window)
        keys = repeat_kv(self.compressed_keys, self.groups)
        offset = keys.shape[2] - q_len
        for start in range(first, q_len, _OBSERVE_CHUNK):
            stop = min(q_len, start + _OBSERVE_CHUNK)
            logits = (query[:, :, start:stop] @ keys.transpose(-1, -2)).float() * scaling
            if mask is not None:
                logits = logits.masked_fill(~mask[:, :, start:stop], float("-inf"))
            else:
                rows = torch.arange(start, stop, device=query.device)[:, None] + offset
                logits = logits.masked_fill(torch.arange(keys.shape[2], device=query.device)[None, :] > rows, float("-inf"))
            self.policy.observe(self.stats, self._sum_groups(logits.softmax(dim=-1).nan_to_num(0.0)))

    def _sum_groups(self, probs: torch.Tensor) -> torch.Tensor:
        """`(batch, kv_heads * groups, q, slots)` -> `(batch, kv_heads, q, slots)`: a KV head's query heads summed."""
        batch, heads, q_len, slots = probs.shape
        return probs.reshape(batch, heads // self.groups, self.groups, q_len, slots).sum(dim=2)

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the newest tokens are padding; `new_valid` is `(batch, new_tokens)` bool."""
        if not self.has_compressed:
            return
        count = new_valid.shape[1]
        self.valid[:, :, -count:] = new_valid[:, None, :]
        self.all_valid = self.all_valid and bool(new_valid.all())

    def compress(self, slack: int = 0) -> None:
        """Keep the `budget` best slots of each compressed head once it holds more than its budget and
        at least budget + slack (R-KV's buffer: compression fires when the head reaches budget + buffer)."""
        if not self.has_compressed:
            return
        budget = self.policy.budget(self.seen)
        slots = self.compressed_keys.shape[2]
        if slots <= budget or slots < budget + slack:
            return
        scores = self.policy.keep_scores(self.compressed_keys, self.valid, self.stats)
        keep = scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values  # (batch, heads, budget)
        gather_kv = keep[..., None].expand(-1, -1, -1, self.head_dim)
        self.compressed_keys = self.compressed_keys.gather(2, gather_kv)
        self.compressed_values = self.compressed_values.gather(2, gather_kv)
        self.valid = self.valid.gather(2, keep)
        for name, stat in self.stats.items():
            index = keep.reshape(keep.shape[:2] + (1,) * (stat.ndim - 3) + keep.shape[2:]).expand(stat.shape[:-1] + (budget,))
            self.stats[name] = stat.gather(-1, index)

    # --- transformers' Cache protocol ---------------------------------------------------------
    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.3 passes the cache positions
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # abstract in transformers < 5.3 (benchmarks/kvpress_crosscheck.py)
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.all_valid = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[indices], self.values[indices]
        self.compressed_keys, self.compressed_values = self.compressed_keys[indices], self.compressed_values[indices]
        self.valid = self.valid[indices]
        self.stats = {name: stat[indices] for name, stat in self.stats.items()}
        self.batch_size = self.keys.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        tensors = [self.keys, self.values, self.compressed_keys, self.compressed_values, self.valid, *self.stats.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        tensors = [self.keys, self.values, self.compressed_keys, self.compressed_values]
        return sum(t.numel() * t.element_size() for t in tensors)


class HeadwiseCache(Cache):
    """A `transformers` cache that runs a `CompressionPlan`: one `HeadwiseLayer` per decoder layer."""

    def __init__(self, plan: CompressionPlan, config) -> None:
        shape = ModelShape.from_config(config)
        plan.check_shape(shape)
        heads = torch.arange(shape.num_kv_heads)
        layers = [
            HeadwiseLayer(heads[plan.full[i]], heads[~plan.full[i]], plan.policy, shape.num_groups)
            for i in range(shape.num_layers)
        ]
        super().__init__(layers=layers)
        self.plan = plan

    def nbytes(self) -> int:
        """Bytes every tensor of the cache holds now: keys, values, padding flags, policy statistics."""
        return sum(layer.nbytes() for layer in self.layers)

    def kv_nbytes(self) -> int:
        """Bytes of keys and values alone: what `CompressionPlan.kv_bytes` predicts."""
        return sum(layer.kv_nbytes() for layer in self.layers)
