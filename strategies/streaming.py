"""`streaming`: StreamingLLM on every head (Xiao et al. 2024, arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpress_rl.policies import BUDGET_BASE, Streaming
from kvpress_rl.selector import TokenSelector


@dataclass
class StreamingOptions:
    sink: int = field(default=Streaming.sink, metadata={"help": "attention-sink tokens kept at the start"})
    fixed_budget: int = field(default=0, metadata={"help": (
        f"tokens per head (0: int(L*(1-s)) + {BUDGET_BASE}, as the paper's token baselines)")})


class StreamingLLM(TokenSelector):
    """Every head keeps `sink` first tokens and a recent window; the window fills the budget that
    matches head sparsity s (`int(L * (1 - s)) + 80 - sink` recent tokens), or `fixed_budget`.

    Assumes attention sinks exist (true of the pretrained LLMs the paper studies).
    """

    name = "streaming"
    description = "StreamingLLM: sink + recent window on every head"
    Options = StreamingOptions

    def make_policy(self, sparsity: float) -> Streaming:
        return Streaming(sink=self.options.sink, budget_spec=self.budget(sparsity))
