"""`CompressionPlan`: which KV heads keep the full cache, and what the others keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.policies import Streaming, TokenPolicy
from kvpress_rl.models import ModelShape
from kvpress_rl.scores import HeadScores


def check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise KvrlError(f"sparsity {sparsity:g} is outside [0, 1]")
    return sparsity


@dataclass(frozen=True)
class CompressionPlan:
    """What the executor runs.

    `full` is a bool tensor `[num_layers, num_kv_heads]`: True keeps the whole history; the other
    heads are compressed by `policy` (its budget in tokens per head).
    """

    full: torch.Tensor
    policy: TokenPolicy
    sparsity: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.full.dtype != torch.bool or self.full.ndim != 2:
            raise KvrlError("a plan's `full` must be a bool [layers, kv_heads] tensor")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.full.shape[0], self.full.shape[1])

    @property
    def num_compressed(self) -> int:
        return int((~self.full).sum())

    def check_shape(self, shape: ModelShape) -> None:
        expected = (shape.num_layers, shape.num_kv_heads)
        if self.shape != expected:
            raise KvrlError(
                f"plan has shape {self.shape[0]} layers x {self.shape[1]} KV heads, the model has {expected[0]} x {expected[1]}"
            )

    def tokens_held(self, seq_len: int) -> torch.Tensor:
        """Tokens each head holds after `seq_len` tokens, `[layers, kv_heads]`."""
        compressed = min(seq_len, self.policy.budget(seq_len))
        return torch.where(self.full, torch.tensor(seq_len), torch.tensor(compressed))

    def kv_bytes(self, seq_len: int, batch: int = 1, *, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Exact bytes of keys and values the executor holds for `batch` sequences of `seq_len` tokens."""
        element = torch.empty((), dtype=dtype).element_size()
        return int(self.tokens_held(seq_len).sum()) * 2 * batch * head_dim * element

    def full_kv_bytes(self, seq_len: int, batch: int = 1, *, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return self.full.numel() * seq_len * 2 * batch * head_dim * element

    def summary(self) -> str:
        """Per layer, which KV heads keep the full cache (`F`) and which are compressed (`.`)."""
        lines = [
            f"plan: {self.num_compressed}/{self.full.numel()} KV heads compressed (sparsity {self.sparsity:g}), "
            f"compressed heads keep {self.policy.describe()}"
        ]
        width = len(str(self.shape[0] - 1))
        for layer, row in enumerate(self.full.tolist()):
            marks = "".join("F" if keep else "." for keep in row)
            lines.append(f"layer {layer:>{width}}  {marks}  full: {sum(row)}/{len(row)}")
        return "\n".join(lines)


def rank_heads(scores: torch.Tensor) -> torch.Tensor:
    """Flat head indices from lowest to highest clipped score.

    Ties (e.g. several gates clipped at 1) break by the raw score, then toward the earlier
    (layer, head): stable sorts make the order deterministic on every platform.
    """
    raw = scores.flatten()
    by_raw = torch.sort(raw, stable=True).indices
    clipped = raw.clamp(0.0, 1.0)[by_raw]
    return by_raw[torch.sort(clipped, stable=True).indices]


def plan_from_scores(
    scores: HeadScores | torch.Tensor,
    sparsity: float,
    policy: TokenPolicy | None = None,
) -> CompressionPlan:
    """Rank all KV heads of the model globally and compress the lowest fraction `sparsity`.

    The number of compressed heads is `round(sparsity * num_heads)`; no per-layer quota.
    Scores are clipped to [0, 1] first, as the paper does with its gates (see `rank_heads`).
    """
    sparsity = check_sparsity(sparsity)
    values = scores.scores if isinstance(scores, HeadScores) else torch.as_tensor(scores, dtype=torch.float32)
    num_compressed = int(round(sparsity * values.numel()))
    full = torch.ones(values.numel(), dtype=torch.bool)
    full[rank_heads(values)[:num_compressed]] = False
    source = scores.strategy if isinstance(scores, HeadScores) else ""
    return CompressionPlan(full.reshape(values.shape), policy or Streaming(), sparsity, source)


def token_plan(shape: tuple[int, int], sparsity: float, policy: TokenPolicy) -> CompressionPlan:
    """Every head compressed by a token policy (SnapKV, H2O, R-KV, StreamingLLM)."""
    return CompressionPlan(torch.zeros(shape, dtype=torch.bool), policy, check_sparsity(sparsity), policy.name)
