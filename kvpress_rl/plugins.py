"""Plugins: the hook specification that is the only contract between the core and strategies.

A plugin is a module registered under the entry-point group `kvpress_rl`; it implements
`kvrl_strategies()` with the `kvpress_rl.hookimpl` marker and returns `Strategy` subclasses (`HeadSelector` or
`TokenSelector`).
Our built-in strategies are found the same way. Nothing is cached in a global: every call of
`discover_strategies` reads the entry points afresh.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from kvpress_rl.errors import KvrlError
from kvpress_rl.selector import Strategy, field_types

PROJECT = "kvpress_rl"
ENTRY_POINT_GROUP = "kvpress_rl"
OWN_DISTRIBUTION = "kvpress-rl"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class StrategyHooks:
    """Hook specifications a plugin may implement."""

    @hookspec
    def kvrl_strategies(self) -> list[type[Strategy]]:  # type: ignore[empty-body]
        """Return the strategy classes (`HeadSelector` or `TokenSelector` subclasses) this plugin provides."""


class PluginWarning(UserWarning):
    """A plugin failed to load or returned something unusable; it was skipped."""


@dataclass(frozen=True)
class StrategyEntry:
    cls: type[Strategy]
    origin: str  # "built-in" or the distribution that registered it


def _origin(distribution: str | None) -> str:
    if distribution is None:
        return "local"
    normalized = distribution.lower().replace("_", "-")
    return "built-in" if normalized == OWN_DISTRIBUTION else distribution


def discover_strategies(extra_plugins: list[tuple[str, ModuleType | Any]] | None = None) -> dict[str, StrategyEntry]:
    """All strategies from installed plugins (plus `extra_plugins`: `(origin, module)` pairs).

    A plugin that fails to import or whose hook raises is reported as a `PluginWarning` naming its
    distribution, and skipped; the others still load.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(StrategyHooks)
    origins: dict[str, str] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: (_origin(e.dist.name if e.dist else None) != "built-in", e.name)):
        origin = _origin(ep.dist.name if ep.dist else None)
        try:
            plugin = ep.load()
            name = f"{origin}:{ep.name}"
            if manager.is_registered(plugin):
                continue
            manager.register(plugin, name=name)
            origins[name] = origin
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: B036 -- a third party's import error (or sys.exit) must not break kvrl
            warnings.warn(f"plugin {ep.name!r} from {origin} failed to load and was skipped: {type(err).__name__}: "
                          f"{err}", PluginWarning, stacklevel=2)
    for origin, plugin in extra_plugins or []:
        name = f"{origin}:{getattr(plugin, '__name__', id(plugin))}"
        manager.register(plugin, name=name)
        origins[name] = origin

    found: dict[str, StrategyEntry] = {}
    registration_order = list(origins)
    impls = sorted(manager.hook.kvrl_strategies.get_hookimpls(),
                   key=lambda impl: (origins[impl.plugin_name] != "built-in",
                                     registration_order.index(impl.plugin_name)))
    for impl in impls:  # built-ins first, so a plugin cannot take their names
        origin = origins[impl.plugin_name]
        try:
            classes = list(impl.function())
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: B036 -- SystemExit included: a plugin must not end kvrl
            warnings.warn(f"plugin from {origin} raised in kvrl_strategies and was skipped: {type(err).__name__}: "
                          f"{err}", PluginWarning, stacklevel=2)
            continue
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Strategy) and isinstance(cls.name, str) and cls.name):
                warnings.warn(f"plugin from {origin} returned {cls!r}, not a named HeadSelector or TokenSelector "
                              "subclass; skipped", PluginWarning, stacklevel=2)
            elif (problem := _class_problem(cls)) is not None:
                warnings.warn(f"strategy {cls.name!r} from {origin} is unusable and was skipped: {problem}",
                              PluginWarning, stacklevel=2)
            elif cls.name in found:
                warnings.warn(f"strategy {cls.name!r} from {origin} is already provided by {found[cls.name].origin}; "
                              "skipped", PluginWarning, stacklevel=2)
            else:
                found[cls.name] = StrategyEntry(cls, origin)
    return found


def _class_problem(cls: type[Strategy]) -> str | None:
    """Why a strategy class cannot be listed (None: it can): its text attributes must be strings and the
    type hints of its options dataclass must resolve."""
    for attribute in ("kind", "version", "description"):
        if not isinstance(getattr(cls, attribute, None), str):
            return f"{attribute} is {type(getattr(cls, attribute, None)).__name__}, not str"
    try:
        if dataclasses.is_dataclass(cls.Options):
            field_types(cls.Options)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: B036
        return f"its Options cannot be used ({type(err).__name__}: {err})"
    return None


def get_strategy(name: str, strategies: dict[str, StrategyEntry] | None = None) -> StrategyEntry:
    strategies = discover_strategies() if strategies is None else strategies
    if name not in strategies:
        raise KvrlError(f"unknown strategy {name!r}; available: {', '.join(sorted(strategies)) or 'none'}")
    return strategies[name]
