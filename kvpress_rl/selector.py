"""`Strategy`: the interface every strategy implements, built-in or third-party.

Head strategies subclass `HeadSelector` (scores rank heads globally), token strategies `TokenSelector`
(every head compressed by the strategy's token policy)."""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvpress_rl.models import ModelShape, model_id
from kvpress_rl.plan import CompressionPlan, build_plan
from kvpress_rl.policies import Budget, TokenPolicy
from kvpress_rl.sampling import RolloutSampler
from kvpress_rl.scores import HeadScores


@dataclass
class SelectionContext:
    """What a strategy may use besides the model: a seed, a data directory, a device, a progress hook."""

    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    model_id: str = ""
    work_dir: str | None = None  # where a strategy may keep logs and checkpoints (resumable runs)
    resume: bool = False
    on_step: Any = None  # callable(step, total, metrics: dict) for progress, or None
    # For strategies that sample from a gated model (`samples_rollouts`): what samples their rollouts (None: the
    # strategy's own loop; `kvrl select --rollout-engine vllm`: vLLM's gated model). The caller closes it.
    sampler: RolloutSampler | None = None


@dataclass
class NoOptions:
    """A strategy without options."""


class Strategy:
    """A strategy: `select` scores every (layer, KV head); `plan` turns scores into a `CompressionPlan`.

    Subclasses set `name`, `kind` ("head" or "token"), `version`, `description`, and `Options`
    (a dataclass whose fields, with defaults and `metadata={"help": ...}`, become CLI options), and
    declare what evaluation must know: `trains` (select is a training run, minutes to hours: evaluation
    wants its scores from `kvrl select` rather than running it inside) and `averaged_over_seeds` (the
    scores are a seeded draw: the grid evaluates every seed and reports the mean), and what selection
    can be given: `samples_rollouts` (it samples from a gated model, so `kvrl select --rollout-engine` applies).
    Head strategies (`HeadSelector`) inherit the global ranking of `plan`; token strategies (`TokenSelector`)
    give every head the policy of `make_policy`.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "head"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    trains: ClassVar[bool] = False
    averaged_over_seeds: ClassVar[bool] = False
    samples_rollouts: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def select(self, model: Any, tokenizer: Any, context: SelectionContext) -> HeadScores:
        raise NotImplementedError

    def plan(self, scores: HeadScores, sparsity: float, compressed_policy: str | TokenPolicy = "streaming",
             rule: str = "official") -> CompressionPlan:
        """`kvpress_rl.plan.build_plan` for this strategy: the global ranking for a head strategy (compressed heads
        keep 80 tokens chosen by `compressed_policy`; `rule`: "official" quantile threshold, or "round"), every
        head under `make_policy(sparsity)` for a token strategy."""
        return build_plan(self, scores, sparsity, compressed_policy, rule)

    def resolved_options(self, model: Any) -> str:
        """The options `select` will run with on `model`, as text for the user (printed by `kvrl select`
        before the work starts). Strategies whose unset options depend on the model override this."""
        values = self.option_values()
        return f"{self.name} options: " + (", ".join(f"{k}={v!r}" for k, v in values.items()) if values else "none")

    def option_values(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}

    def scores(self, values: Any, model_id: str, context: SelectionContext, wall_time_s: float,
               **extra: Any) -> HeadScores:
        """Wrap a score tensor with this strategy's provenance."""
        return HeadScores(
            scores=values,
            model_id=model_id,
            strategy=self.name,
            strategy_version=self.version,
            options=self.option_values(),
            data=context.data_dir or "",
            seed=context.seed,
            wall_time_s=wall_time_s,
            extra=extra,
        )


def field_types(options_cls: type) -> dict[str, Any]:
    """Each option's type with `| None` removed (`int | None` -> int), resolved from the dataclass's hints."""
    hints = typing.get_type_hints(options_cls)
    return {f.name: _base_type(hints.get(f.name, str)) for f in dataclasses.fields(options_cls)}


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def option_fields(selector_cls: type[Strategy]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(selector_cls.Options)) if dataclasses.is_dataclass(selector_cls.Options) else []


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


class HeadSelector(Strategy):
    """Base of head strategies (`kind` "head", `Strategy`'s default): `select` scores every (layer, KV head) and
    `plan` ranks the scores globally."""


class TokenSelector(Strategy):
    """Base of token-dropping strategies: no head ranks above another; every head is compressed by
    the strategy's token policy at the budget that matches head sparsity `s` in KV memory,
    `int(seq_len * (1 - s)) + 80` tokens per head (or a fixed budget)."""

    kind: ClassVar[str] = "token"

    def make_policy(self, sparsity: float) -> TokenPolicy:
        raise NotImplementedError

    def select(self, model: Any, tokenizer: Any, context: SelectionContext) -> HeadScores:
        started = time.perf_counter()
        shape = ModelShape.from_config(model.config)
        return self.scores(torch.zeros(shape.num_layers, shape.num_kv_heads), model_id(model), context,
                           time.perf_counter() - started)

    def budget(self, sparsity: float) -> Budget:
        fixed = getattr(self.options, "fixed_budget", None)
        return Budget(fixed=fixed) if fixed else Budget(sparsity=sparsity)


__all__ = ["HeadSelector", "NoOptions", "SelectionContext", "Strategy", "TokenSelector", "default_of", "field",
           "field_types", "help_of", "option_fields"]
