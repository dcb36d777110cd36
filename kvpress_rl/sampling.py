"""What samples RLKV's rollouts: one interface for the learner's own decoding loop and for an inference engine.

A `RolloutSampler` takes the gated model's gates (None: the full model, every head its whole cache), the streaming
branch they mix with (`GatedBranch`), prompts as token ids and one `Sampling`, and returns `Rollouts` in the
learner's layout. The learner never asks which sampler it has: `kvpress_rl.strategies.rlkv.rollouts.LearnerSampler`
(transformers) and `kvpress_rl.engines.vllm.engine.GatedRollouts` (`kvrl select --rollout-engine vllm`, which `auto`
chooses where vLLM is installed) implement it, and `SelectionContext.sampler` carries the one a caller chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kvpress_rl.errors import KvrlError
from kvpress_rl.masks import BLOCK_SIZE


@dataclass(frozen=True)
class GatedBranch:
    """The streaming branch of the gated model (every head keeps its whole cache and mixes `alpha * full + (1 - alpha)
    * streaming`): the learner's, `kvpress_rl.masks.streaming_mask` with these settings."""

    sink: int
    window: int
    mask: str = "token"
    block_size: int = BLOCK_SIZE

    def to_json(self) -> dict:
        return {"v": 1, "sink": self.sink, "window": self.window, "mask": self.mask,
                "block_size": self.block_size}

    @classmethod
    def from_json(cls, data: dict) -> GatedBranch:
        if not isinstance(data, dict) or data.get("v") != 1:
            raise KvrlError(f"not a kvpress-rl gated branch (version 1): {str(data)[:80]}")
        return cls(sink=int(data["sink"]), window=int(data["window"]), mask=str(data["mask"]),
                   block_size=int(data["block_size"]))


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled: from the full distribution at `temperature` (no top-k, no top-p; None: greedy), at
    most `max_new_tokens`, ended by any of `stop_ids` (the stop token is kept), padded with `pad_id`."""

    temperature: float | None
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int


@dataclass
class Rollouts:
    """Sampled completions in the learner's layout: `sequences` and `mask` `(rows, offset + completion)`, prompts
    left-padded, completions right-padded, the mask 1 up to and including the first stop token; rows are each prompt's
    copies in turn. `logprobs` `(rows, completion)`: each sampled token's log-probability under the sampler's
    distribution (0 at padding), when asked for."""

    sequences: torch.Tensor
    mask: torch.Tensor
    offset: int
    logprobs: torch.Tensor | None = None

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.mask[:, self.offset:]


class RolloutSampler(Protocol):
    name: str  # what the selected heads record as their rollout engine

    def sample(self, prompts: list[list[int]], sampling: Sampling, *, gates: torch.Tensor | None,
               branch: GatedBranch, copies: int = 1, logprobs: bool = False) -> Rollouts:
        """Every prompt `copies` times from the gated model under `gates` `[layers, kv_heads]` (None: the full
        model)."""
        ...

    def close(self) -> None:
        ...
