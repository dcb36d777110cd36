"""`HeadSelector`: the interface every strategy implements, built-in or third-party."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvpress_rl.executor.policies import Streaming, TokenPolicy
from kvpress_rl.plan import CompressionPlan, plan_from_scores
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


@dataclass
class NoOptions:
    """A strategy without options."""


class HeadSelector:
    """A strategy: `select` scores every (layer, KV head); `plan` turns scores into a `CompressionPlan`.

    Subclasses set `name`, `kind` ("head" or "token"), `version`, `description`, and `Options`
    (a dataclass whose fields, with defaults and `metadata={"help": ...}`, become CLI options).
    Head strategies inherit the global ranking of `plan`; token strategies override it.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "head"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    needs_model: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def select(self, model: Any, tokenizer: Any, context: SelectionContext) -> HeadScores:
        raise NotImplementedError

    def plan(self, scores: HeadScores, sparsity: float, policy: TokenPolicy | None = None, rule: str = "official") -> CompressionPlan:
        """The global ranking of `plan_from_scores` (`rule`: "official" quantile threshold, or "round")."""
        return plan_from_scores(scores, sparsity, policy or Streaming(), rule)

    def resolved_options(self, model: Any) -> str:
        """The options `select` will run with on `model`, as text for the user (printed by `kvrl select`
        before the work starts). Strategies whose unset options depend on the model override this."""
        values = self.option_values()
        return f"{self.name} options: " + (", ".join(f"{k}={v!r}" for k, v in values.items()) if values else "none")

    def option_values(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}

    def scores(self, values: Any, model_id: str, context: SelectionContext, wall_time_s: float, **extra: Any) -> HeadScores:
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


def option_fields(selector_cls: type[HeadSelector]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(selector_cls.Options)) if dataclasses.is_dataclass(selector_cls.Options) else []


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


__all__ = ["HeadSelector", "NoOptions", "SelectionContext", "default_of", "field", "help_of", "option_fields"]


class TokenSelector(HeadSelector):
    """Base of token-dropping strategies: no head ranks above another; every head is compressed by
    the strategy's token policy at the budget that matches head sparsity `s` in KV memory,
    `int(seq_len * (1 - s)) + 80` tokens per head (or a fixed budget)."""

    kind: ClassVar[str] = "token"
    needs_model: ClassVar[bool] = True

    def make_policy(self, sparsity: float) -> TokenPolicy:
        raise NotImplementedError

    def select(self, model: Any, tokenizer: Any, context: SelectionContext) -> HeadScores:
        import torch

        from kvpress_rl.models import ModelShape, model_id

        shape = ModelShape.from_config(model.config)
        return self.scores(torch.zeros(shape.num_layers, shape.num_kv_heads), model_id(model), context, 0.0)

    def plan(self, scores: HeadScores, sparsity: float, policy: TokenPolicy | None = None, rule: str = "official") -> CompressionPlan:
        from kvpress_rl.plan import check_sparsity, token_plan

        return token_plan(scores.shape, sparsity, self.make_policy(check_sparsity(sparsity)))

    def budget(self, sparsity: float):
        from kvpress_rl.executor.policies import Budget

        fixed = getattr(self.options, "fixed_budget", None)
        return Budget(fixed=fixed) if fixed else Budget(sparsity=sparsity)
