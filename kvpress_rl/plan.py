"""`CompressionPlan`: which KV heads keep the full cache, and what the others keep."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kvpress_rl.errors import KvrlError
from kvpress_rl.models import ModelShape
from kvpress_rl.policies import TokenPolicy, compressed_head_policy
from kvpress_rl.scores import HeadScores


def check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise KvrlError(f"sparsity {sparsity:g} is outside [0, 1]")
    return sparsity


ESTIMATE_SEQ_LEN = 8192  # defaults of a KV-memory estimate made without a model: an 8k context
ESTIMATE_HEAD_DIM = 128  # and the head dim of the 7B-8B models the paper measures


def kv_bytes_of(head_tokens: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for `head_tokens` tokens, counted once per KV head (and per sequence) holding them."""
    return head_tokens * 2 * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CompressionPlan:
    """What the executor runs.

    `full` is a bool tensor `[num_layers, num_kv_heads]`: True marks the full heads, which keep the whole
    history, or with a `full_policy` (a hybrid plan) what that policy keeps at its budget; the other
    heads are compressed by `policy` (its budget in tokens per head).
    """

    full: torch.Tensor
    policy: TokenPolicy
    sparsity: float = 0.0
    source: str = ""
    rule: str = ""  # how heads were chosen: a `PLAN_RULES` name, or "" for a hand-made plan
    full_policy: TokenPolicy | None = None  # a hybrid plan: the full heads too evict, at their (larger) budget

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
        shape.check_heads_shape(self.shape, "plan has")

    def tokens_held(self, seq_len: int) -> torch.Tensor:
        """Tokens each head holds after `seq_len` tokens, `[layers, kv_heads]`."""
        compressed = min(seq_len, self.policy.budget(seq_len))
        full = seq_len if self.full_policy is None else min(seq_len, self.full_policy.budget(seq_len))
        return torch.where(self.full, torch.tensor(full), torch.tensor(compressed))

    def kv_bytes(self, seq_len: int, batch: int = 1, *, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Exact bytes of keys and values the executor holds for `batch` sequences of `seq_len` tokens."""
        return kv_bytes_of(int(self.tokens_held(seq_len).sum()) * batch, head_dim, dtype)

    def full_kv_bytes(self, seq_len: int, batch: int = 1, *, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return kv_bytes_of(self.full.numel() * seq_len * batch, head_dim, dtype)

    def summary(self) -> str:
        """Per layer, which KV heads keep the full cache (`F`) and which are compressed (`.`)."""
        lines = [
            f"plan: {self.num_compressed}/{self.full.numel()} KV heads compressed (sparsity {self.sparsity:g}"
            f"{', rule ' + self.rule if self.rule else ''}), compressed heads keep {self.policy.describe()}"
            + (f", full heads keep {self.full_policy.describe()}" if self.full_policy is not None else "")
        ]
        width = len(str(self.shape[0] - 1))
        for layer, row in enumerate(self.full.tolist()):
            marks = "".join("F" if keep else "." for keep in row)
            lines.append(f"layer {layer:>{width}}  {marks}  full: {sum(row)}/{len(row)}")
        return "\n".join(lines)


# How `plan_from_scores` turns scores into full / compressed heads.
#   official: the rule of the RLKV and DuoAttention evaluation code (`sparsify_attention_heads`) and of
#             RLKV's SGLang head-mask loader: clip to [0, 1], add uniform noise in [0, 1e-6) drawn from
#             NumPy's seed 42 (ties break at random, not by position), threshold at
#             `numpy.quantile(scores, s)` (linear interpolation) over every (layer, KV head), and keep
#             the full cache where `score >= threshold`: `ceil((n - 1) * s)` heads compressed.
#   round:    compress exactly `round(n * s)` heads, lowest clipped score first, ties by raw score and
#             then by (layer, head) order.
PLAN_RULES = ("official", "round")
OFFICIAL_NOISE_SEED = 42
OFFICIAL_NOISE_SCALE = 1e-6


def check_rule(rule: str) -> str:
    if rule not in PLAN_RULES:
        raise KvrlError(f"unknown plan rule {rule!r}; accepted: {', '.join(PLAN_RULES)}")
    return rule


CLIP_TOLERANCE = 0.02  # how far outside [0, 1] a score may lie before `official_full_heads` warns (published
# gates stray up to 0.0107: Qwen-3-4B-Thinking rlkv.tsv has -0.0106)


def official_full_heads(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask of the heads that keep the full cache under the official RLKV rule (see `PLAN_RULES`)."""
    raw = values.detach().cpu().double().numpy()
    outside = int(((raw < -CLIP_TOLERANCE) | (raw > 1.0 + CLIP_TOLERANCE)).sum())
    if outside:  # published gates stray at most ~0.011 from [0, 1]; other scales lose their order here
        warnings.warn(f"{outside} of {raw.size} head scores lie outside [0, 1] by more than {CLIP_TOLERANCE:g}; the "
                      "official rule clips them to [0, 1], losing their order: rescale the scores to [0, 1] first",
                      stacklevel=2)
    scores = np.clip(raw, 0.0, 1.0)
    noise = np.random.RandomState(OFFICIAL_NOISE_SEED).uniform(0.0, OFFICIAL_NOISE_SCALE, scores.shape)
    scores = scores + noise
    threshold = np.quantile(scores, sparsity)
    return torch.from_numpy(scores >= threshold)


def rank_heads(scores: torch.Tensor) -> torch.Tensor:
    """Flat head indices from lowest to highest clipped score (the `round` rule's order).

    Ties (e.g. several gates clipped at 1) break by the raw score, then toward the earlier
    (layer, head): stable sorts make the order deterministic on every platform.
    """
    raw = scores.flatten()
    by_raw = torch.sort(raw, stable=True).indices
    clipped = raw.clamp(0.0, 1.0)[by_raw]
    return by_raw[torch.sort(clipped, stable=True).indices]


def round_full_heads(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask of the heads that keep the full cache under the `round` rule."""
    full = torch.ones(values.numel(), dtype=torch.bool)
    full[rank_heads(values)[: int(round(sparsity * values.numel()))]] = False
    return full.reshape(values.shape)


def plan_from_scores(
    scores: HeadScores | torch.Tensor,
    sparsity: float,
    compressed_policy: str | TokenPolicy = "streaming",
    rule: str = "official",
) -> CompressionPlan:
    """Rank all KV heads of the model globally (no per-layer quota) and compress the lowest fraction `sparsity`.

    The compressed heads keep what `compressed_policy` chooses: a policy name gives the paper's 80 tokens
    (`streaming`: 16 sink + 64 recent; another name: 80 tokens picked by that policy, a hybrid plan), or
    pass a `TokenPolicy` object. `rule="official"` (default) is the RLKV evaluation's quantile threshold
    with seeded tie-breaking noise; `rule="round"` compresses exactly `round(sparsity * num_heads)`.
    See `PLAN_RULES`. This is the one place a head plan is built.
    """
    sparsity = check_sparsity(sparsity)
    values = scores.scores if isinstance(scores, HeadScores) else torch.as_tensor(scores, dtype=torch.float32)
    if check_rule(rule) == "official" and sparsity < 1.0:
        full = official_full_heads(values, sparsity)
    else:  # s = 1 compresses every head (the official threshold would keep the single highest one)
        full = round_full_heads(values, sparsity)
    source = scores.strategy if isinstance(scores, HeadScores) else ""
    policy = compressed_head_policy(compressed_policy) if isinstance(compressed_policy, str) else compressed_policy
    return CompressionPlan(full.reshape(values.shape), policy, sparsity, source, rule)


def build_plan(selector: Any, scores: HeadScores, sparsity: float, compressed_policy: str | TokenPolicy = "streaming",
               rule: str = "official", full_policy: TokenPolicy | None = None) -> CompressionPlan:
    """The plan of a strategy at `sparsity`, the one place plans are built from a strategy's scores.

    A token strategy (`selector.kind == "token"`) compresses every head with `selector.make_policy(sparsity)`
    (its budget matches head sparsity in KV memory); a head strategy ranks its scores globally with
    `plan_from_scores`, its compressed heads keeping 80 tokens chosen by `compressed_policy` and, with a
    `full_policy` (`policies.full_head_policy`), its full heads what that policy keeps at its budget.
    """
    if selector.kind == "token":
        return token_plan(scores.shape, sparsity, selector.make_policy(check_sparsity(sparsity)))
    plan = plan_from_scores(scores, sparsity, compressed_policy, rule)
    return replace(plan, full_policy=full_policy) if full_policy is not None else plan


def token_plan(shape: tuple[int, int], sparsity: float, policy: TokenPolicy) -> CompressionPlan:
    """Every head compressed by a token policy (SnapKV, H2O, R-KV, StreamingLLM)."""
    return CompressionPlan(torch.zeros(shape, dtype=torch.bool), policy, check_sparsity(sparsity), policy.name, "token")
