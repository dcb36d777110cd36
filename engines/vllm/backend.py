"""vLLM attention backends of a head plan's sub-layers: what each KV-cache group builds once per step.

- `SinkWindowBackend` (compressed heads): its builder computes, on the device and for every request of the step, the
  cache slots of the kept history, `{0..sink-1} U {max(sink, c-window)..c-1}` for a step that starts with `c` cached
  tokens, and of position `c` itself (a decoding token reads itself back): `[R, sink + window + 1]` with a validity
  mask (`kept_slots`; the gated model's streaming branch in blocks also marks the window's keys outside its blocks),
  and for the gated model the bands its prompts attend in (`kept_attention.prompt_bands`).
  The layer's compressed heads then attend through `heads.CompressedHeads` (one write, one gather, one attention).
  Its own cache layout: a block is `[B slots, key | value]`, written and read only by `heads.py`.
- `FullHeadsCPUBackend` (full heads on the CPU): vLLM's CPU attention with a builder whose metadata also gives the
  kernel's schedule for calls over several KV heads (`for_heads`), as `heads.FullHeads` makes them.

The sub-layers' own `forward` is never called: a layer runs its heads together (`models.PlanAttention`,
`gated.GatedAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from kvpress_rl.engines.vllm.kept_attention import PromptBands, kept_positions, prompt_bands, streaming_keys
from kvpress_rl.engines.vllm.plugin import SINK_WINDOW_BACKEND


@dataclass
class PrefillSpan:
    request: int  # row of the request in the step
    row: int  # its row of kept slots (the history it reads)
    start: int  # its first token in the step
    end: int
    computed: int  # tokens it had cached before the step


@dataclass
class SinkWindowMetadata:
    """Rows of kept slots: first one per token the decoding rule applies to (a decoding token, or a generated token
    recomputed after preemption), then one per prompt chunk (its history)."""

    num_actual_tokens: int
    kept_slots: torch.Tensor  # [rows, K + 1] slots: sinks, window, the row's position (invalid: slot of position 0)
    kept_valid: torch.Tensor  # [rows, K + 1] True where the entry is a kept position
    num_decodes: int  # tokens under the decoding rule: rows 0 .. num_decodes - 1
    decode_tokens: torch.Tensor | None  # their token index, [num_decodes]; None when every request decodes one token
    prefills: list[PrefillSpan]  # prompt chunks (host data vLLM already has)
    prompt_bands: PromptBands | None = None  # the gated model's streaming branch over the prompt chunks, if any


def kept_slots(table: torch.Tensor, positions: torch.Tensor, block_size: int, sink: int, window: int,
               block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(slots, valid)` of the rows whose own positions are `positions` `[rows]` and block tables `table` `[rows, n]`
    (`kept_attention.kept_positions`; with `block`, only those `kept_attention.streaming_keys` reads are valid: the
    sinks and the recent keys of the row's block and the `(window + 1) // block - 1` blocks before it)."""
    kept, valid = kept_positions(positions, sink, window)
    if block:
        valid = valid & streaming_keys(positions.long()[:, None], kept, sink, window, block)[:, 0]
    return table.gather(1, kept // block_size) * block_size + kept % block_size, valid


def kept_metadata(meta: CommonAttentionMetadata, block_size: int, sink: int, window: int, block: int = 0,
                  windowed_prompts: bool = False) -> SinkWindowMetadata:
    """The step's kept slots for one KV-cache group (its block table), without a host sync or a loop over requests
    in a decoding step. Steps with several tokens for a request read the query lengths vLLM keeps on the host: a
    request still in its prompt (`is_prefilling`) is a prompt chunk; one past it (generated tokens recomputed after a
    preemption: `scheduler.py` never mixes the two) gets one decoding row per token. With `windowed_prompts` (the
    gated model), the prompt chunks' streaming branch in bands (`kept_attention.prompt_bands`)."""
    requests = meta.num_reqs
    starts = meta.query_start_loc[: requests + 1]
    computed = meta.seq_lens[:requests] - (starts[1:] - starts[:-1])
    table = meta.block_table_tensor[:requests].long()
    if meta.max_query_len <= 1:
        slots, valid = kept_slots(table, computed, block_size, sink, window, block)
        return SinkWindowMetadata(num_actual_tokens=meta.num_actual_tokens, kept_slots=slots, kept_valid=valid,
                                  num_decodes=requests, decode_tokens=None, prefills=[])
    starts_cpu = meta.query_start_loc_cpu[: requests + 1]
    lengths = (starts_cpu[1:] - starts_cpu[:-1]).tolist()
    first = starts_cpu[:-1].tolist()
    seq_lens = meta.seq_lens_cpu_upper_bound  # exact for prefills
    seq_lens = meta.seq_lens.cpu() if seq_lens is None else seq_lens
    in_prompt = [True] * requests if meta.is_prefilling is None else meta.is_prefilling[:requests].tolist()
    decoding = [(r, j) for r, n in enumerate(lengths) if n == 1 or (n > 1 and not in_prompt[r]) for j in range(n)]
    chunks = [r for r, n in enumerate(lengths) if n > 1 and in_prompt[r]]
    prefills = [PrefillSpan(request=r, row=len(decoding) + i, start=first[r], end=first[r] + lengths[r],
                            computed=int(seq_lens[r]) - lengths[r]) for i, r in enumerate(chunks)]
    device = table.device
    rows = torch.tensor([r for r, _ in decoding] + chunks, dtype=torch.long).to(device, non_blocking=True)
    offsets = torch.tensor([j for _, j in decoding] + [0] * len(chunks), dtype=torch.long).to(device, non_blocking=True)
    slots, valid = kept_slots(table[rows], computed.long()[rows] + offsets, block_size, sink, window, block)
    tokens = torch.tensor([first[r] + j for r, j in decoding], dtype=torch.long).to(device, non_blocking=True)
    bands = None
    if windowed_prompts and prefills:  # the chunks' rows follow the decoding rows
        bands = prompt_bands([(span.start, span.end, span.computed) for span in prefills], valid[len(decoding):, :-1],
                             (sink, window, block))
    return SinkWindowMetadata(num_actual_tokens=meta.num_actual_tokens, kept_slots=slots, kept_valid=valid,
                              num_decodes=len(decoding), decode_tokens=tokens, prefills=prefills, prompt_bands=bands)


class SinkWindowMetadataBuilder(AttentionMetadataBuilder[SinkWindowMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        spec = kv_cache_spec
        self.block_size, self.sink, self.window, self.block = spec.block_size, spec.sink, spec.window, spec.block
        self.windowed_prompts = spec.windowed_prompts

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SinkWindowMetadata:
        return kept_metadata(common_attn_metadata, self.block_size, self.sink, self.window, self.block,
                             self.windowed_prompts)


class TorchAttentionImpl(AttentionImpl):
    """What kvpress-rl's plain-torch backends accept (`label`: the backend's name in errors; `one_kv_head`: a layer of
    one KV head only): plain causal decoder attention over an unquantised, unshared cache."""

    label = "kvpress-rl"
    one_kv_head = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, **unsupported) -> None:
        if self.one_kv_head and (num_kv_heads or num_heads) != 1:
            raise ValueError(f"the {self.label} backend runs one KV head")
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap or unsupported:
            raise ValueError(f"the {self.label} backend runs attention without alibi, sliding window, soft cap "
                             "or sinks")
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
    """A compressed head's sub-layer: checks what it is given; its layer attends for it (`heads.CompressedHeads`)."""

    label = "kvpress-rl compressed-head"
    one_kv_head = True

    def forward(self, *args, **kwargs):
        raise RuntimeError("a compressed head's sub-layer is not called on its own: its layer runs its heads together")


class SinkWindowBackend(TorchBackend):
    name, impl, builder = SINK_WINDOW_BACKEND, SinkWindowImpl, SinkWindowMetadataBuilder
