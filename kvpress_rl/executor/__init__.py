"""The cache executor: one implementation that every strategy's plan runs on.

`with compressed(model, plan): model.generate(...)` is the whole user-facing API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvpress_rl.executor.attention import register
from kvpress_rl.executor.cache import HeadwiseCache
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.models import ModelShape, check_supported

if TYPE_CHECKING:
    from kvpress_rl.plan import CompressionPlan

_WRAPPED = ("generate", "forward")


class CompressedSession:
    """What `compressed` yields: makes caches for the plan and runs the model with them."""

    def __init__(self, model: Any, plan: CompressionPlan, original: dict[str, Any]) -> None:
        self.model = model
        self.plan = plan
        self._original = original
        self.last_cache: HeadwiseCache | None = None

    def new_cache(self) -> HeadwiseCache:
        self.last_cache = HeadwiseCache(self.plan, self.model.config)
        return self.last_cache

    def generate(self, *args: Any, **kwargs: Any):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = self.new_cache()
        return self._original["generate"](*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any):
        if kwargs.get("use_cache") and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = self.new_cache()
        return self._original["forward"](*args, **kwargs)


@contextmanager
def compressed(model: Any, plan: CompressionPlan) -> Iterator[CompressedSession]:
    """Run `model` under `plan` inside the block; on exit the model is exactly as before.

    Inside, `model.generate(...)` and `model(..., use_cache=True)` get a fresh `HeadwiseCache`
    unless a cache is passed; the session's `last_cache` holds it for measuring (`nbytes()`).
    """
    check_supported(model.config)
    plan.check_shape(ModelShape.from_config(model.config))
    name = register()
    previous_attention = model.config._attn_implementation
    shadowed = {attr: model.__dict__[attr] for attr in _WRAPPED if attr in model.__dict__}
    session = CompressedSession(model, plan, {attr: getattr(model, attr) for attr in _WRAPPED})
    model.config._attn_implementation = name
    model.generate, model.forward = session.generate, session.forward
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
