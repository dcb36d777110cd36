"""The cache executor: one implementation that every strategy's plan runs on.

`with compressed(model, plan): model.generate(...)` is the whole user-facing API.

Decoding simulation (RLKV's `eval/bench/pred.py`, `--decoding_simulation_length 50`):
`compressed(model, plan, decoding_simulation=50)` makes `generate` prefill the prompt without its
last 50 tokens (full attention for every head, then the compressed heads are cut to their
budget), feed those 50 tokens one at a time through the cache (the compressed heads act as in
decoding), and only then generate. 0 turns it off. The length is capped so that every row of a
left-padded batch keeps at least one real prompt token in the prefill.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.attention import register
from kvpress_rl.executor.cache import HeadwiseCache
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.models import ModelShape, check_supported

if TYPE_CHECKING:
    from kvpress_rl.plan import CompressionPlan

_WRAPPED = ("generate", "forward")


class CompressedSession:
    """What `compressed` yields: makes caches for the plan and runs the model with them."""

    def __init__(self, model: Any, plan: CompressionPlan, original: dict[str, Any], decoding_simulation: int = 0) -> None:
        if decoding_simulation < 0:
            raise KvrlError(f"decoding_simulation is a number of prompt tokens (0 = off), got {decoding_simulation}")
        self.model = model
        self.plan = plan
        self.decoding_simulation = int(decoding_simulation)
        self._original = original
        self.last_cache: HeadwiseCache | None = None

    def new_cache(self) -> HeadwiseCache:
        self.last_cache = HeadwiseCache(self.plan, self.model.config)
        return self.last_cache

    def generate(self, *args: Any, **kwargs: Any):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = self.new_cache()
            if self.decoding_simulation:
                if args:  # generate's first positional argument is the input ids
                    kwargs["input_ids"], args = args[0], args[1:]
                self.simulate_decoding(kwargs)
        return self._original["generate"](*args, **kwargs)

    def simulate_decoding(self, kwargs: dict[str, Any]) -> None:
        """Run all but the last of the prompt's final `decoding_simulation` tokens through `kwargs["cache"]`
        (prefill, then one token per step); `generate` then feeds the last one as its first step."""
        ids = kwargs.get("input_ids")
        if ids is None or ids.ndim != 2:
            return
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = self._generation_mask(ids, kwargs)
            kwargs["attention_mask"] = mask
        real = int(mask.sum(-1).min())
        simulated = min(self.decoding_simulation, real - 1)
        if simulated <= 0:
            return
        length = ids.shape[1]
        prefix = length - simulated
        mask = mask.to(ids.device).long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = kwargs["cache"]
        forward = self.model  # through nn.Module.__call__ (hooks); our `forward` passes a given cache through
        import torch

        with torch.no_grad():
            forward(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=positions[:, :prefix],
                    cache=cache, use_cache=True, logits_to_keep=1)
            for step in range(prefix, length - 1):
                forward(input_ids=ids[:, step : step + 1], attention_mask=mask[:, : step + 1],
                        position_ids=positions[:, step : step + 1], cache=cache, use_cache=True, logits_to_keep=1)

    def _generation_mask(self, ids, kwargs: dict[str, Any]):
        """The attention mask `generate` would infer: padding masked out when the pad id is set, present
        and not an end-of-sequence id; else every token."""
        import torch

        config = kwargs.get("generation_config") or self.model.generation_config
        pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            return (ids != pad).long()
        return torch.ones_like(ids)

    def forward(self, *args: Any, **kwargs: Any):
        if kwargs.get("use_cache") and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = self.new_cache()
        return self._original["forward"](*args, **kwargs)


@contextmanager
def compressed(model: Any, plan: CompressionPlan, decoding_simulation: int = 0) -> Iterator[CompressedSession]:
    """Run `model` under `plan` inside the block; on exit the model is exactly as before.

    Inside, `model.generate(...)` and `model(..., use_cache=True)` get a fresh `HeadwiseCache`
    unless a cache is passed; the session's `last_cache` holds it for measuring (`nbytes()`).
    `decoding_simulation` (prompt tokens, 0 = off): `generate` feeds the prompt's last tokens one
    at a time through the cache before generating (RLKV's decoding simulation; see the module).
    """
    check_supported(model.config)
    plan.check_shape(ModelShape.from_config(model.config))
    name = register()
    previous_attention = model.config._attn_implementation
    shadowed = {attr: model.__dict__[attr] for attr in _WRAPPED if attr in model.__dict__}
    session = CompressedSession(model, plan, {attr: getattr(model, attr) for attr in _WRAPPED}, decoding_simulation)
    model.config._attn_implementation = name
    # wrappers that show the original signatures: `generate` inspects `forward` for `position_ids`
    # and, finding it, derives positions from the attention mask (left padding) as without us
    model.generate = functools.wraps(session._original["generate"])(lambda *a, **k: session.generate(*a, **k))
    model.forward = functools.wraps(session._original["forward"])(lambda *a, **k: session.forward(*a, **k))
    try:
        yield session
    finally:
        model.config._attn_implementation = previous_attention
        for attr in _WRAPPED:
            if attr in shadowed:
                model.__dict__[attr] = shadowed[attr]
            else:
                model.__dict__.pop(attr, None)


__all__ = ["CompressedSession", "HeadwiseCache", "compressed", "gated", "new_gates"]
