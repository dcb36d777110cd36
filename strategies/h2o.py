"""`h2o`: Heavy-Hitter Oracle on every head (Zhang et al. 2023, arXiv 2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpress_rl.policies import BUDGET_BASE, H2O
from kvpress_rl.selector import TokenSelector


@dataclass
class H2OOptions:
    fixed_budget: int = field(default=0, metadata={"help": f"tokens per head (0: int(L*(1-s)) + {BUDGET_BASE})"})


class H2OTokens(TokenSelector):
    """Every head keeps half its budget as heavy hitters (attention accumulated over all queries,
    summed over the query heads of the KV group) and half as the most recent tokens. Assumes
    tokens that were attended to will be attended to again."""

    name = "h2o"
    description = "H2O: half heavy hitters by accumulated attention, half recent"
    Options = H2OOptions

    def make_policy(self, sparsity: float) -> H2O:
        return H2O(budget_spec=self.budget(sparsity))
