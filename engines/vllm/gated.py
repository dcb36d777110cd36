"""The gated model in vLLM, for RLKV's rollouts: every head keeps its whole cache and outputs
`alpha * full + (1 - alpha) * streaming`, the learner's gated attention (`kvpress_rl.executor.gated`).

Each decoder layer's attention becomes one `GatedAttention` (`models.gate_attention`) built from a head plan's parts:
every KV head is two one-head sub-layers (`sublayers.py`), `kvh{j}` with the full cache and `stream{j}` with a
second, sink + window cache of the same keys (what a compressed head keeps; its middle blocks go back to vLLM's pool,
so it costs about 80 / L of the full cache). Per layer and step:

- the full branch: every head through the platform's kernel in one call (`heads.FullHeads`, vLLM's CPU kernel here);
- the streaming branch: every head in one batched attention over its kept keys (`heads.CompressedHeads`), prompts
  in bands of queries over their kept keys under the learner's streaming mask (token-exact sink + window, or the
  official blocks: `streaming_cache`; `kept_attention.PromptBands`);
- the two outputs mixed per KV head by the gates (`mix_branches`, as the learner's).

Positions are the request's own (vLLM has no padding), which is what the learner's rank-based masks count. A prompt is
prefilled in one step (the engine's default); a request recomputed after a preemption is one prefill of its prompt
and its tokens, under the same masks, so its answer does not change. The gates are a float32 `[kv_heads]` buffer of
each layer, replaced in place after every learner step through `collective_rpc` (`GatedRollouts.set_gates`): the
engine is never restarted.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention

from kvpress_rl.engines.vllm.heads import CompressedHeads, FullHeads, OpAttention
from kvpress_rl.engines.vllm.sublayers import FullHeadAttention, SinkWindowAttention, full_backend
from kvpress_rl.executor.gated import mix_branches
from kvpress_rl.sampling import GatedBranch


def streaming_cache(branch: GatedBranch) -> tuple[int, int, int]:
    """`(sink, window, block)` of the streaming branch's cache (`cache.SinkWindowSpec`): a decoding token at
    position `c` reads the sinks, positions `c - window .. c - 1` and itself (`kept_attention.kept_positions`); with
    `block`, only the sinks' blocks and the recent keys of its own block and the ones before it are valid."""
    if branch.mask == "token":
        return branch.sink, branch.window - 1, 0
    size = branch.block_size
    return -(-branch.sink // size) * size, -(-branch.window // size) * size - 1, size


class GatedAttention(OpAttention):
    """Takes the place of one layer's attention in the gated model: its full and streaming branches over every head,
    mixed by its gates (float32, `[kv_heads]`, 1.0 until the learner sends its own). `max_requests`: vLLM's
    `max_num_seqs`."""

    def __init__(self, stock: Attention, branch: GatedBranch, cache_config, max_requests: int) -> None:
        super().__init__()
        self.num_kv_heads, self.head_size = stock.num_kv_heads, stock.head_size
        self.group = stock.num_heads // stock.num_kv_heads
        self.layer_name = stock.layer_name  # the stock layer's place in vLLM's forward context, now this module's
        self.branch = branch
        scale, backend = float(stock.impl.scale), full_backend()
        sink, window, block = streaming_cache(branch)
        common = dict(num_kv_heads=1, cache_config=cache_config)
        full, stream = [], []
        for j in range(self.num_kv_heads):
            full.append(f"{stock.layer_name}.kvh{j}")
            self.add_module(f"kvh{j}", FullHeadAttention(self.group, self.head_size, scale, **common, prefix=full[-1],
                                                         group_tag=0, attn_backend=backend))
        for j in range(self.num_kv_heads):
            stream.append(f"{stock.layer_name}.stream{j}")
            self.add_module(f"stream{j}", SinkWindowAttention(self.group, self.head_size, scale, **common,
                                                              prefix=stream[-1], sink=sink, window=window, block=block,
                                                              windowed_prompts=True))
        self.full_heads = FullHeads(full, self.group)
        self.streaming_heads = CompressedHeads(stream, self.group, self.head_size, scale, max_requests,
                                               windowed_prompts=True)
        self.register_buffer("gates", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor) -> None:
        """q `[T, H * G * D]`, k and v `[T, H * D]`, output `[T, H * G * D]` (written)."""
        tokens, heads, g, d = q.shape[0], self.num_kv_heads, self.group, self.head_size
        q = q.view(tokens, heads * g, d)
        k, v = k.view(tokens, heads, d), v.view(tokens, heads, d)
        full = output.view(tokens, heads * g, d)
        self.full_heads(q, k, v, full)
        streaming = torch.empty_like(full)
        self.streaming_heads(q, k, v, streaming)
        full.copy_(mix_branches(full, streaming, self.gates.clamp(0.0, 1.0), groups=g, axis=-2))


def set_model_gates(model: nn.Module, gates: torch.Tensor) -> float:
    """Copy `gates` (`[layers, kv_heads]`) into the layers' buffers; returns their sum as the engine now holds them."""
    layers = list(model.model.layers)
    kv_heads = layers[0].self_attn.attn.num_kv_heads
    if tuple(gates.shape) != (len(layers), kv_heads):
        raise ValueError(f"gates of shape {tuple(gates.shape)} for a model of {len(layers)} layers x "
                         f"{kv_heads} KV heads")
    for layer, row in zip(layers, gates):
        layer.self_attn.attn.gates.copy_(row)
    return float(sum(layer.self_attn.attn.gates.double().sum() for layer in layers))
