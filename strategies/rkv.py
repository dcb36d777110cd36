"""`rkv`: R-KV, redundancy-aware KV compression for reasoning models (Cai et al. 2025, arXiv 2505.24133)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpress_rl.policies import BUDGET_BASE, RKV
from kvpress_rl.selector import TokenSelector


@dataclass
class RKVOptions:
    window: int = field(default=RKV.window, metadata={"help": "observation window of recent queries"})
    kernel: int = field(default=RKV.kernel, metadata={"help": "max-pooling kernel over importance (odd)"})
    mix: float = field(default=RKV.mix, metadata={"help": "weight of importance against redundancy"})
    buffer: int = field(default=RKV.buffer, metadata={"help": (
        "tokens gathered above the budget before each compression")})
    fixed_budget: int = field(default=0, metadata={"help": f"tokens per head (0: int(L*(1-s)) + {BUDGET_BASE})"})


class RKVTokens(TokenSelector):
    """Every head scores tokens by `mix * importance - (1 - mix) * redundancy` and keeps the best,
    compressing once `buffer` new tokens have gathered (the paper's baseline settings). Assumes
    reasoning traces repeat themselves, so near-duplicate keys can go."""

    name = "rkv"
    description = "R-KV: attention importance mixed with key redundancy"
    Options = RKVOptions

    def make_policy(self, sparsity: float) -> RKV:
        o = self.options
        return RKV(budget_spec=self.budget(sparsity), window=o.window, kernel=o.kernel, mix=o.mix, buffer=o.buffer)
