"""Attention masks, in plain torch: one definition of each, shared by the executor, the gated attention and the vLLM
engine (no transformers, no vLLM).

- `history_causal_mask`: a step's queries over the keys cached before the step (all of them, or the kept ones) and
  the step's own keys up to each query. A prompt prefilled in one step is its plain causal case (no history).
- `streaming_mask`: what the streaming branch of the gated attention sees (RLKV, DuoAttention), by `mode`:

  - `"token"`: the first `sink` real keys and the last `window` keys up to the query (a token-exact
    sink + window, as evaluation compresses).
  - `"block"`: the official RLKV training kernel (Block-Sparse-Attention's streaming mask): keys in
    blocks of `block_size` tokens; the first `ceil(sink / block_size)` blocks, and the last
    `ceil(window / block_size)` blocks counted back from the query's own block, which is included
    (causally, up to the query). At sink 128 / window 256 / blocks of 128 a query therefore sees
    between 257 and 384 keys (block 0, the previous block, and its own block up to itself).

  Positions are counted over real tokens: a key's position is its rank among the row's real keys and a
  query's position is its own rank, so left padding shifts no block boundary and no window.
"""

from __future__ import annotations

import torch

from kvpress_rl.errors import KvrlError

TRAIN_SINK = 128  # the official training's streaming branch: 128 sink + 256 recent tokens, in blocks of 128
TRAIN_WINDOW = 256
BLOCK_SIZE = 128
MASKS = ("token", "block")


def history_causal_mask(history: int | torch.Tensor, new: int, *, device: torch.device | str | None = None,
                        causal: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each of a step's `new` queries sees, bool `[..., new, h + new]`: the `h` keys cached before the step
    (all of them when `history` is their count `h`; the kept ones when it is a bool `[..., h]`), then the step's own
    keys up to the query's own. `causal` `[..., new, new]`: the model's own mask of the step's keys (with its padding)
    in place of the plain causal one."""
    if isinstance(history, int):
        return torch.ones((new, history + new), dtype=torch.bool, device=device).tril(diagonal=history)
    if causal is None:
        causal = torch.ones((new, new), dtype=torch.bool, device=history.device).tril()
    batch, kept = history.shape[:-1], history.shape[-1]
    return torch.cat([history[..., None, :].expand(*batch, new, kept), causal.expand(*batch, new, new)], dim=-1)


def streaming_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, sink: int, window: int, device,
                   *, mode: str = "token", block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Bool `(batch or 1, 1, q_len, kv_len)`: causal, not padding, and a sink or recent key (see the module)."""
    if attention_mask is None:
        allowed = history_causal_mask(kv_len - q_len, q_len, device=device)[None, None]
        rank = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    else:
        allowed = attention_mask.bool()
        key_valid = allowed[:, :, -1:, :]  # the last query sees every real key
        rank = key_valid.long().cumsum(-1) - 1  # position among the row's real tokens
    query_rank = rank[..., kv_len - q_len:].transpose(-1, -2)  # (batch, 1, q_len, 1)
    if mode == "token":
        recent = query_rank - rank < window
        first = rank < sink
    elif mode == "block":
        query_block, key_block = query_rank // block_size, rank // block_size
        recent = query_block - key_block < -(-window // block_size)
        first = key_block < -(-sink // block_size)
    else:
        raise KvrlError(f"streaming mask must be one of {', '.join(MASKS)}, got {mode!r}")
    mask = allowed & (first | recent)
    if attention_mask is not None:  # rows that would be empty (padding queries) keep the model's own row
        mask = torch.where(mask.any(-1, keepdim=True), mask, allowed)
    return mask
