import dataclasses
import sys
import types

import pytest

import kvpress_rl.plugins as plugins
from kvpress_rl import HeadSelector, hookimpl
from kvpress_rl.plugins import PluginWarning, discover_strategies
from tests.helpers import pip_install_target, run_kvrl, write_distribution


def test_builtin_strategies_come_through_the_entry_point_group():
    found = discover_strategies()
    assert {"random", "file"} <= set(found)
    assert found["random"].origin == "built-in"


def plugin_module(*classes, raises: bool = False):
    module = types.ModuleType("fake_plugin")

    @hookimpl
    def kvrl_strategies():
        if raises:
            raise RuntimeError("boom")
        return list(classes)

    module.kvrl_strategies = kvrl_strategies
    return module


class Extra(HeadSelector):
    name = "extra"
    description = "a test strategy"


class Clash(HeadSelector):
    name = "random"


def test_a_plugin_that_raises_is_skipped_with_a_warning_naming_it():
    with pytest.warns(PluginWarning, match="bad-dist.*boom"):
        found = discover_strategies([("bad-dist", plugin_module(raises=True)), ("good-dist", plugin_module(Extra))])
    assert found["extra"].origin == "good-dist" and "random" in found


def test_a_plugin_cannot_take_a_builtin_name():
    with pytest.warns(PluginWarning, match="already provided by built-in"):
        found = discover_strategies([("clash-dist", plugin_module(Clash))])
    assert found["random"].origin == "built-in"


def test_a_plugin_returning_junk_is_skipped():
    with pytest.warns(PluginWarning, match="not a named HeadSelector"):
        discover_strategies([("junk-dist", plugin_module(object))])


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    site = root / "site"
    pip_install_target(write_distribution(root / "a", "kvrl-broken-import", "kvrl_broken_import", "broken",
                                          "raise ImportError('missing dependency xyz')\n"), site)
    return site


def test_an_installed_plugin_that_fails_to_import_does_not_break_kvrl(broken_site):
    result = run_kvrl("strategies", pythonpath=broken_site)
    assert result.returncode == 0
    assert "kvrl-broken-import" in result.stderr and "missing dependency xyz" in result.stderr
    assert "random" in result.stdout


class FakeEntryPoint:
    def __init__(self, name, dist, load):
        self.name, self.dist, self._load = name, types.SimpleNamespace(name=dist), load

    def load(self):
        return self._load()


def with_entry_points(monkeypatch, *extra):
    real = plugins.entry_points

    def fake(group):
        return [*real(group=group), *extra]

    monkeypatch.setattr(plugins, "entry_points", fake)


def exiting_import():
    sys.exit(0)


def test_a_plugin_that_exits_on_import_is_a_broken_plugin(monkeypatch):
    with_entry_points(monkeypatch, FakeEntryPoint("quitter", "kvrl-quitter", exiting_import))
    with pytest.warns(PluginWarning, match="'quitter' from kvrl-quitter failed to load.*SystemExit"):
        found = discover_strategies()
    assert "random" in found and "rlkv" in found


def test_keyboard_interrupt_in_a_plugin_still_stops_kvrl(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    with_entry_points(monkeypatch, FakeEntryPoint("ctrl-c", "kvrl-ctrl-c", interrupted))
    with pytest.raises(KeyboardInterrupt):
        discover_strategies()


def test_a_hook_that_exits_is_skipped():
    module = types.ModuleType("exiting_hook")

    @hookimpl
    def kvrl_strategies():
        raise SystemExit(3)

    module.kvrl_strategies = kvrl_strategies
    with pytest.warns(PluginWarning, match="exit-dist raised in kvrl_strategies.*SystemExit"):
        found = discover_strategies([("exit-dist", module)])
    assert "random" in found


class BadDescription(HeadSelector):
    name = "bad-description"
    description = 42


class BadHints(HeadSelector):
    name = "bad-hints"

    @dataclasses.dataclass
    class Options:
        depth: "NoSuchType" = 1  # noqa: F821


def test_a_strategy_class_that_cannot_be_listed_is_skipped():
    module = types.ModuleType("odd")

    @hookimpl
    def kvrl_strategies():
        return [BadDescription, BadHints]

    module.kvrl_strategies = kvrl_strategies
    with pytest.warns(PluginWarning) as caught:
        found = discover_strategies([("odd-dist", module)])
    messages = " ".join(str(w.message) for w in caught)
    assert "'bad-description' from odd-dist is unusable" in messages
    assert "'bad-hints' from odd-dist is unusable" in messages
    assert "bad-description" not in found and "bad-hints" not in found
