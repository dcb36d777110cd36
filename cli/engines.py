"""What generates under `kvrl eval --engine`, `kvrl tune --engine` and `kvrl select --rollout-engine`, and the
longest sequence a vLLM engine started by a command is sized for."""

from __future__ import annotations

from typing import Any

ENGINES = ("transformers", "vllm")
ENGINE_LENGTH_CAP = 32768  # tokens: the longest context a command starts a vLLM engine with


def engine_max_model_len(config: Any, unknown: int) -> int:
    """The model's own limit (`unknown` where the config has none), at most the cap."""
    return min(int(getattr(config, "max_position_embeddings", 0) or unknown), ENGINE_LENGTH_CAP)
