"""Llama, Mistral, Qwen2 and Qwen3 in vLLM under a head plan: per layer, one call for its full heads and one for its
compressed heads, whatever the plan.

vLLM gives each attention layer one KV-cache spec and one block table per group of layers with the same spec. A plan
compresses some heads of a layer and not others, so each decoder layer registers one attention sub-layer per KV head
(`...self_attn.attn.kvh{j}`): full heads are vLLM's `Attention` with the platform's cache, compressed heads
`SinkWindowAttention` (`cache.py`: a manager that frees their middle blocks). Every page is one head's, so vLLM's
hybrid allocator groups them without padding pages. The sub-layers are never called one by one: the layer's
`PlanAttention` runs all its full heads through the platform's kernel in one call and all its compressed heads in one
batched attention over their kept keys (`heads.py`), reading the sub-layers' caches through views of vLLM's single
allocation. At load time each layer's q/k/v rows and output columns are permuted so its full heads come first
(`reorder_heads`), so each kind of head is a slice of q, k and v, not a copy.

The classes extend vLLM's stock ones (weights, RoPE, qk-norm unchanged) and, after the stock constructor, swap each
layer's `self_attn.attn` (`replace_attention`) for a `PlanAttention` built from the plan in the model config
(`layout.OVERRIDES_KEY`), or for the gated model's `gated.GatedAttention` (`layout.GATED_KEY`); the stock attention
layer is taken out of vLLM's forward context so that it gets no cache. Nothing else is replaced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from kvpress_rl.engines.vllm.gated import GatedAttention, set_model_gates
from kvpress_rl.engines.vllm.heads import CompressedHeads, FullHeads, OpAttention
from kvpress_rl.engines.vllm.layout import GATED_KEY, OVERRIDES_KEY, EnginePlan, group_layout
from kvpress_rl.engines.vllm.sublayers import FullHeadAttention, SinkWindowAttention, full_backend
from kvpress_rl.sampling import GatedBranch


class PlanAttention(OpAttention):
    """Takes the place of one layer's attention under a head plan: its full heads first, then its compressed ones (the
    layer's weights are reordered so at load time, `reorder_heads`), each kind in one call (`heads.py`).

    The sub-layers `kvh{j}` (one per KV head `j`, registered full heads first) only give vLLM one cache per head.
    Under tensor parallelism the layer holds the model's KV heads `first_head ...` (its rank's), `full` and `tags`
    are theirs, and `j` is the model's head index: the sub-layers of all ranks have distinct names. `max_requests`:
    vLLM's `max_num_seqs`."""

    def __init__(self, stock: Attention, full: tuple[bool, ...], plan: EnginePlan, cache_config,
                 tags: list[int], max_requests: int, first_head: int = 0) -> None:
        super().__init__()
        if len(full) != stock.num_kv_heads:
            raise ValueError(f"{stock.layer_name}: the plan has {len(full)} KV heads, the layer {stock.num_kv_heads}")
        self.num_kv_heads = stock.num_kv_heads
        self.group = stock.num_heads // stock.num_kv_heads
        self.head_size = stock.head_size
        self.layer_name = stock.layer_name  # the stock layer's place in vLLM's forward context, now this module's
        heads = range(self.num_kv_heads)
        self.order = [j for j in heads if full[j]] + [j for j in heads if not full[j]]
        self.num_full = f = sum(full)
        backend = full_backend()
        names = []
        for j in self.order:
            name = f"{stock.layer_name}.kvh{first_head + j}"
            common = dict(num_kv_heads=1, cache_config=cache_config, prefix=name)
            if full[j]:
                layer = FullHeadAttention(self.group, stock.head_size, stock.impl.scale, **common, group_tag=tags[j],
                                          attn_backend=backend)
            else:
                layer = SinkWindowAttention(self.group, stock.head_size, stock.impl.scale, **common, sink=plan.sink,
                                            window=plan.window)
            self.add_module(f"kvh{first_head + j}", layer)
            names.append(name)
        scale = float(stock.impl.scale)
        self.full_heads = FullHeads(names[:f], self.group) if f else None
        compressed = f < len(heads)
        self.compressed_heads = (CompressedHeads(names[f:], self.group, self.head_size, scale, max_requests)
                                 if compressed else None)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor) -> None:
        """q `[T, H * G * D]`, k and v `[T, H * D]` (heads in the reordered order), output `[T, H * G * D]`
        (written)."""
        tokens, g, d, f, heads = q.shape[0], self.group, self.head_size, self.num_full, self.num_kv_heads
        q = q.view(tokens, heads * g, d)
        k, v = k.view(tokens, heads, d), v.view(tokens, heads, d)
        out = output.view(tokens, heads * g, d)
        if self.full_heads is not None:
            # vLLM's kernels write a contiguous output: the full heads' part is written whole, then placed
            part = out if f == heads else torch.empty((tokens, f * g, d), dtype=q.dtype, device=q.device)
            self.full_heads(q[:, : f * g], k[:, :f], v[:, :f], part)
            if part is not out:
                out[:, : f * g] = part
        if self.compressed_heads is not None:  # plain torch: writes into its slice of the output
            self.compressed_heads(q[:, f * g:], k[:, f:], v[:, f:], out[:, f * g:])


def reorder_heads(self_attn: nn.Module, order: list[int]) -> None:
    """Permute a layer's q/k/v rows and output columns so that its KV heads come in `order` (with their query heads):
    attention is the same function of the layer's input, and each kind of head is a contiguous slice (DuoAttention's
    reordering of full heads first)."""
    attn = self_attn.attn
    heads, g, d = attn.num_kv_heads, attn.group, attn.head_size
    kv_head = torch.tensor(order)
    q_rows = (kv_head[:, None] * g * d + torch.arange(g * d)).reshape(-1)
    kv_rows = (kv_head[:, None] * d + torch.arange(d)).reshape(-1)
    q_size = heads * g * d
    rows = torch.cat([q_rows, q_size + kv_rows, q_size + heads * d + kv_rows])
    qkv, o = self_attn.qkv_proj, self_attn.o_proj
    for name, param in (("weight", getattr(qkv, "weight", None)), ("bias", getattr(qkv, "bias", None))):
        if param is None:
            continue
        if param.shape[0] != rows.numel():
            raise ValueError(f"{attn.__class__.__name__}: qkv_proj.{name} has {param.shape[0]} rows, "
                             f"not {rows.numel()} (the engine reorders unquantised, unsharded weights)")
        param.data.copy_(param.data[rows.to(param.device)])
    o.weight.data.copy_(o.weight.data[:, q_rows.to(o.weight.device)])


def tensor_parallel_heads(vllm_config, engine: str, tensor_parallel: bool) -> range:
    """The model's KV heads this rank holds (all of them on one device). Refused: pipeline parallelism, tensor
    parallelism where the engine does not run it (`tensor_parallel` False) or where the KV heads do not divide by the
    ranks (vLLM would replicate them)."""
    parallel = vllm_config.parallel_config
    ranks, heads = parallel.tensor_parallel_size, vllm_config.model_config.get_total_num_kv_heads()
    if parallel.pipeline_parallel_size != 1 or (ranks != 1 and not tensor_parallel):
        supported = "tensor parallelism, no pipeline parallelism" if tensor_parallel else "one device"
        raise ValueError(f"the kvpress-rl {engine} runs on {supported} (tensor parallel size {ranks}, pipeline "
                         f"parallel size {parallel.pipeline_parallel_size})")
    if heads % ranks:
        raise ValueError(f"the kvpress-rl {engine} needs the model's {heads} KV heads to divide by the tensor "
                         f"parallel size {ranks} (each rank its own KV heads)")
    from vllm.distributed import get_tensor_model_parallel_rank

    rank, per_rank = (get_tensor_model_parallel_rank() if ranks > 1 else 0), heads // ranks
    return range(rank * per_rank, (rank + 1) * per_rank)


def replace_attention(model: nn.Module, vllm_config, engine: str, make: Callable[[int, Attention], nn.Module]) -> None:
    """Give every decoder layer of `model` (the inner `...Model`) the attention `make(layer index, stock attention)` in
    place of its stock one (`engine`: the engine's name in errors). The stock layer leaves vLLM's forward context (it
    gets no cache); the new module takes its place there (an `Attention` registers itself; a `PlanAttention` is found
    there by its op, `heads.plan_attention`)."""
    forward_context = vllm_config.compilation_config.static_forward_context
    for index, layer in enumerate(model.layers):
        stock = layer.self_attn.attn
        if stock.sliding_window is not None or stock.has_sink or stock.kv_sharing_target_layer_name is not None:
            raise ValueError(f"{stock.layer_name}: the kvpress-rl {engine} runs plain causal attention layers "
                             "(no sliding window, learned sinks or shared KV)")
        forward_context.pop(stock.layer_name)
        layer.self_attn.attn = make(index, stock)
        forward_context.setdefault(stock.layer_name, layer.self_attn.attn)


def group_tags(plan: EnginePlan, per_group: int | None) -> list[list[int]]:
    """Each KV head's group tag, by layer: full heads in order, `per_group` to a tag (None: all one tag, vLLM's own
    grouping); compressed heads 0 (their spec is their own)."""
    tags, seen = [], 0
    for full in plan.full:
        row = []
        for keeps_all in full:
            row.append(seen // per_group if keeps_all and per_group else 0)
            seen += keeps_all
        tags.append(row)
    return tags


def split_attention(model: nn.Module, vllm_config) -> EnginePlan:
    """Give every decoder layer of `model` one attention sub-layer per KV head, as the plan says."""
    plan = EnginePlan.from_json(getattr(vllm_config.model_config.hf_config, OVERRIDES_KEY, None))
    heads = tensor_parallel_heads(vllm_config, "engine", tensor_parallel=True)
    plan.check_shape(len(model.layers), vllm_config.model_config.get_total_num_kv_heads())
    full_heads = plan.num_heads - plan.num_compressed
    per_group = group_layout(full_heads, plan.num_compressed, vllm_config.model_config.max_model_len,
                             vllm_config.cache_config.block_size)
    tags = group_tags(plan, per_group)  # the model's: every rank tags its heads as the others do

    def make(index: int, stock: Attention) -> PlanAttention:
        mine = slice(heads.start, heads.stop)
        return PlanAttention(stock, plan.full[index][mine], plan, vllm_config.cache_config, tags[index][mine],
                             vllm_config.scheduler_config.max_num_seqs, first_head=heads.start)

    replace_attention(model, vllm_config, "engine", make)
    return plan


def gate_attention(model: nn.Module, vllm_config) -> GatedBranch:
    """Give every decoder layer of `model` a `GatedAttention` in place of its stock one."""
    branch = GatedBranch.from_json(getattr(vllm_config.model_config.hf_config, GATED_KEY, None))
    tensor_parallel_heads(vllm_config, "gated engine", tensor_parallel=False)

    def make(index: int, stock: Attention) -> GatedAttention:
        return GatedAttention(stock, branch, vllm_config.cache_config, vllm_config.scheduler_config.max_num_seqs)

    replace_attention(model, vllm_config, "gated engine", make)
    return branch


class HeadwiseModel:
    """Mixed in before a stock vLLM model class: builds it, then gives its layers one attention sub-layer per KV head
    (a head plan, `kvrl_plan`) or the gated attention of RLKV's rollouts (`kvrl_gated`, `gated.py`)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if getattr(vllm_config.model_config.hf_config, GATED_KEY, None) is not None:
            self.kvrl_plan, self.kvrl_gated = None, gate_attention(self.model, vllm_config)
        else:
            self.kvrl_plan, self.kvrl_gated = split_attention(self.model, vllm_config), None

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.kvrl_plan is not None:
            for layer in self.model.layers:
                reorder_heads(layer.self_attn, layer.self_attn.attn.order)
        return loaded

    def kvrl_set_gates(self, gates: torch.Tensor) -> float:
        """The learner's gates, `[layers, kv_heads]`, into a gated engine's layers (`GatedRollouts.set_gates`)."""
        if self.kvrl_gated is None:
            raise ValueError("this engine runs a head plan, not gated attention: it has no gates")
        return set_model_gates(self, gates)


class KvrlLlamaForCausalLM(HeadwiseModel, LlamaForCausalLM):
    pass


class KvrlMistralForCausalLM(HeadwiseModel, MistralForCausalLM):
    pass


class KvrlQwen2ForCausalLM(HeadwiseModel, Qwen2ForCausalLM):
    pass


class KvrlQwen3ForCausalLM(HeadwiseModel, Qwen3ForCausalLM):
    pass
