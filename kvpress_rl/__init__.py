"""kvpress-rl: head-wise KV cache compression for reasoning LLMs (RLKV, arXiv 2510.08525, and baselines).

Public API for users and plugin authors:

- `HeadScores`, `CompressionPlan`, `plan_from_scores`, `build_plan`: scores per (layer, KV head) and the plan built
  from them.
- `HeadSelector` (head strategies), `TokenSelector` (token strategies), both a `Strategy`; `SelectionContext`,
  `hookimpl`: what a third-party strategy implements and registers.
- `compressed(model, plan)`: the context manager that runs a model under a plan with real memory savings
  (`session.generate(...)`, or `model.generate(..., cache=session.new_cache())`; `past_key_values=` on transformers
  5.19); `gated(model, gates)` for training gates.
- `load_model`: a hub id, a local directory, a GGUF file, `random:ARCH` or `embedded`; `profile_of(model)`: its
  `ModelProfile`.

Importing this package loads torch but not transformers: the executor is imported on first use of `compressed` or
`gated`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from kvpress_rl.errors import KvrlError
from kvpress_rl.models import ModelShape, load_model
from kvpress_rl.plan import CompressionPlan, build_plan, plan_from_scores
from kvpress_rl.plugins import hookimpl
from kvpress_rl.profiles import ModelProfile, profile_of
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext, Strategy, TokenSelector

try:
    __version__ = version("kvpress-rl")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"


def __getattr__(name: str):
    # The executor pulls in transformers' cache machinery; load it only when asked for.
    if name in ("compressed", "gated"):
        import kvpress_rl.executor as executor

        return getattr(executor, name)
    raise AttributeError(f"module 'kvpress_rl' has no attribute {name!r}")


__all__ = [
    "CompressionPlan",
    "HeadScores",
    "HeadSelector",
    "KvrlError",
    "ModelProfile",
    "ModelShape",
    "SelectionContext",
    "Strategy",
    "TokenSelector",
    "__version__",
    "build_plan",
    "compressed",
    "gated",
    "hookimpl",
    "load_model",
    "plan_from_scores",
    "profile_of",
]
