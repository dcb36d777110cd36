"""Generation throughput: tokens generated and the seconds spent generating them, counted as a run goes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Throughput:
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0
