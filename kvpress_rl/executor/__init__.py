"""The cache executor: one implementation that every strategy's plan runs on.

    with compressed(model, plan) as session:
        out = session.generate(input_ids=ids, attention_mask=mask, max_new_tokens=100)
        # or, as transformers users pass caches:
        # (`past_key_values=` on transformers 5.19)
        out = model.generate(input_ids=ids, cache=session.new_cache(), max_new_tokens=100)

Inside the block the model attends through the executor's attention function (set with
transformers' public `set_attn_implementation`); each generation gets its own `HeadwiseCache`,
passed explicitly. A forward without a cache (`use_cache=False`) is a plain full-attention pass.
On exit the model's attention implementation is set back; nothing else on the model changes.

Decoding simulation (RLKV's `eval/bench/pred.py`, `--decoding_simulation_length 50`):
`compressed(model, plan, decoding_simulation=50)` makes `session.generate` prefill the prompt without
its last 50 tokens (full attention for every head, then the compressed heads are cut to their
budget), feed those 50 tokens one at a time through the cache (the compressed heads act as in
decoding), and only then generate. 0 turns it off. The length is capped so that every row of a
left-padded batch keeps at least one real prompt token in the prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.attention import register
from kvpress_rl.executor.cache import HeadwiseCache
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.models import ModelShape, cache_kwargs, check_supported, using_attention

if TYPE_CHECKING:
    from kvpress_rl.plan import CompressionPlan


class CompressedSession:
    """What `compressed` yields: makes caches for the plan and generates with them."""

    def __init__(self, model: Any, plan: CompressionPlan, decoding_simulation: int = 0) -> None:
        if decoding_simulation < 0:
            raise KvrlError(f"decoding_simulation is a number of prompt tokens (0 = off), got {decoding_simulation}")
        self.model = model
        self.plan = plan
        self.decoding_simulation = int(decoding_simulation)
        self.last_cache: HeadwiseCache | None = None

    def new_cache(self) -> HeadwiseCache:
        """A fresh cache for the plan (also kept as `last_cache`, for measuring `nbytes()`)."""
        self.last_cache = HeadwiseCache(self.plan, self.model.config)
        return self.last_cache

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """`model.generate` with a fresh cache of the plan, after the decoding simulation if one is set."""
        cache = self.new_cache()
        if self.decoding_simulation:
            kwargs.setdefault("attention_mask", self._generation_mask(input_ids, kwargs))
            self.simulate_decoding(input_ids, kwargs["attention_mask"], cache)
        return self.model.generate(input_ids=input_ids, **kwargs, **cache_kwargs(self.model, cache))

    def simulate_decoding(self, ids: torch.Tensor, mask: torch.Tensor, cache: HeadwiseCache) -> None:
        """Run all but the last of the prompt's final `decoding_simulation` tokens through `cache` (prefill,
        then one token per step); `generate` then feeds the last one as its first step."""
        real = int(mask.sum(-1).min())
        simulated = min(self.decoding_simulation, real - 1)
        if simulated <= 0:
            return
        length = ids.shape[1]
        prefix = length - simulated
        mask = mask.to(ids.device).long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            self.model(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=positions[:, :prefix],
                       **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1)
            for step in range(prefix, length - 1):
                self.model(input_ids=ids[:, step : step + 1], attention_mask=mask[:, : step + 1],
                           position_ids=positions[:, step : step + 1], **cache_kwargs(self.model, cache),
                           use_cache=True, logits_to_keep=1)

    def _generation_mask(self, ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The attention mask `generate` would infer: padding masked out when the pad id is set, present
        and not an end-of-sequence id; else every token."""
        config = kwargs.get("generation_config") or self.model.generation_config
        pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            return (ids != pad).long()
        return torch.ones_like(ids)


@contextmanager
def compressed(model: Any, plan: CompressionPlan, decoding_simulation: int = 0) -> Iterator[CompressedSession]:
    """Run `model` under `plan` inside the block (see the module docstring); on exit the model is as before.

    `decoding_simulation` (prompt tokens, 0 = off): `session.generate` feeds the prompt's last tokens one
    at a time through the cache before generating (RLKV's decoding simulation).
    """
    check_supported(model.config)
    plan.check_shape(ModelShape.from_config(model.config))
    session = CompressedSession(model, plan, decoding_simulation)
    with using_attention(model, register()):
        yield session


def generate(model: Any, plan: CompressionPlan | None, input_ids: torch.Tensor, *, decoding_simulation: int = 0,
             caches: list[HeadwiseCache] | None = None, **kwargs: Any) -> torch.Tensor:
    """`model.generate(input_ids, **kwargs)` under `plan` (None: the plain model and its own cache); the cache the
    plan ran on is appended to `caches` if given (for measuring what it held)."""
    if plan is None:
        return model.generate(input_ids=input_ids, **kwargs)
    with compressed(model, plan, decoding_simulation) as session:
        out = session.generate(input_ids, **kwargs)
    if caches is not None:
        caches.append(session.last_cache)
    return out


__all__ = ["CompressedSession", "HeadwiseCache", "compressed", "gated", "generate", "new_gates"]
