"""Token policies: which tokens a compressed KV head keeps when it holds more than its budget.

Every policy scores the slots a head holds (`keep_scores`, higher = keep; `+inf` = must keep,
`-inf` = padding) and the cache keeps the `budget` best, in their original order. Policies that
rank by attention (`needs_attention`) receive, through `observe`, the attention probabilities of
new queries over the slots, summed over the query heads of each KV group.

Shapes: `keys (batch, kv_heads, slots, head_dim)`, `valid (batch, 1 or kv_heads, slots)`,
statistics `(batch, kv_heads, ..., slots)` with the slot dimension last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvpress_rl.errors import KvrlError

SINK_TOKENS = 16
WINDOW_TOKENS = 64
BUDGET_BASE = SINK_TOKENS + WINDOW_TOKENS  # the paper's "+ 80"


@dataclass(frozen=True)
class Budget:
    """How many tokens a compressed head may hold: `fixed`, or `int(seq_len * (1 - sparsity)) + base`.

    The growing form gives a token-dropping strategy the same KV memory as head sparsity `s`
    (RLKV paper, baselines section).
    """

    fixed: int | None = None
    sparsity: float | None = None
    base: int = BUDGET_BASE

    def __post_init__(self) -> None:
        if (self.fixed is None) == (self.sparsity is None):
            raise KvrlError("a budget is either fixed=N or sparsity=s, not both or neither")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise KvrlError(f"sparsity {self.sparsity} is outside [0, 1]")
        if self.fixed is not None and self.fixed < 1:
            raise KvrlError(f"a fixed budget must be at least 1 token, got {self.fixed}")

    def tokens(self, seq_len: int) -> int:
        if self.fixed is not None:
            return self.fixed
        return int(seq_len * (1.0 - self.sparsity)) + self.base

    def describe(self) -> str:
        return f"{self.fixed} tokens" if self.fixed is not None else f"int(L*(1-{self.sparsity:g}))+{self.base}"


class TokenPolicy:
    """Base class: subclasses are frozen dataclasses with a `name` and their options."""

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False

    def budget(self, seq_len: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def slack(self) -> int:
        """Tokens a head may hold above its budget before it is compressed (R-KV's buffer)."""
        return 0

    def new_stats(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Empty per-slot statistics for `keys`' heads (zeros), slot dimension last; new slots get zeros."""
        return {}

    def observe(self, stats: dict[str, torch.Tensor], probs: torch.Tensor) -> None:
        """Fold attention probabilities `(batch, kv_heads, queries, slots)` into `stats`."""

    def keep_scores(self, keys: torch.Tensor, valid: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            parts.append(f"budget={value.describe()}" if isinstance(value, Budget) else f"{f.name}={value}")
        return f"{self.name}({', '.join(parts)})"


def _slot_index(valid: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=valid.device).expand(valid.shape[:-1] + (n,))


def _protect(scores: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    scores = torch.where(protected, torch.full_like(scores, math.inf), scores)
    return torch.where(valid | protected, scores, torch.full_like(scores, -math.inf))


def _recent(valid: torch.Tensor, n: int, count: int) -> torch.Tensor:
    return _slot_index(valid, n) >= n - count


@dataclass(frozen=True)
class Streaming(TokenPolicy):
    """StreamingLLM (Xiao et al. 2024, arXiv 2309.17453): the first `sink` tokens + the most recent.

    By default a head keeps `sink + window` tokens (RLKV's compressed heads: 16 + 64). With a
    `budget_spec` the recent window fills that budget instead (the token-dropping baseline).
    Sinks are the first *real* tokens of each sequence; left padding never counts.
    """

    name: ClassVar[str] = "streaming"
    sink: int = SINK_TOKENS
    window: int = WINDOW_TOKENS
    budget_spec: Budget | None = None

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise KvrlError(f"streaming needs sink >= 0 and window >= 1 (a budget of at least sink + 1), got sink={self.sink}, window={self.window}")
        if self.budget_spec is not None:
            _check_budget(self.budget_spec, self.sink + 1, self.name)

    def budget(self, seq_len: int) -> int:
        return self.sink + self.window if self.budget_spec is None else self.budget_spec.tokens(seq_len)

    def keep_scores(self, keys, valid, stats):
        # Sinks are protected; the rest rank by recency, so the top `budget` are sinks + newest.
        n = keys.shape[2]
        valid = valid.expand(keys.shape[:3])
        rank = valid.long().cumsum(-1) - 1
        return _protect(_slot_index(valid, n).float(), valid & (rank < self.sink), valid)


def _check_budget(budget: Budget, minimum: int, name: str) -> None:
    if budget.fixed is not None and budget.fixed < minimum:
        raise KvrlError(f"{name}: a budget of {budget.fixed} tokens is smaller than its protected window + 1 ({minimum})")


@dataclass(frozen=True)
class SnapKV(TokenPolicy):
    """SnapKV (Li et al. 2024, arXiv 2404.14469): keep the tokens the last `window` queries attend to.

    Scores are the attention of the observation window (summed over the query heads of the KV
    group), smoothed by average pooling with `kernel`; the observation window itself is always kept.
    During decoding the window slides with the newest queries.
    """

    name: ClassVar[str] = "snapkv"
    needs_attention: ClassVar[bool] = True
    budget_spec: Budget = field(default_factory=lambda: Budget(sparsity=0.5))
    window: int = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        _check_budget(self.budget_spec, self.window + 1, self.name)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise KvrlError(f"snapkv: kernel must be an odd positive size, got {self.kernel}")

    def budget(self, seq_len: int) -> int:
        return self.budget_spec.tokens(seq_len)

    def new_stats(self, keys):
        b, h, n, _ = keys.shape
        return {"window_attention": keys.new_zeros((b, h, 0, n), dtype=torch.float32)}

    def observe(self, stats, probs):
        rows = torch.cat([stats["window_attention"], probs.float()], dim=2)
        stats["window_attention"] = rows[:, :, -self.window :]

    def keep_scores(self, keys, valid, stats):
        n = keys.shape[2]
        valid = valid.expand(keys.shape[:3])
        score = stats["window_attention"].sum(dim=2)
        b, h, _ = score.shape
        score = F.avg_pool1d(score.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, n)
        return _protect(score, _recent(valid, n, self.window), valid)


@dataclass(frozen=True)
class H2O(TokenPolicy):
    """H2O (Zhang et al. 2023, arXiv 2306.14048): half heavy hitters, half recent tokens.

    Heavy hitters rank by attention accumulated over every query so far, summed over the query
    heads of the KV group.
    """

    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[bool] = True
    budget_spec: Budget = field(default_factory=lambda: Budget(sparsity=0.5))

    def __post_init__(self) -> None:
        _check_budget(self.budget_spec, 2, self.name)

    def budget(self, seq_len: int) -> int:
        return self.budget_spec.tokens(seq_len)

    def new_stats(self, keys):
        b, h, n, _ = keys.shape
        return {"accumulated_attention": keys.new_zeros((b, h, n), dtype=torch.float32)}

    def observe(self, stats, probs):
        stats["accumulated_attention"] += probs.float().sum(dim=2)

    def keep_scores(self, keys, valid, stats):
        n = keys.shape[2]
        valid = valid.expand(keys.shape[:3])
        budget = min(n, self.budget(n))
        recent = budget - budget // 2
        return _protect(stats["accumulated_attention"].clone(), _recent(valid, n, recent), valid)


@dataclass(frozen=True)
class RKV(TokenPolicy):
    """R-KV (Cai et al. 2025, arXiv 2505.24133): importance mixed with key redundancy.

    importance = max-pooled attention of the last `window` queries; redundancy = mean cosine
    similarity of a key to the other keys of its head (softmax-normalised); score =
    `mix * importance - (1 - mix) * redundancy`. Compression runs when a head holds `buffer`
    tokens above its budget (paper's baseline: window 8, kernel 7, mix 0.1, buffer 128).
    """

    name: ClassVar[str] = "rkv"
    needs_attention: ClassVar[bool] = True
    budget_spec: Budget = field(default_factory=lambda: Budget(sparsity=0.5))
    window: int = 8
    kernel: int = 7
    mix: float = 0.1
    buffer: int = 128

    def __post_init__(self) -> None:
        _check_budget(self.budget_spec, self.window + 1, self.name)
        if not 0.0 <= self.mix <= 1.0:
            raise KvrlError(f"rkv: mix must lie in [0, 1], got {self.mix}")
        if self.buffer < 0 or self.kernel < 1 or self.kernel % 2 == 0:
            raise KvrlError("rkv: buffer must be >= 0 and kernel an odd positive size")

    def budget(self, seq_len: int) -> int:
        return self.budget_spec.tokens(seq_len)

    def slack(self) -> int:
        return self.buffer

    new_stats = SnapKV.new_stats
    observe = SnapKV.observe

    def keep_scores(self, keys, valid, stats):
        b, h, n, _ = keys.shape
        valid = valid.expand(keys.shape[:3])
        attention = stats["window_attention"]
        importance = attention.mean(dim=2) if attention.shape[2] else attention.new_zeros((b, h, n))
        importance = F.max_pool1d(importance.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, n)
        importance = importance / importance.sum(-1, keepdim=True).clamp_min(1e-12)
        unit = F.normalize(keys.float(), dim=-1)
        similarity = unit @ unit.transpose(-1, -2)
        similarity.diagonal(dim1=-2, dim2=-1).zero_()
        pair_valid = valid[..., :, None] & valid[..., None, :]
        similarity = similarity.masked_fill(~pair_valid, 0.0)
        redundancy = similarity.sum(-1) / (valid.sum(-1, keepdim=True) - 1).clamp_min(1)
        redundancy = torch.softmax(redundancy.masked_fill(~valid, -math.inf), dim=-1).nan_to_num(0.0)
        score = self.mix * importance - (1.0 - self.mix) * redundancy
        return _protect(score, _recent(valid, n, self.window), valid)


POLICIES: dict[str, type[TokenPolicy]] = {cls.name: cls for cls in (Streaming, SnapKV, H2O, RKV)}


def make_policy(name: str, *, sparsity: float | None = None, fixed_budget: int | None = None, **options: Any) -> TokenPolicy:
    """Build a policy by name. Budgeted policies grow with `sparsity` unless `fixed_budget` is given."""
    if name not in POLICIES:
        raise KvrlError(f"unknown token policy {name!r}; accepted: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if fixed_budget is not None:
        budget = Budget(fixed=fixed_budget)
    else:
        budget = Budget(sparsity=0.5 if sparsity is None else sparsity)
    return cls(budget_spec=budget, **options)
