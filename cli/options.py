"""Options on the command line: every field of a strategy's options dataclass is `--field-name VALUE`; the
hybrid plan's `--full-policy` and `--full-budget`, which go together; `--heads`, each strategy's scores file."""

from __future__ import annotations

import typing
from typing import Any

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.strategy_scores import training_refusal
from kvpress_rl.plugins import StrategyEntry
from kvpress_rl.selector import Strategy, default_of, field_types, option_fields


def flag_of(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _convert(raw: str, kind: Any, flag: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (int, float, str):
            return kind(raw)
        if typing.get_origin(kind) in (list, tuple):
            inner = typing.get_args(kind)[0] if typing.get_args(kind) else str
            return [inner(part) for part in raw.split(",") if part]
    except ValueError:
        raise KvrlError(f"{flag}: {raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return raw


def parse_strategy_options(selector_cls: type[Strategy], args: list[str]) -> Any:
    """Build the strategy's options dataclass from leftover command-line words."""
    fields = {f.name: f for f in option_fields(selector_cls)}
    kinds = field_types(selector_cls.Options) if fields else {}
    accepted = ", ".join(flag_of(name) for name in fields) or "none"
    values: dict[str, Any] = {}
    words = list(args)
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            raise KvrlError(f"unexpected argument {word!r}; strategy {selector_cls.name!r} accepts options: {accepted}")
        flag, _, inline = word.partition("=")
        name = flag[2:].replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields and kinds[name[3:]] is bool
        if negated:
            values[name[3:]] = False
            continue
        if name not in fields:
            raise KvrlError(f"unknown option {flag} for strategy {selector_cls.name!r}; accepted: {accepted}")
        if kinds[name] is bool and not inline:
            values[name] = True
            continue
        if not inline:
            if not words:
                raise KvrlError(f"option {flag} needs a value")
            inline = words.pop(0)
        values[name] = _convert(inline, kinds[name], flag)
    try:
        return selector_cls.Options(**values)
    except (TypeError, ValueError) as err:
        raise KvrlError(f"invalid options for strategy {selector_cls.name!r}: {err}") from None


def describe_options(selector_cls: type[Strategy]) -> list[tuple[str, str, str, str]]:
    """Rows `(flag, type, default, help)` for `kvrl strategies NAME`."""
    if not option_fields(selector_cls):
        return []
    kinds = field_types(selector_cls.Options)
    rows = []
    for f in option_fields(selector_cls):
        kind = kinds[f.name]
        rows.append((flag_of(f.name), getattr(kind, "__name__", str(kind)), repr(default_of(f)),
                     str(f.metadata.get("help", ""))))
    return rows


def check_full_heads_pair(full_policy: str | None, full_budget: str | None) -> None:
    """`--full-policy` and `--full-budget` (a hybrid plan's full heads) are given together or not at all."""
    if (full_policy is None) != (full_budget is None):
        raise KvrlError("--full-policy and --full-budget go together: a policy and what it keeps "
                        "(0.5 of the sequence, or 512 tokens)")


def parse_heads(value: str | None, strategies: list[tuple[str, StrategyEntry]]) -> dict[str, str]:
    """`--heads FILE` (one head strategy that is not a seeded draw) or `--heads NAME=FILE,NAME=FILE`."""
    if not value:
        return {}
    if "=" not in value:
        learned = [name for name, entry in strategies if entry.cls.kind == "head" and not entry.cls.averaged_over_seeds]
        if len(learned) != 1:
            raise KvrlError(f"--heads FILE needs exactly one head strategy besides random, got {learned or 'none'}; "
                            "use --heads NAME=FILE,...")
        return {learned[0]: value}
    pairs = dict(part.split("=", 1) for part in value.split(",") if part)
    unknown = sorted(set(pairs) - {name for name, _ in strategies})
    if unknown:
        raise KvrlError(f"--heads names {', '.join(unknown)}, which --strategy does not list")
    return pairs


def check_training_strategies(strategies: list[tuple[str, StrategyEntry]], heads: dict[str, str]) -> None:
    """A strategy whose `select` is a training run needs its scores from `kvrl select`: evaluation does not train."""
    for name, entry in strategies:
        if entry.cls.trains and name not in heads:
            raise training_refusal(name, f"--heads {name}=")
