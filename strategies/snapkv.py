"""`snapkv`: SnapKV on every head (Li et al. 2024, arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpress_rl.policies import BUDGET_BASE, SnapKV
from kvpress_rl.selector import TokenSelector


@dataclass
class SnapKVOptions:
    window: int = field(default=SnapKV.window, metadata={"help": (
        "observation window: the last queries whose attention scores tokens")})
    kernel: int = field(default=SnapKV.kernel, metadata={"help": "average-pooling kernel over token scores (odd)"})
    fixed_budget: int = field(default=0, metadata={"help": f"tokens per head (0: int(L*(1-s)) + {BUDGET_BASE})"})


class SnapKVTokens(TokenSelector):
    """Every head keeps the tokens its last `window` queries attend to most (pooled), plus the
    window itself. Assumes the end of the context predicts what later tokens will need."""

    name = "snapkv"
    description = "SnapKV: tokens picked by the observation window's attention"
    Options = SnapKVOptions

    def make_policy(self, sparsity: float) -> SnapKV:
        return SnapKV(budget_spec=self.budget(sparsity), window=self.options.window, kernel=self.options.kernel)
