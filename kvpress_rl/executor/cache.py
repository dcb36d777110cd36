"""`HeadwiseCache`: per layer, the KV heads of each policy in their own tensors.

A layer holds two `HeadGroup`s: the full heads and the compressed heads of the plan. A group with a
token policy holds at most its budget of tokens (plus the policy's slack), so the memory is really
freed, unlike masking a full-length cache; a group without one keeps every token. Full heads under a
policy (a hybrid plan: `plan.full_policy`) are simply a second budgeted group with a larger budget:
one code path. Slots stay in chronological order, so "sink" and "recent" are slot positions;
attention over a set of keys does not depend on their order.

The protocol, all of it owned by the cache:

1. `HeadwiseLayer.update(keys, values)` (called by the model's attention module, as for any
   transformers cache) appends the new tokens to each group and returns a `LayerView` in place of
   key/value tensors; new slots count as real tokens and get empty policy statistics.
2. The attention function (`attention.headwise_attention`) hands each group its query heads:
   `HeadGroup.attend` attends and then evicts.
   - A group without a policy attends over its whole history with the model's own mask.
   - On a prefill (several new tokens) a budgeted group reads the padding flags of the new tokens from
     the model's attention mask, attends with that mask (the whole history: the paper evaluates with a
     full prefill), lets the policy observe the last `policy.observed_queries()` queries if it ranks by
     attention, and cuts each head to its budget.
   - On a decoding step (one new token) a budgeted group attends over the held slots and the new one
     (budget + 1: 16 + 64 + 1 for RLKV's streaming heads, as the official patch does), lets the policy
     observe those probabilities, and trims back to its budget, the new token included (or only once
     it holds budget + `policy.slack()`, R-KV's buffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from kvpress_rl.masks import history_causal_mask
from kvpress_rl.models import ModelShape
from kvpress_rl.policies import TokenPolicy

_OBSERVE_CHUNK = 256  # query rows per chunk when a policy observes the attention of a long prefill

if TYPE_CHECKING:
    from kvpress_rl.plan import CompressionPlan


def query_heads_of(kv_heads: torch.Tensor, groups: int) -> torch.Tensor:
    """Query-head indices of the given KV heads under grouped-query attention, in head order."""
    return (kv_heads[:, None] * groups + torch.arange(groups)).flatten()


class HeadGroup:
    """The KV heads of one layer that share a token policy (None: keep every token): their keys and values
    `(batch, heads, slots, head_dim)`, padding flags `valid (batch, heads, slots)` and policy statistics."""

    def __init__(self, heads: torch.Tensor, policy: TokenPolicy | None, groups: int) -> None:
        self.heads = heads
        self.query_heads = query_heads_of(heads, groups)
        self.policy = policy
        self.groups = groups
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # False = padding (budgeted groups only)
        self.all_valid = True
        self.stats: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.heads)

    def initialize(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        device = key_states.device
        self.heads, self.query_heads = self.heads.to(device), self.query_heads.to(device)
        batch, _, _, head_dim = key_states.shape
        self.keys = key_states.new_empty((batch, len(self.heads), 0, head_dim))
        self.values = value_states.new_empty(self.keys.shape)
        if self.policy is not None:
            self.valid = torch.ones((batch, len(self.heads), 0), dtype=torch.bool, device=device)
            self.stats = self.policy.new_stats(self.keys)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        new_keys = key_states.index_select(1, self.heads)
        self.keys = torch.cat([self.keys, new_keys], dim=2)
        self.values = torch.cat([self.values, value_states.index_select(1, self.heads)], dim=2)
        if self.policy is not None:
            # New tokens count as real until `attend` reads the padding mask (prefill); new slots have no
            # statistics yet: zeros along the slot dimension (always last).
            self.valid = torch.cat([self.valid, self.valid.new_ones(new_keys.shape[:3])], dim=2)
            new = new_keys.shape[2]
            self.stats = {name: torch.nn.functional.pad(stat, (0, new)) for name, stat in self.stats.items()}

    def attend(self, module, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, seen: int,
               dropout: float = 0.0, **kwargs) -> torch.Tensor:
        """This group's queries `(batch, heads, q_len, head_dim)` over its slots, then eviction (see the module
        docstring); `seen` is the number of tokens the layer has seen. Returns `(batch, q_len, heads, head_dim)`."""
        if self.policy is None:
            out, _ = sdpa_attention_forward(module, query, self.keys, self.values, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
            return out
        q_len = query.shape[2]
        if q_len == 1:
            return self._decode_step(query, scaling, seen)
        if attention_mask is not None:
            self.mark_padding(attention_mask[:, 0, -1, -q_len:])
        old = self.keys.shape[2] - q_len
        if old == 0:
            mask = attention_mask  # a fresh prefill: the model's own causal + padding mask
        else:  # a prefill continuing a compressed history: kept slots, then causal over the new tokens
            own = None if attention_mask is None else attention_mask[..., -q_len:]  # the model's: causal + padding
            mask = history_causal_mask(self.valid[:, :, :old], q_len, causal=own).repeat_interleave(self.groups, dim=1)
        out, _ = sdpa_attention_forward(module, query, self.keys, self.values, mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
        if self.policy.needs_attention:
            self._observe_prefill(query, mask, scaling)
        self.compress(seen)
        return out

    def _decode_step(self, query: torch.Tensor, scaling: float, seen: int) -> torch.Tensor:
        mask = None if self.all_valid else self.valid.repeat_interleave(self.groups, dim=1)[:, :, None, :]
        if not self.policy.needs_attention:  # grouped-query attention inside SDPA: no copy of the keys per query head
            out = torch.nn.functional.scaled_dot_product_attention(query, self.keys, self.values, attn_mask=mask,
                                                                   scale=scaling, enable_gqa=self.groups > 1)
        else:
            keys = repeat_kv(self.keys, self.groups)
            values = repeat_kv(self.values, self.groups)
            logits = (query @ keys.transpose(-1, -2)).float() * scaling
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            probs = logits.softmax(dim=-1)
            self.policy.observe(self.stats, self._sum_groups(probs))  # over the slots attended
            out = probs.to(values.dtype) @ values
        self.compress(seen, slack=self.policy.slack())
        return out.transpose(1, 2)

    def _observe_prefill(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> None:
        """Feed the policy the attention probabilities of the prefill queries it observes, in chunks of rows."""
        q_len = query.shape[2]
        window = self.policy.observed_queries()
        first = 0 if window is None else max(0, q_len - window)
        keys = repeat_kv(self.keys, self.groups)
        offset = keys.shape[2] - q_len
        for start in range(first, q_len, _OBSERVE_CHUNK):
            stop = min(q_len, start + _OBSERVE_CHUNK)
            logits = (query[:, :, start:stop] @ keys.transpose(-1, -2)).float() * scaling
            if mask is not None:
                logits = logits.masked_fill(~mask[:, :, start:stop], float("-inf"))
            else:  # rows start..stop of a causal prefill after `offset` cached keys
                visible = history_causal_mask(offset + start, stop - start, device=query.device)
                visible = torch.nn.functional.pad(visible, (0, q_len - stop))
                logits = logits.masked_fill(~visible, float("-inf"))
            self.policy.observe(self.stats, self._sum_groups(logits.softmax(dim=-1).nan_to_num(0.0)))

    def _sum_groups(self, probs: torch.Tensor) -> torch.Tensor:
        """`(batch, kv_heads * groups, q, slots)` -> `(batch, kv_heads, q, slots)`: a KV head's query heads summed."""
        batch, heads, q_len, slots = probs.shape
        return probs.reshape(batch, heads // self.groups, self.groups, q_len, slots).sum(dim=2)

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the newest tokens are padding; `new_valid` is `(batch, new_tokens)` bool."""
        if self.policy is None or not len(self):
            return
        count = new_valid.shape[1]
        self.valid[:, :, -count:] = new_valid[:, None, :]
        self.all_valid = self.all_valid and bool(new_valid.all())

    def compress(self, seen: int, slack: int = 0) -> None:
        """Keep the `budget` best slots of each head once it holds more than its budget and at least
        budget + slack (R-KV's buffer: compression fires when the head reaches budget + buffer)."""
        if self.policy is None or not len(self):
            return
        budget = self.policy.budget(seen)
        slots = self.keys.shape[2]
        if slots <= budget or slots < budget + slack:
            return
        prefix = self.policy.kept_prefix(budget)
        # sinks + most recent, no padding: a slice, no ranking
        if prefix is not None and self.all_valid and not self.stats:
            drop = slice(prefix, prefix + slots - budget)
            self.keys, self.values = (torch.cat([t[:, :, :drop.start], t[:, :, drop.stop:]], dim=2)
                                      for t in (self.keys, self.values))
            self.valid = self.valid[:, :, :budget]  # all True: any `budget` of them
            return
        scores = self.policy.keep_scores(self.keys, self.valid, self.stats)
        keep = scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values  # (batch, heads, budget)
        gather_kv = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather_kv)
        self.values = self.values.gather(2, gather_kv)
        self.valid = self.valid.gather(2, keep)
        # the padding is gone once every row holds more real tokens than its budget
        self.all_valid = bool(self.valid.all())
        for name, stat in self.stats.items():
            index = keep.reshape(keep.shape[:2] + (1,) * (stat.ndim - 3) + keep.shape[2:])
            index = index.expand(stat.shape[:-1] + (budget,))
            self.stats[name] = stat.gather(-1, index)

    def select_batch(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]
        if self.policy is not None:
            self.valid = self.valid[indices]
            self.stats = {name: stat[indices] for name, stat in self.stats.items()}

    def tensors(self, kv_only: bool = False) -> list[torch.Tensor]:
        kv = [self.keys, self.values]
        return kv if kv_only or self.policy is None else [*kv, self.valid, *self.stats.values()]


@dataclass
class LayerView:
    """What `HeadwiseLayer.update` hands to the attention function in place of key/value tensors."""

    layer: HeadwiseLayer
    query_length: int

    @property
    def shape(self) -> torch.Size:  # some code paths only look at the shape
        return torch.Size((self.layer.batch_size, self.layer.num_kv_heads, self.layer.seen, self.layer.head_dim))


class HeadwiseLayer(CacheLayerMixin):
    """One decoder layer's cache under a plan: a `HeadGroup` of full heads and one of compressed heads."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, full_heads: torch.Tensor, compressed_heads: torch.Tensor, policy: TokenPolicy, groups: int,
                 full_policy: TokenPolicy | None = None) -> None:
        super().__init__()
        self.full = HeadGroup(full_heads, full_policy, groups)
        self.compressed = HeadGroup(compressed_heads, policy, groups)
        self.groups = groups
        self.num_kv_heads = len(full_heads) + len(compressed_heads)
        self.seen = 0
        self.batch_size = 0
        self.head_dim = 0

    @property
    def head_groups(self) -> tuple[HeadGroup, HeadGroup]:
        return (self.full, self.compressed)

    # views kept for the readers of a cache (tests, benchmarks): the full group's tensors are transformers' names
    has_full = property(lambda self: len(self.full) > 0)
    has_compressed = property(lambda self: len(self.compressed) > 0)
    compressed_keys = property(lambda self: self.compressed.keys)
    compressed_values = property(lambda self: self.compressed.values)
    valid = property(lambda self: self.compressed.valid)
    stats = property(lambda self: self.compressed.stats)
    policy = property(lambda self: self.compressed.policy)

    @property
    def keys(self) -> torch.Tensor | None:
        return self.full.keys if hasattr(self, "full") else None

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ sets None; the groups own the tensors
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return self.full.values if hasattr(self, "full") else None

    @values.setter
    def values(self, value) -> None:
        pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, _, _, self.head_dim = key_states.shape
        for group in self.head_groups:
            group.initialize(key_states, value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[LayerView, LayerView]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for group in self.head_groups:
            if len(group):
                group.append(key_states, value_states)
        self.seen += key_states.shape[2]
        # eviction follows in `HeadGroup.attend`, after the new queries attended
        view = LayerView(self, key_states.shape[2])
        return view, view

    def compress(self, slack: int = 0) -> None:
        """Evict in every budgeted group now (tests and benchmarks; decoding does it in `attend`)."""
        for group in self.head_groups:
            group.compress(self.seen, slack)

    # --- transformers' Cache protocol ---------------------------------------------------------
    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.3 passes the cache positions
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # abstract in transformers < 5.3 (experiments/kvpress_crosscheck.py)
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        for group in self.head_groups:
            group.all_valid = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for group in self.head_groups:
            group.select_batch(indices)
        self.batch_size = self.full.keys.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for group in self.head_groups for t in group.tensors())

    def kv_nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for group in self.head_groups for t in group.tensors(kv_only=True))


class HeadwiseCache(Cache):
    """A `transformers` cache that runs a `CompressionPlan`: one `HeadwiseLayer` per decoder layer."""

    def __init__(self, plan: CompressionPlan, config) -> None:
        shape = ModelShape.from_config(config)
        plan.check_shape(shape)
        heads = torch.arange(shape.num_kv_heads)
        layers = [
            HeadwiseLayer(heads[plan.full[i]], heads[~plan.full[i]], plan.policy, shape.num_groups, plan.full_policy)
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
