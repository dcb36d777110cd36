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

    def observed_queries(self) -> int | None:
        """How many of a prefill's last queries `observe` needs (None: every query). Decoding steps are all observed."""
        return None

    def kept_prefix(self, budget: int) -> int | None:
        """For a policy that keeps, whatever the content, the first k slots and the most recent others (once no
        padding is held): k. The cache then evicts by slicing instead of ranking. None: the policy ranks."""
        return None

    def slack(self) -> int:
        """Tokens a head may hold above its budget before it is compressed (R-KV's buffer)."""
        return 0

    def new_stats(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Empty per-slot statistics for `keys`' heads (zeros), slot dimension last; new slots get zeros."""
        return {}

    def observe(self, stats: dict[str, torch.Tensor], probs: torch.Tensor) -> None:
        """Fold attention probabilities `(batch, kv_heads, queries, slots)` into `stats`."""

    def keep_scores(self, keys: torch.Tensor, valid: torch.Tensor,
                    stats: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
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


def _pool(pool, score: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D pooling of `(batch, heads, slots)` along the slots (stride 1, zero padding kernel // 2)."""
    b, h, n = score.shape
    if n == 0:
        return score
    return pool(score.reshape(b * h, 1, n), kernel, stride=1, padding=kernel // 2).reshape(b, h, n)


def _pad_window(score: torch.Tensor, n: int) -> torch.Tensor:
    """Pre-window scores `(batch, heads, before)` padded with zeros to all `n` slots (the window is protected)."""
    return F.pad(score, (0, n - score.shape[-1]))


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
            raise KvrlError("streaming needs sink >= 0 and window >= 1 (a budget of at least sink + 1), got "
                            f"sink={self.sink}, window={self.window}")
        if self.budget_spec is not None:
            _check_budget(self.budget_spec, self.sink + 1, self.name)

    def budget(self, seq_len: int) -> int:
        return self.sink + self.window if self.budget_spec is None else self.budget_spec.tokens(seq_len)

    def kept_prefix(self, budget: int) -> int:
        return min(self.sink, budget)

    def keep_scores(self, keys, valid, stats):
        # Sinks are protected; the rest rank by recency, so the top `budget` are sinks + newest.
        n = keys.shape[2]
        valid = valid.expand(keys.shape[:3])
        rank = valid.long().cumsum(-1) - 1
        return _protect(_slot_index(valid, n).float(), valid & (rank < self.sink), valid)


def _check_budget(budget: Budget, minimum: int, name: str) -> None:
    if budget.fixed is not None and budget.fixed < minimum:
        raise KvrlError(f"{name}: a budget of {budget.fixed} tokens is smaller than its protected window + 1 "
                        f"({minimum})")


@dataclass(frozen=True)
class SnapKV(TokenPolicy):
    """SnapKV (Li et al. 2024, arXiv 2404.14469): keep the tokens the last `window` queries attend to.

    As the reference code (FasterDecoding/SnapKV) defines it: the slots *before* the observation
    window are scored by the attention the last `window` queries pay them, average-pooled with
    `kernel` (zero padding of `kernel // 2`, stride 1) over those pre-window slots only, and the
    best `budget - window` of them are kept together with the whole observation window (always
    kept, so its own attention never leaks into the pooling). Scores are per KV head: the
    probabilities are summed over the query heads of the KV group (kvpress averages over the
    group and over the window queries; sums and means rank alike). During decoding the window
    slides with the newest queries.
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

    def observed_queries(self) -> int:
        return self.window

    def new_stats(self, keys):
        b, h, n, _ = keys.shape
        return {"window_attention": keys.new_zeros((b, h, 0, n), dtype=torch.float32)}

    def observe(self, stats, probs):
        rows = torch.cat([stats["window_attention"], probs.float()], dim=2)
        stats["window_attention"] = rows[:, :, -self.window :]

    def keep_scores(self, keys, valid, stats):
        b, h, n, _ = keys.shape
        valid = valid.expand(keys.shape[:3])
        before = max(0, n - self.window)  # slots before the observation window
        score = stats["window_attention"][..., :before].sum(dim=2)
        score = _pool(F.avg_pool1d, score, self.kernel)
        return _protect(_pad_window(score, n), _recent(valid, n, self.window), valid)


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

    As the reference code (Zefan-Cai/R-KV, `rkv/compression/r1_kv.py`) defines it, over the slots
    *before* the observation window of the last `window` queries:

    - importance: the window queries' attention renormalised over the pre-window slots (their
      softmax over the pre-window keys only), averaged over the window queries, max-pooled with
      `kernel` (zero padding `kernel // 2`, stride 1) over the pre-window slots only;
    - redundancy: cosine similarity between the head's keys (all of them, window included), the
      diagonal zeroed, and in each row the *last* key with a similarity above 0.5 zeroed too (so
      of a group of near-copies the newest survives); then the mean over the rows, a softmax over
      the keys, and the pre-window part;
    - score = `mix * importance - (1 - mix) * redundancy`; the best `budget - window` pre-window
      slots are kept with the whole window.

    Compression runs once a head holds `budget + buffer` tokens (paper's baseline: window 8,
    kernel 7, mix 0.1, buffer 128). GQA: scoring is per KV head; the attention probabilities are
    summed over the query heads of the KV group and renormalised over the pre-window slots (an
    average of the group's distributions). The reference code instead takes the maximum of the
    group's pre-softmax logits; we keep probability sums because the executor already observes
    them for every attention policy, and they rank the heavy tokens of any head of the group.
    """

    name: ClassVar[str] = "rkv"
    needs_attention: ClassVar[bool] = True
    budget_spec: Budget = field(default_factory=lambda: Budget(sparsity=0.5))
    window: int = 8
    kernel: int = 7
    mix: float = 0.1
    buffer: int = 128
    threshold: ClassVar[float] = 0.5  # the reference's redundancy threshold (retain direction "last")

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

    observed_queries = SnapKV.observed_queries
    new_stats = SnapKV.new_stats
    observe = SnapKV.observe

    def keep_scores(self, keys, valid, stats):
        b, h, n, _ = keys.shape
        valid = valid.expand(keys.shape[:3])
        before = max(0, n - self.window)
        attention = stats["window_attention"][..., :before]
        if attention.shape[2]:
            attention = attention / attention.sum(-1, keepdim=True).clamp_min(1e-12)
            importance = attention.mean(dim=2)
        else:
            importance = attention.new_zeros((b, h, before))
        importance = _pool(F.max_pool1d, importance, self.kernel)
        redundancy = self.redundancy(keys, valid)[..., :before]
        score = self.mix * importance - (1.0 - self.mix) * redundancy
        return _protect(_pad_window(score, n), _recent(valid, n, self.window), valid)

    def redundancy(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`(batch, heads, slots)`: softmax over the keys of their mean similarity to the other keys."""
        n = keys.shape[2]
        unit = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-8)
        similarity = unit @ unit.transpose(-1, -2)
        pair_valid = valid[..., :, None] & valid[..., None, :]
        similarity = similarity.masked_fill(~pair_valid, 0.0)
        similarity.diagonal(dim1=-2, dim2=-1).zero_()
        # in each row, the last column above the threshold is zeroed (row without one: column 0, as
        # the reference's argmax over an all-zero row picks index 0; its similarity there is <= 0.5)
        above = torch.where(similarity > self.threshold, _slot_index(valid, n)[..., None, :].expand_as(similarity), 0)
        last = above.max(dim=-1).values
        similarity = similarity.scatter(-1, last[..., None], 0.0)
        rows = valid.sum(-1, keepdim=True).clamp_min(1)
        mean = similarity.sum(dim=-2) / rows
        return torch.softmax(mean.masked_fill(~valid, -math.inf), dim=-1).nan_to_num(0.0)


POLICIES: dict[str, type[TokenPolicy]] = {cls.name: cls for cls in (Streaming, SnapKV, H2O, RKV)}


def compressed_head_policy(name: str = "streaming") -> TokenPolicy:
    """What the compressed heads of a head plan keep: the paper's 16 sink + 64 recent tokens (`streaming`),
    or the same `BUDGET_BASE` (80) tokens chosen by another policy (a hybrid plan)."""
    return Streaming() if name == Streaming.name else make_policy(name, fixed_budget=BUDGET_BASE)


def full_head_policy(name: str, budget: str | float | int) -> TokenPolicy:
    """What the full heads of a hybrid plan keep: `budget` tokens chosen by policy `name`. `budget` is a fraction
    of the sequence written with a decimal point (`0.5`: `int(L * 0.5)` tokens) or a token count (`512`)."""
    text = str(budget).strip()
    try:
        value = float(text)
    except ValueError:
        raise KvrlError(f"full-head budget {text!r}: give a fraction of the sequence (e.g. 0.5) or a token count (e.g. "
                        "512)") from None
    if "." in text or "e" in text.lower():
        if not 0.0 < value <= 1.0:
            raise KvrlError(f"full-head budget {text}: a fraction must lie in (0, 1]")
        return make_policy(name, budget=Budget(sparsity=1.0 - value, base=0))
    if value < 1 or value != int(value):
        raise KvrlError(f"full-head budget {text}: a token count must be a whole number >= 1")
    return make_policy(name, budget=Budget(fixed=int(value)))


def make_policy(name: str, *, sparsity: float | None = None, fixed_budget: int | None = None,
                budget: Budget | None = None, **options: Any) -> TokenPolicy:
    """Build a policy by name. Budgeted policies grow with `sparsity` unless `fixed_budget` (or a whole `budget`) is
    given."""
    if name not in POLICIES:
        raise KvrlError(f"unknown token policy {name!r}; accepted: {', '.join(POLICIES)}")
    if budget is None:
        if fixed_budget is not None:
            budget = Budget(fixed=fixed_budget)
        else:
            budget = Budget(sparsity=0.5 if sparsity is None else sparsity)
    return POLICIES[name](budget_spec=budget, **options)
