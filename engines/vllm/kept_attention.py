"""A compressed head's decoding attention over its kept keys, in plain torch (no vLLM: the GPU check runs it alone), and
the gated model's streaming branch over a step's prompts (from position 0, or going on from a cached prefix).

A decoding step reads, for every request and compressed head, the cache rows of its sinks, its window and its own new
token (`kept_positions`), at most `sink + window + 1` (`paged_rows.PagedRows.read`); padding entries are masked. Both
products are explicit: at one query and 81 keys a head, SDPA's CPU kernel costs about ten times the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpress_rl.masks import streaming_mask
from kvpress_rl.sampling import GatedBranch


def kept_positions(computed: torch.Tensor, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(positions, valid)` `[R, sink + window + 1]` of what a compressed head reads in a step that starts with
    `computed` cached tokens: the sinks, the window (`layout.kept_history`, padded) and position `computed` itself.
    Invalid entries point at position 0, which every request has written before it reads."""
    c = computed.long().clamp_min(0)[:, None]  # CUDA-graph padding rows have no tokens
    sinks = torch.arange(sink, device=computed.device)[None]
    start = torch.clamp(c - window, min=sink)
    recent = start + torch.arange(window, device=computed.device)[None]
    positions = torch.cat([sinks.expand(c.shape[0], -1), recent, c], dim=1)
    valid = torch.cat([sinks < c, recent < c, torch.ones_like(c, dtype=torch.bool)], dim=1)
    return torch.where(valid, positions, 0), valid


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


def streaming_prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               spans: list[tuple[int, int]], branch: GatedBranch, scale: float,
                               output: torch.Tensor) -> None:
    """The gated model's streaming branch over a step's prompts (`(start, end)` token spans, nothing cached before
    them), in one SDPA: the prompts left-padded into a batch under the learner's `streaming_mask`, as the learner's own
    left-padded batches. `query` `[T, Hq, D]`, `key` and `value` `[T, Hkv, D]`; writes `output[start:end]`."""
    longest, device = max(end - start for start, end in spans), query.device
    batch = [torch.zeros((len(spans), t.shape[1], longest, t.shape[2]), dtype=t.dtype, device=device)
             for t in (query, key, value)]
    real = torch.zeros((len(spans), longest), dtype=torch.bool, device=device)
    for row, (start, end) in enumerate(spans):
        for padded, tokens in zip(batch, (query, key, value)):
            padded[row, :, longest - (end - start):] = tokens[start:end].transpose(0, 1)
        real[row, longest - (end - start):] = True
    causal = torch.ones((longest, longest), dtype=torch.bool, device=device).tril()
    allowed = causal[None, None] & real[:, None, None, :]
    mask = streaming_mask(allowed, longest, longest, branch.sink, branch.window, device, mode=branch.mask,
                          block_size=branch.block_size)
    out = F.scaled_dot_product_attention(*batch, attn_mask=mask, scale=scale, enable_gqa=True)  # [P, Hq, n, D]
    for row, (start, end) in enumerate(spans):
        output[start:end] = out[row, :, longest - (end - start):].transpose(0, 1).to(output.dtype)


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


def streaming_chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              chunks: list[tuple[int, int, int]], history: tuple[torch.Tensor, torch.Tensor],
                              history_positions: torch.Tensor, history_valid: torch.Tensor,
                              rule: tuple[int, int, int], scale: float, output: torch.Tensor) -> None:
    """The gated model's streaming branch over a step's prompts that go on from a cached prefix (`(start, end,
    computed)` token spans), in one SDPA: each chunk's tokens over its kept history (its sinks and the window before
    `computed`, read from the cache: `history` keys and values `[S, C, K, D]`, their positions and validity `[S, K]`)
    and its own tokens, under `streaming_keys` (`rule`: `(sink, window, block)`). `query` `[T, Hq, D]`, `key` and
    `value` `[T, C, D]`; writes `output[start:end]`."""
    longest, device = max(end - start for start, end, _ in chunks), query.device
    own = [torch.zeros((len(chunks), t.shape[1], longest, t.shape[2]), dtype=t.dtype, device=device)
           for t in (query, key, value)]
    positions = torch.full((len(chunks), longest), -1, dtype=torch.long)
    for row, (start, end, computed) in enumerate(chunks):
        for padded, tokens in zip(own, (query, key, value)):
            padded[row, :, : end - start] = tokens[start:end].transpose(0, 1)
        positions[row, : end - start] = torch.arange(computed, computed + end - start)
    positions = positions.to(device)
    real = positions >= 0
    keys_positions = torch.cat([history_positions, positions], dim=1)  # [S, K + n]
    allowed = streaming_keys(positions, keys_positions, *rule) & torch.cat([history_valid, real], dim=1)[:, None]
    allowed = allowed | ~real[:, :, None]  # padding queries read anything: their rows are dropped
    keys, values = (torch.cat([old.to(new.dtype), new], dim=2) for old, new in zip(history, own[1:]))
    out = F.scaled_dot_product_attention(own[0], keys, values, attn_mask=allowed[:, None], scale=scale,
                                         enable_gqa=True)  # [S, Hq, n, D]
    for row, (start, end, _) in enumerate(chunks):
        output[start:end] = out[row, :, : end - start].transpose(0, 1).to(output.dtype)
