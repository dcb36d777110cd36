"""A compressed head's decoding attention over its kept keys, in plain torch (no vLLM: the GPU check runs it alone), and
the gated model's streaming branch over a step's prompts (from position 0, or going on from a cached prefix).

A decoding step reads, for every request and compressed head, the cache rows of its sinks, its window and its own new
token (`kept_positions`), at most `sink + window + 1` (`paged_rows.PagedRows.read`); padding entries are masked. Both
products are explicit: at one query and 81 keys a head, SDPA's CPU kernel costs about ten times the arithmetic.

A prompt's streaming branch is banded too (`PromptBands`): blocks of 64 queries, each over the sinks and the
`window + 64` keys before it, so its work and its temporaries grow with the step's tokens (at most vLLM's
`max_num_batched_tokens`), not with their square; the indices are built once per step by the metadata builder.

On CUDA, vLLM sizes its cache from the peak memory of a profile run, a forward of `max_num_batched_tokens` tokens
without attention metadata (its CPU worker takes `VLLM_CPU_KVCACHE_SPACE`, or the memory left after a warm-up). So
that a layer's temporaries are counted there, its compressed heads attend on the largest step of that many tokens
(`worst_step_attention`): decoding rows up to `max_num_seqs` (the most `heads.CompressedHeads` attends at once), then,
for the gated model, the most bands a step can make (`most_prompt_blocks`, `worst_prompt_bands`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUERY_BLOCK = 64  # prompt queries the gated model's streaming branch attends together (`PromptBands`)


def kept_positions(computed: torch.Tensor, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(positions, valid)` `[R, sink + window + 1]` of what a compressed head reads in a step that starts with
    `computed` cached tokens: the sinks, the window (`layout.kept_history`, padded) and position `computed` itself.
    Invalid entries point at position 0, which every request has written before it reads."""
    c = computed.long().clamp_min(0)[:, None]  # CUDA-graph padding rows have no tokens
    sinks = torch.arange(sink, device=computed.device)[None]
    start = window_start(c, sink, window)
    recent = start + torch.arange(window, device=computed.device)[None]
    positions = torch.cat([sinks.expand(c.shape[0], -1), recent, c], dim=1)
    valid = torch.cat([sinks < c, recent < c, torch.ones_like(c, dtype=torch.bool)], dim=1)
    return torch.where(valid, positions, 0), valid


def window_start(computed: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """The first position of the kept window of a step that starts with `computed` cached tokens
    (`layout.kept_history`): `window` back, never among the sinks."""
    return torch.clamp(computed - window, min=sink)


def decode_over_kept(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor, valid: torch.Tensor, scale: float,
                     group: int) -> torch.Tensor:
    """One decoding token per request: `keys` and `values` `[R, C, K, D]` (in the cache's dtype) the kept entries each
    request's compressed heads read, `query` `[R, C * G, D]`, `valid` `[R, K]`. Returns `[R, C * G, D]` in float32.
    Scores and softmax in float32; the weights meet the values in the cache's dtype, as flash attention kernels do."""
    requests, heads, _, d = keys.shape
    q = query.view(requests, heads, group, d).float()
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # [R, C, G, K]
    weights = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    return torch.matmul(weights.to(values.dtype), values).float().view(requests, heads * group, d)


def streaming_keys(query_positions: torch.Tensor, key_positions: torch.Tensor, sink: int, window: int,
                   block: int) -> torch.Tensor:
    """Bool `[..., n, K]`: which keys (positions `[..., K]`) each query (positions `[..., n]`) of the streaming branch
    reads: causal, and a sink or one of its last `window` positions (with `block`, only the recent keys of its own
    block and the `(window + 1) // block - 1` before it), the rule `backend.kept_slots` applies to a decoding token."""
    p, k = query_positions[..., :, None], key_positions[..., None, :]
    first_recent = p - window
    if block:
        first_recent = torch.maximum(first_recent, (p // block - (window + 1) // block + 1) * block)
    return (k <= p) & ((k < sink) | (k >= first_recent))


@dataclass
class PromptBands:
    """The gated model's streaming branch over a step's prompt chunks, as blocks of `query_block` consecutive queries
    of one chunk, each over the keys any of them can read: the sinks and the `window + query_block` positions that end
    with the block. Keys are indices into `[chunk histories | step tokens]`: a chunk's `sink + window` kept positions
    before the tokens it had cached (`kept_positions`, read from the cache), then the step's own keys. Built once per
    step (`prompt_bands`), so a layer's branch is two gathers and one attention whose size grows with the step's
    tokens, never with their square."""

    query_tokens: torch.Tensor  # [blocks, Q] the step's token of each query (a block's tail past its chunk: its last)
    key_index: torch.Tensor  # [blocks, Kb] each key's row in `[S * (sink + window) history | T step tokens]`
    allowed: torch.Tensor  # [blocks, Q, Kb] bool, `streaming_keys` over valid keys (a tail query: every key)
    real_queries: torch.Tensor  # [N] the real queries among `blocks * Q`, in the order of `tokens`
    tokens: torch.Tensor  # [N] their tokens in the step


def prompt_bands(chunks: list[tuple[int, int, int]], history_valid: torch.Tensor, rule: tuple[int, int, int],
                 query_block: int = QUERY_BLOCK) -> PromptBands:
    """`PromptBands` of a step's prompt chunks `(start, end, computed)` (token span in the step, tokens cached
    before it), whose histories have validity `history_valid` `[S, sink + window]` (`kept_positions` without the
    chunk's own position: in the step's kept slots, the rows after the decoding rows). `rule`: `(sink, window,
    block)`. Only host data vLLM already keeps are read (the spans); every index is computed on `history_valid`'s
    device."""
    sink, window, block = rule
    device, history = history_valid.device, sink + window
    blocks = [(s, offset) for s, (start, end, _) in enumerate(chunks) for offset in range(0, end - start, query_block)]
    real, tokens = [], []  # the real queries of the blocks (a chunk's last block may end past it) and their tokens
    for b, (s, offset) in enumerate(blocks):
        count = min(query_block, chunks[s][1] - chunks[s][0] - offset)
        real.extend(range(b * query_block, b * query_block + count))
        tokens.extend(range(chunks[s][0] + offset, chunks[s][0] + offset + count))
    per_block = [(s, offset, chunks[s][0], chunks[s][1] - chunks[s][0], chunks[s][2]) for s, offset in blocks]
    block_chunks, offsets, starts, lengths, computed = on_device(per_block, device).T[..., None]  # each [blocks, 1]
    queries = offsets + torch.arange(query_block, device=device)  # [blocks, Q] offsets in the chunk
    query_positions = computed + queries
    recent = computed + offsets - window + torch.arange(window + query_block, device=device)
    key_positions = torch.cat([torch.arange(sink, device=device).expand(len(blocks), -1), recent], dim=1)
    cached = key_positions < computed
    slot = torch.where(key_positions < sink, key_positions, sink + key_positions - window_start(computed, sink, window))
    slot = slot.clamp(0, history - 1)
    own = (key_positions - computed).clamp(min=0)
    step_token = starts + torch.minimum(own, lengths - 1)
    key_index = torch.where(cached, block_chunks * history + slot, len(chunks) * history + step_token)
    is_sink = torch.arange(key_positions.shape[1], device=device)[None] < sink
    valid = torch.where(cached, history_valid[block_chunks.expand_as(slot), slot], own < lengths)
    valid &= (is_sink | (key_positions >= sink)) & (key_positions >= 0)  # a recent key below `sink` is a sink
    tail = queries >= lengths
    allowed = (streaming_keys(query_positions, key_positions, sink, window, block) & valid[:, None]) | tail[..., None]
    return PromptBands(query_tokens=starts + torch.minimum(queries, lengths - 1), key_index=key_index,
                       allowed=allowed, real_queries=on_device(real, device), tokens=on_device(tokens, device))


def most_prompt_blocks(tokens: int, chunks: int, query_block: int = QUERY_BLOCK) -> int:
    """The most blocks `prompt_bands` makes of a step of at most `tokens` prompt tokens in at most `chunks` chunks
    (a chunk has two tokens or more: one is a decoding row): chunk `i` of `n_i` tokens makes
    `1 + (n_i - 1) // query_block`, at most `S + (tokens - S) // query_block` over `S` chunks, the most at the most
    chunks. Reached when the chunks but one have `query_block + 1` tokens (and the last two or more)."""
    chunks = min(chunks, tokens // 2)
    return chunks + (tokens - chunks) // query_block


def worst_prompt_bands(tokens: int, chunks: int, rule: tuple[int, int, int], device: torch.device,
                       query_block: int = QUERY_BLOCK) -> tuple[PromptBands, int]:
    """`(bands, chunks)` of the shapes of the largest step `prompt_bands` can make of `tokens` prompt tokens in
    `chunks` chunks at most (`most_prompt_blocks`), every key allowed: what vLLM's profile run attends on, so that
    the step's temporaries are counted when it sizes the cache. Its keys index the first row."""
    sink, window, _ = rule
    blocks, chunks = most_prompt_blocks(tokens, chunks, query_block), min(chunks, tokens // 2)
    queries = min(tokens, blocks * query_block)
    zeros = torch.zeros((blocks, sink + window + query_block), dtype=torch.long, device=device)
    bands = PromptBands(query_tokens=torch.zeros((blocks, query_block), dtype=torch.long, device=device),
                        key_index=zeros, allowed=torch.ones((blocks, query_block, zeros.shape[1]), dtype=torch.bool,
                                                            device=device),
                        real_queries=torch.arange(queries, device=device), tokens=torch.arange(queries, device=device))
    return bands, chunks


def worst_step_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
                         rule: tuple[int, int, int], scale: float, max_requests: int, windowed_prompts: bool) -> None:
    """vLLM's profile run: a layer's compressed heads attend as the largest step of `query`'s `T` tokens would, on
    zeros in the cache's place, so the allocator's peak, which sizes the cache, holds their temporaries. `query`
    `[T, C * G, D]`, `key` and `value` `[T, C, D]`, `rule` `(sink, window, block)`, `max_requests` vLLM's
    `max_num_seqs` (the most decoding rows attended at once). With `windowed_prompts` (the gated model), then the
    most prompt bands of `T` tokens. A head plan's prompts are prefilled from position 0 in one step (the engine's
    `exact_prefill`) by the platform's own causal attention, not counted here; a chunk going on from a cached prefix
    happens only with chunked prefill, which head plans turn off."""
    tokens, heads, d = key.shape
    kept, rows, group = rule[0] + rule[1], min(tokens, max_requests), query.shape[1] // heads

    def cache_rows(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:  # keys and values, as `PagedRows.read` gives
        keys, values = (torch.zeros((*shape, d), dtype=key.dtype, device=key.device) for _ in range(2))
        return keys, values

    valid = torch.ones((rows, kept + 1), dtype=torch.bool, device=key.device)
    decode_over_kept(*cache_rows(rows, heads, kept + 1), query[:rows], valid, scale, group)
    if windowed_prompts:
        bands, chunks = worst_prompt_bands(tokens, max_requests, rule, key.device)
        banded_prompt_attention(query, key, value, cache_rows(chunks, heads, kept), bands, scale, output)


def on_device(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def banded_prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            history: tuple[torch.Tensor, torch.Tensor], bands: PromptBands, scale: float,
                            output: torch.Tensor) -> None:
    """The gated model's streaming branch over a step's prompt chunks (`prompt_bands`), in one SDPA over blocks of
    queries: `query` `[T, C * G, D]`, `key` and `value` `[T, C, D]`, `history` the chunks' kept keys and values
    `[S, C, sink + window, D]` (in the cache's dtype); writes the chunks' tokens of `output`."""
    chunks, heads, kept, d = history[0].shape
    keys, values = (torch.cat([old.transpose(1, 2).reshape(chunks * kept, heads, d).to(new.dtype), new])[
        bands.key_index].transpose(1, 2) for old, new in zip(history, (key, value)))  # [blocks, C, Kb, D]
    q = query[bands.query_tokens].transpose(1, 2)  # [blocks, C * G, Q, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bands.allowed[:, None], scale=scale,
                                         enable_gqa=True)
    out = out.transpose(1, 2).reshape(-1, query.shape[1], d)[bands.real_queries]
    output.index_copy_(0, bands.tokens, out.to(output.dtype))
