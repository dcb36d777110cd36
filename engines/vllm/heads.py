"""One decoder layer's attention under a head plan: two calls, whatever the plan.

vLLM allocates the KV cache one sub-layer per KV head (`models.py`): every page is one head's, so full and compressed
heads group without padding and a compressed head's middle blocks go back to the pool. But vLLM puts every layer's
cache in one backing allocation (`vllm.v1.worker.utils.allocate_kv_cache`): a sub-layer's cache is a strided view of
it. So a layer does not call its sub-layers one by one; it reads their caches through views that span several heads:

- `FullHeads`: the full heads of a layer are consecutive sub-layers of one KV-cache group, hence at a constant
  distance in the allocation; one strided view `[blocks, F, ...]` over them goes through the platform's own attention
  kernel (vLLM's CPU kernel here) as one layer of `F` KV heads: one cache write and one attention call.
- `CompressedHeads`: the allocation seen as rows of `[key | value]`, one row per (head, slot) (`paged_rows.py`). A
  step writes the layer's compressed heads with one `index_copy_` and reads each request's at most
  `sink + window + 1` kept rows with one gather; decoding steps then run one batched attention over those 81 keys for
  every compressed head of the layer.
  Generated tokens recomputed after a preemption are decoding rows too, one per token. Prompts and chunks (rare:
  once per prompt) run one SDPA per request, over its kept history and its own tokens; the gated model's run one
  banded SDPA for all of the step's prompts, whether from position 0 or going on from a cached prefix (a GRPO
  prompt's copies): `kept_attention.PromptBands`.

The kept slots and the prompt bands come from the compressed groups' metadata builder (`backend.py`), computed once
per step on the device. Nothing here syncs with the host or copies to the device: a layer reads the step's metadata and
the query spans vLLM already keeps on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.utils.torch_utils import direct_register_custom_op

from kvpress_rl.engines.vllm.kept_attention import banded_prompt_attention, decode_over_kept, worst_step_attention
from kvpress_rl.engines.vllm.paged_rows import PagedRows
from kvpress_rl.engines.vllm.vllm_compat import forward_module, layer_context, metadata_for_heads
from kvpress_rl.masks import history_causal_mask

OP_NAME = "kvrl_plan_attention"  # torch.ops.vllm.kvrl_plan_attention: a layer's attention, opaque to torch.compile


def plan_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                   layer_name: str) -> None:
    """The body of the custom op: the layer registered under `layer_name` attends (`models.PlanAttention.attend`)."""
    forward_module(layer_name).attend(query, key, value, output)


def plan_attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                         layer_name: str) -> None:
    return None


def register_op() -> None:
    """Register `torch.ops.vllm.kvrl_plan_attention` once per process (`plugin.register`): like vLLM's own attention,
    a layer's attention reads the step's metadata from vLLM's forward context, so compiled models call it as one op
    and piecewise CUDA graphs are cut around it (`vllm_compat.splitting_ops`)."""
    if not hasattr(torch.ops.vllm, OP_NAME):
        direct_register_custom_op(OP_NAME, plan_attention, mutates_args=["output"], fake_impl=plan_attention_shape)


class OpAttention(nn.Module):
    """A decoder layer's attention that runs as the op `vllm::kvrl_plan_attention` (`plan_attention` finds the layer by
    `layer_name` and calls its `attend`); a subclass sets `layer_name`, `num_kv_heads`, `group` and `head_size`."""

    layer_name: str
    num_kv_heads: int
    group: int  # query heads per KV head
    head_size: int

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        width = self.num_kv_heads * self.group * self.head_size
        output = torch.empty((q.shape[0], width), dtype=q.dtype, device=q.device)
        torch.ops.vllm.kvrl_plan_attention(q, k, v, output, self.layer_name)
        return output

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor) -> None:
        raise NotImplementedError


def head_runs(caches: list[torch.Tensor]) -> list[tuple[int, int]]:
    """`(first, count)` runs of consecutive heads whose caches are equally strided views at a constant distance in one
    allocation: each run is one multi-head view. One run when vLLM laid the heads out in order (the usual case)."""
    runs: list[tuple[int, int]] = []
    for i, cache in enumerate(caches):
        if runs:
            first, count = runs[-1]
            head = caches[first]
            same = cache.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
            same = same and cache.stride() == head.stride()
            step = (caches[first + 1] if count > 1 else cache).storage_offset() - head.storage_offset()
            if same and step > 0 and cache.storage_offset() - head.storage_offset() == step * count:
                runs[-1] = (first, count + 1)
                continue
        runs.append((i, 1))
    return runs


def multi_head_view(caches: list[torch.Tensor]) -> torch.Tensor:
    """One `[blocks, heads, ...]` view over per-head caches `[blocks, 1, ...]` that `head_runs` found to be one run."""
    head = caches[0]
    if len(caches) == 1:
        return head
    step = caches[1].storage_offset() - head.storage_offset()
    size = (head.shape[0], len(caches), *head.shape[2:])
    stride = (head.stride(0), step, *head.stride()[2:])
    return head.as_strided(size, stride, head.storage_offset())


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


@dataclass
class LayerHeads:
    """One kind of a layer's heads: their sub-layer names, in head order, and views over vLLM's allocation that a
    subclass binds once (`_bind`, again only if vLLM binds its caches anew)."""

    names: list[str]
    group: int  # query heads per KV head

    def __post_init__(self) -> None:
        self.bound_at = -1

    def _bind(self) -> None:
        raise NotImplementedError

    def step_context(self) -> tuple | None:
        """The step's `(metadata, layer, slot mapping)` of the first head, the views bound; None in vLLM's profiling
        and warm-up runs (no metadata)."""
        context = layer_context(self.names[0])
        if context[0] is None:
            return None
        if context[1].kv_cache.data_ptr() != self.bound_at:
            self._bind()  # once: vLLM binds the caches before the first real step
            self.bound_at = context[1].kv_cache.data_ptr()
        return context

    def profiled_layer(self):
        """The first head's attention layer in vLLM's profile run, which sizes the cache from the forward's peak memory
        (no metadata, no cache yet); None in any other run."""
        metadata, layer, _ = layer_context(self.names[0])
        return layer if metadata is None and layer.kv_cache.numel() == 0 else None


@dataclass
class FullHeads(LayerHeads):
    """The full heads of a layer (consecutive sub-layers of one KV-cache group): the platform's kernel over
    multi-head views of their caches."""

    def _bind(self) -> None:
        contexts = [layer_context(name) for name in self.names]
        self.views: list[tuple[int, int, torch.Tensor, str]] = []  # (first head, heads, view, its first sub-layer)
        start = 0
        for end in range(1, len(contexts) + 1):  # heads of different KV-cache groups have different block tables
            if end == len(contexts) or contexts[end][0] is not contexts[start][0]:
                caches = [layer.kv_cache for _, layer, _ in contexts[start:end]]
                for first, count in head_runs(caches):
                    view = multi_head_view(caches[first:first + count])
                    self.views.append((start + first, count, view, self.names[start + first]))
                start = end

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """query `[T, F * G, D]`, key and value `[T, F, D]`, output `[T, F * G, D]` (written)."""
        context = self.step_context()
        if context is None:
            return
        g = self.group
        for first, count, view, name in self.views:
            # the first run starts at head 0: its group's metadata is the context's
            metadata, layer, slot_mapping = context if first == 0 else layer_context(name)
            heads, query_heads = slice(first, first + count), slice(first * g, (first + count) * g)
            q, k, v, out = query[:, query_heads], key[:, heads], value[:, heads], output[:, query_heads]
            layer.impl.do_kv_cache_update(layer, k, v, view, slot_mapping)
            layer.impl.forward(layer, q, k, v, view, metadata_for_heads(metadata, count), output=out)


@dataclass
class CompressedHeads(LayerHeads):
    """The compressed heads of a layer (possibly in several KV-cache groups): one write, one gather and one batched
    attention over their kept rows."""

    head_size: int
    scale: float
    max_requests: int  # vLLM's `max_num_seqs`: decoding rows attend in slices of at most this many
    # False: a prompt is plain causal attention (a head plan's compressed heads); True: the gated model's streaming
    # branch, whose prompts read their sinks and recent keys too (the learner's teacher-forced branch), in the bands
    # its metadata builder made (`kept_attention.PromptBands`)
    windowed_prompts: bool = False

    def _bind(self) -> None:
        contexts = [layer_context(name) for name in self.names]
        device = contexts[0][1].kv_cache.device
        # [blocks, 1, B, 2 D] per head
        self.kv = PagedRows.over([layer.kv_cache for _, layer, _ in contexts], self.names[0])
        index: dict[int, int] = {}  # heads of one KV-cache group share one metadata object, hence one block table
        self.head_group = torch.tensor([index.setdefault(id(m), len(index)) for m, _, _ in contexts], device=device)
        firsts: dict[int, str] = {}
        for (m, _, _), name in zip(contexts, self.names):
            firsts.setdefault(id(m), name)
        self.group_names = list(firsts.values())
        self.one_group = len(self.group_names) == 1

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of every head for cache slots `[groups, ...]` (one slot tensor per KV-cache group): `[heads, ...]`."""
        # padding tokens (slot -1) write vLLM's null block, which is never read
        slots = slots[0].clamp_min(0)[None] if self.one_group else slots[self.head_group].clamp_min(0)
        return self.kv.index(slots)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """query `[T, C * G, D]`, key and value `[T, C, D]`, output `[T, C * G, D]` (written)."""
        context = self.step_context()
        if context is None:
            layer = self.profiled_layer()  # a `sublayers.SinkWindowAttention`
            if layer is not None:
                worst_step_attention(query, key, value, output, (layer.sink, layer.window, layer.block), self.scale,
                                     self.max_requests, self.windowed_prompts)
            return
        metadata = context[0]
        groups = [context] + [layer_context(name) for name in self.group_names[1:]]  # group_names[0] is names[0]
        tokens = metadata.num_actual_tokens
        # the step's keys and values first: a decoding token reads itself back with its history
        rows = self._rows(stacked([slot_mapping[:tokens].long() for _, _, slot_mapping in groups]))  # [C, T]
        self.kv.write(rows, key[:tokens], value[:tokens])
        kept = stacked([m.kept_slots for m, _, _ in groups])  # [groups, rows, K + 1]
        if metadata.num_decodes:
            self._decode(query, kept, metadata, output)
        if self.windowed_prompts:
            if metadata.prompt_bands is not None:
                self._streaming_prompts(query, key, value, kept, metadata, output)
            return
        prompts = [span for span in metadata.prefills if span.computed == 0]
        if prompts and query.device.type == "cpu":  # vLLM's CPU kernel, all of the step's prompts in one call
            from kvpress_rl.engines.vllm.cpu_full import prompt_attention

            prompt_attention(query, key, value, [(span.start, span.end) for span in prompts], self.scale, output)
            prompts = []
        for span in prompts + [span for span in metadata.prefills if span.computed]:
            self._prefill(query, key, value, kept, metadata, span, output)

    def _decode(self, query: torch.Tensor, kept: torch.Tensor, metadata, output: torch.Tensor) -> None:
        """The decoding rows, at most `max_requests` at a time (more only when generated tokens are recomputed after a
        preemption), so their temporaries are bounded by the engine's batch, not by the step's tokens."""
        tokens = metadata.decode_tokens  # None: request r decodes token r
        for first in range(0, metadata.num_decodes, self.max_requests):
            rows = slice(first, min(first + self.max_requests, metadata.num_decodes))
            step_tokens = rows if tokens is None else tokens[rows]
            keys, values = self.kv.read(self._rows(kept[:, rows]).transpose(0, 1))  # [R, C, K, D]
            out = decode_over_kept(keys, values, query[step_tokens], metadata.kept_valid[rows], self.scale, self.group)
            output[step_tokens] = out.to(output.dtype)

    def _streaming_prompts(self, query, key, value, kept, metadata, output) -> None:
        """The gated model's prompt chunks (from position 0, or going on from a cached prefix: a GRPO prompt's copies
        after the first) in one banded attention over their kept history (the rows after the decoding rows) and their
        own keys."""
        history = self.kv.read(self._rows(kept[:, metadata.num_decodes:, :-1]).transpose(0, 1))  # [S, C, K, D]
        banded_prompt_attention(query, key, value, history, metadata.prompt_bands, self.scale, output)

    def _prefill(self, query, key, value, kept, metadata, span, output) -> None:
        q = query[span.start:span.end].transpose(0, 1)[None]  # [1, C * G, n, D]
        own_k, own_v = (t[span.start:span.end].transpose(0, 1)[None] for t in (key, value))
        if span.computed == 0:  # a prompt in one step: plain causal attention
            out = F.scaled_dot_product_attention(q, own_k, own_v, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            old_k, old_v = self.kv.read(self._rows(kept[:, span.row, :-1]))  # [C, K, D]
            keys = torch.cat([old_k[None].to(q.dtype), own_k], dim=2)
            values = torch.cat([old_v[None].to(q.dtype), own_v], dim=2)
            mask = history_causal_mask(metadata.kept_valid[span.row, :-1], span.end - span.start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        output[span.start:span.end] = out[0].transpose(0, 1).to(output.dtype)
