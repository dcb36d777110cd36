"""One decoder layer's attention under a head plan: two calls, whatever the plan.

vLLM allocates the KV cache one sub-layer per KV head (`models.py`): every page is one head's, so full and compressed
heads group without padding and a compressed head's middle blocks go back to the pool. But vLLM puts every layer's
cache in one backing allocation (`vllm.v1.worker.utils.allocate_kv_cache`): a sub-layer's cache is a strided view of
it. So a layer does not call its sub-layers one by one; it reads their caches through views that span several heads:

- `FullHeads`: the full heads of a layer are consecutive sub-layers of one KV-cache group, hence at a constant
  distance in the allocation; one strided view `[blocks, F, ...]` over them goes through the platform's own attention
  kernel (vLLM's CPU kernel here) as one layer of `F` KV heads: one cache write and one attention call.
- `CompressedHeads`: the allocation seen as rows of `[key | value]`, one row per (head, slot). A step writes the
  layer's compressed heads with one `index_copy_` and reads each request's at most `sink + window + 1` kept rows with
  one gather; decoding steps then run one batched attention over those 81 keys for every compressed head of the layer.
  Prompts and chunks (rare: once per prompt) run one SDPA per request, over its kept history and its own tokens.

The kept slots come from the compressed groups' metadata builder (`backend.py`), computed once per step on the device.
Nothing here syncs with the host; the only host data read are the query lengths vLLM already keeps on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.utils.torch_utils import direct_register_custom_op

from kvpress_rl.engines.vllm.kept_attention import decode_over_kept
from kvpress_rl.engines.vllm.vllm_compat import forward_module, layer_context, metadata_for_heads

OP_NAME = "kvrl_plan_attention"  # torch.ops.vllm.kvrl_plan_attention: a layer's attention, opaque to torch.compile


def plan_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    """The body of the custom op: the layer registered under `layer_name` attends (`models.PlanAttention.attend`)."""
    forward_module(layer_name).attend(query, key, value, output)


def plan_attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


def register_op() -> None:
    """Register `torch.ops.vllm.kvrl_plan_attention` once per process (`plugin.register`): like vLLM's own attention,
    a layer's attention reads the step's metadata from vLLM's forward context, so compiled models call it as one op
    and piecewise CUDA graphs are cut around it (`vllm_compat.splitting_ops`)."""
    if not hasattr(torch.ops.vllm, OP_NAME):
        direct_register_custom_op(OP_NAME, plan_attention, mutates_args=["output"], fake_impl=plan_attention_shape)


def head_runs(caches: list[torch.Tensor]) -> list[tuple[int, int]]:
    """`(first, count)` runs of consecutive heads whose caches are equally strided views at a constant distance in one
    allocation: each run is one multi-head view. One run when vLLM laid the heads out in order (the usual case)."""
    runs: list[tuple[int, int]] = []
    for i, cache in enumerate(caches):
        if runs:
            first, count = runs[-1]
            head = caches[first]
            same = cache.untyped_storage().data_ptr() == head.untyped_storage().data_ptr() and cache.stride() == head.stride()
            step = caches[first + 1].storage_offset() - head.storage_offset() if count > 1 else cache.storage_offset() - head.storage_offset()
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
class FullHeads:
    """The full heads of a layer: their sub-layer names, in head order (consecutive sub-layers of one KV-cache group)."""

    names: list[str]
    group: int  # query heads per KV head

    def __post_init__(self) -> None:
        self.views: list[tuple[int, int, torch.Tensor, str]] = []
        self.bound_at = -1

    def _bind(self) -> None:
        contexts = [layer_context(name) for name in self.names]
        self.views = []  # (first head, heads, view, name of the run's first sub-layer: its group's metadata)
        start = 0
        for end in range(1, len(contexts) + 1):  # heads of different KV-cache groups have different block tables
            if end == len(contexts) or contexts[end][0] is not contexts[start][0]:
                caches = [layer.kv_cache for _, layer, _ in contexts[start:end]]
                for first, count in head_runs(caches):
                    self.views.append((start + first, count, multi_head_view(caches[first:first + count]), self.names[start + first]))
                start = end

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """query `[T, F * G, D]`, key and value `[T, F, D]`, output `[T, F * G, D]` (written)."""
        context = layer_context(self.names[0])
        if context[0] is None:  # vLLM's profiling and warm-up runs
            return
        if context[1].kv_cache.data_ptr() != self.bound_at:
            self._bind()  # once: vLLM binds the caches before the first real step
            self.bound_at = context[1].kv_cache.data_ptr()
        g = self.group
        for first, count, view, name in self.views:
            metadata, layer, slot_mapping = context if first == 0 else layer_context(name)  # the first run starts at head 0
            heads = slice(first, first + count)
            q, k, v, out = query[:, first * g:(first + count) * g], key[:, heads], value[:, heads], output[:, first * g:(first + count) * g]
            layer.impl.do_kv_cache_update(layer, k, v, view, slot_mapping)
            layer.impl.forward(layer, q, k, v, view, metadata_for_heads(metadata, count), output=out)


@dataclass
class CompressedHeads:
    """The compressed heads of a layer: their sub-layer names, in head order (possibly in several KV-cache groups)."""

    names: list[str]
    group: int  # query heads per KV head
    head_size: int
    scale: float

    def __post_init__(self) -> None:
        self.bound_at = -1

    def _bind(self) -> None:
        contexts = [layer_context(name) for name in self.names]
        caches = [layer.kv_cache for _, layer, _ in contexts]
        width = 2 * self.head_size
        head = caches[0]  # [blocks, 1, B, 2 D]: one head's pages in the shared allocation
        for cache in caches:
            if cache.stride()[-2:] != (width, 1) or cache.storage_offset() % width or cache.stride(0) % width:
                raise RuntimeError(f"{self.names[0]}: a compressed head's pages are not rows of [key | value]")
        storage = torch.empty(0, dtype=head.dtype, device=head.device).set_(head.untyped_storage())
        self.rows = storage[: storage.numel() // width * width].view(-1, width)  # the whole allocation, one row per slot
        self.block_size = head.shape[2]
        self.rows_per_block = torch.tensor([cache.stride(0) // width for cache in caches], device=head.device)
        self.base = torch.tensor([cache.storage_offset() // width for cache in caches], device=head.device)
        self.plain = bool((self.rows_per_block == self.block_size).all())  # layer-outer layouts: slot s of a head is row base + s
        index: dict[int, int] = {}  # heads of one KV-cache group share one metadata object, hence one block table
        self.head_group = torch.tensor([index.setdefault(id(m), len(index)) for m, _, _ in contexts], device=head.device)
        firsts: dict[int, str] = {}
        for (m, _, _), name in zip(contexts, self.names):
            firsts.setdefault(id(m), name)
        self.group_names = list(firsts.values())
        self.one_group = len(self.group_names) == 1
        self.bound_at = head.data_ptr()

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of every head for cache slots `[groups, ...]` (one slot tensor per KV-cache group): `[heads, ...]`."""
        # padding tokens (slot -1) write vLLM's null block, which is never read
        slots = slots[0].clamp_min(0)[None] if self.one_group else slots[self.head_group].clamp_min(0)
        shape = (-1,) + (1,) * (slots.dim() - 1)
        if self.plain:
            return self.base.view(shape) + slots
        return self.base.view(shape) + slots // self.block_size * self.rows_per_block.view(shape) + slots % self.block_size

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """query `[T, C * G, D]`, key and value `[T, C, D]`, output `[T, C * G, D]` (written)."""
        context = layer_context(self.names[0])
        metadata = context[0]
        if metadata is None:  # vLLM's profiling and warm-up runs
            return
        if context[1].kv_cache.data_ptr() != self.bound_at:
            self._bind()
        groups = [context] + [layer_context(name) for name in self.group_names[1:]]  # group_names[0] is names[0]
        tokens, d = metadata.num_actual_tokens, self.head_size
        # the step's keys and values first: a decoding token reads itself back with its history
        rows = self._rows(stacked([slot_mapping[:tokens].long() for _, _, slot_mapping in groups]))  # [C, T]
        entries = torch.cat([key[:tokens], value[:tokens]], dim=-1).to(self.rows.dtype).transpose(0, 1)  # [C, T, 2 D]
        self.rows.index_copy_(0, rows.reshape(-1), entries.reshape(-1, 2 * d))
        kept = stacked([m.kept_slots for m, _, _ in groups])  # [groups, R, K + 1]
        if metadata.num_decodes:
            self._decode(query, kept, metadata, output)
        prompts = [span for span in metadata.prefills if span.computed == 0]
        if prompts and query.device.type == "cpu":  # vLLM's CPU kernel, all of the step's prompts in one call
            from kvpress_rl.engines.vllm.cpu_full import prompt_attention

            prompt_attention(query, key, value, [(span.start, span.end) for span in prompts], self.scale, output)
            prompts = []
        for span in prompts + [span for span in metadata.prefills if span.computed]:
            self._prefill(query, key, value, kept, metadata, span, output)

    def _decode(self, query: torch.Tensor, kept: torch.Tensor, metadata, output: torch.Tensor) -> None:
        g, count = self.group, metadata.num_decodes
        if metadata.decode_tokens is None:  # every request of the step decodes one token: request r is token r
            q, kept, valid = query[:count], kept[:, :count], metadata.kept_valid[:count]
        else:
            q, kept, valid = query[metadata.decode_tokens], kept[:, metadata.decode_requests], metadata.kept_valid[metadata.decode_requests]
        out = decode_over_kept(self.rows, self._rows(kept).transpose(0, 1), q, valid, self.scale, g).to(output.dtype)
        if metadata.decode_tokens is None:
            output[:count] = out
        else:
            output[metadata.decode_tokens] = out

    def _prefill(self, query, key, value, kept, metadata, span, output) -> None:
        d = self.head_size
        q = query[span.start:span.end].transpose(0, 1)[None]  # [1, C * G, n, D]
        own_k, own_v = key[span.start:span.end].transpose(0, 1)[None], value[span.start:span.end].transpose(0, 1)[None]
        if span.computed == 0:  # a prompt in one step: plain causal attention
            out = F.scaled_dot_product_attention(q, own_k, own_v, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            history = self._rows(kept[:, span.request, :-1])  # [C, K]
            entries = self.rows[history][None]  # [1, C, K, 2 D]
            keys = torch.cat([entries[..., :d].to(q.dtype), own_k], dim=2)
            values = torch.cat([entries[..., d:].to(q.dtype), own_v], dim=2)
            n, h = span.end - span.start, history.shape[-1]
            mask = torch.ones((n, h + n), dtype=torch.bool, device=q.device)
            mask[:, :h] = metadata.kept_valid[span.request, :-1]
            mask[:, h:] = torch.ones((n, n), dtype=torch.bool, device=q.device).tril()
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        output[span.start:span.end] = out[0].transpose(0, 1).to(output.dtype)
