"""`kvrl` itself, `kvrl strategies` and `kvrl plan`: one-line errors, plugins that cannot break kvrl, user text never
read as markup, and a strategies table that keeps every name whole at any terminal width."""

import os

import pytest
from rich.console import Console

import kvpress_rl
import kvpress_rl.cli.output as output
import kvpress_rl.plugins as plugins
from kvpress_rl import HeadSelector, hookimpl
from kvpress_rl.cli import main
from kvpress_rl.plugins import StrategyEntry, discover_strategies
from tests.helpers import error_line, run_kvrl

ELLIPSIS = "…"


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"kvrl {kvpress_rl.__version__}"


def test_strategies_table_and_detail(cli):
    listing = cli("strategies")
    assert listing.exit_code == 0
    assert "random" in listing.output and "file" in listing.output and "built-in" in listing.output
    detail = cli("strategies", "file")
    assert "--path" in detail.output and "head pattern" in detail.output


def test_plan_prints_the_plan_and_memory(cli, head_patterns):
    result = cli("plan", "--heads", str(head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv"), "--sparsity", "0.5",
                 "--seq-len", "1000")
    assert result.exit_code == 0, result.output
    assert "56/112 KV heads compressed" in result.output
    # 56 full x 1000 + 56 x 80 tokens out of 112 x 1000
    assert "54.0%" in result.output


@pytest.mark.parametrize("sparsity", ["1.5", "-0.2"])
def test_sparsity_outside_unit_interval(cli, head_patterns, sparsity):
    rlkv = str(head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv")
    line = error_line(cli("plan", "--heads", rlkv, "--sparsity", sparsity))
    assert "outside [0, 1]" in line


def test_missing_and_corrupted_files(cli, tmp_path):
    assert "not found" in error_line(cli("plan", "--heads", "absent.safetensors", "--sparsity", "0.5"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    bad = cli("plan", "--heads", "bad.safetensors", "--sparsity", "0.5")
    assert "not a readable head-scores file" in error_line(bad)


def test_a_tsv_of_random_bytes_is_one_line(cli, tmp_path):
    (tmp_path / "noise.tsv").write_bytes(os.urandom(512) + b"\xff\xfe")
    assert "not a TSV of numbers" in error_line(cli("plan", "--heads", "noise.tsv", "--sparsity", "0.5"))
    (tmp_path / "empty.tsv").write_text("")
    assert "is empty" in error_line(cli("plan", "--heads", "empty.tsv", "--sparsity", "0.5"))


def test_errors_from_the_real_command_are_one_line_without_traceback(tmp_path):
    result = run_kvrl("plan", "--heads", "absent.tsv", "--sparsity", "0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "Error: head scores file not found: absent.tsv"
    assert "Traceback" not in result.stderr


# --- plugins ----------------------------------------------------------------------------------------
class Quitter:
    name, dist = "quitter", type("Dist", (), {"name": "kvrl-quitter"})()

    def load(self):
        raise SystemExit(0)


def test_a_plugin_that_exits_on_import_does_not_silence_kvrl(cli, monkeypatch):
    real = plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real(group=group), Quitter()])
    listing = cli("strategies")
    assert listing.exit_code == 0 and "random" in listing.output and "rlkv" in listing.output
    assert "'quitter' from kvrl-quitter failed to load" in listing.output
    selected = cli("select", "--strategy", "random", "--model", "random:llama", "-o", "r.tsv")
    assert selected.exit_code == 0 and "wrote r.tsv" in selected.output


class Marked(HeadSelector):
    """Doc with [bold]markup[/bold] and 1[r_bar > tau] in it."""

    name = "marked"
    description = "closes a tag it never opened [/bold] and [red]colours[/red]"


def test_user_text_is_printed_as_is_never_as_markup(cli, monkeypatch):
    real = output.discover_strategies
    with_marked = {"marked": StrategyEntry(Marked, "kvrl-plugin")}
    monkeypatch.setattr(output, "discover_strategies", lambda: {**real(), **with_marked})
    listing = cli("strategies")
    assert listing.exit_code == 0, listing.output
    assert "[/bold]" in " ".join(listing.output.split())
    detail = cli("strategies", "marked")
    assert detail.exit_code == 0, detail.output
    text = " ".join(detail.output.split())
    assert "[/bold] and [red]colours[/red]" in text and "[bold]markup[/bold] and 1[r_bar > tau]" in text
    rlkv = " ".join(cli("strategies", "rlkv").output.split())
    assert "1[r_bar > tau]" in rlkv


def test_a_plugin_warning_with_markup_is_printed_as_is(cli, monkeypatch):
    module = type("M", (), {})()

    @hookimpl
    def kvrl_strategies():
        raise RuntimeError("[/red] broken [bold]")

    module.kvrl_strategies = kvrl_strategies
    monkeypatch.setattr(output, "discover_strategies", lambda: plugins.discover_strategies([("odd-dist", module)]))
    listing = cli("strategies")
    assert listing.exit_code == 0 and "[/red] broken [bold]" in listing.output


# --- the strategies table at any width ------------------------------------------------------------
class DeepLayers(HeadSelector):
    name = "deep-layers"
    description = "deeper layers keep more of their cache: a geometric decay of the score with depth, no data needed"


class LongName(HeadSelector):
    name = "kvrl-plugin-example:deep-layers"
    description = "a plugin strategy whose name had to be prefixed with its distribution because another plugin took it"


@pytest.mark.parametrize("plugins", [(), ((DeepLayers, "my-kvrl-plugin"),),
                                     ((DeepLayers, "my-kvrl-plugin"), (LongName, "kvrl-plugin-example"))],
                         ids=["built-in", "readme-plugin", "long-plugin-name"])
@pytest.mark.parametrize("width", [50, 80, 120])
def test_the_strategies_table_keeps_names_whole(cli, monkeypatch, plugins, width):
    found = {**discover_strategies(), **{cls.name: StrategyEntry(cls, origin) for cls, origin in plugins}}
    monkeypatch.setattr(main, "strategies_with_warnings", lambda *args, **kwargs: found)
    recorder = Console(width=width, record=True, force_terminal=True)
    monkeypatch.setattr(main, "console", recorder)
    assert cli("strategies").exit_code == 0
    text = recorder.export_text()
    assert ELLIPSIS not in text
    assert "not shown at this width" not in text  # either layout shows every field
    assert max(len(line) for line in text.splitlines()) <= width
    for key, entry in found.items():
        if width >= 80 or len(key) <= 20:  # narrower, a very long name may fold onto a second line (never an ellipsis)
            assert f" {key} " in text  # the name, whole on one line
            assert entry.origin in text
    if width >= 80:  # the README's plugin row: name, kind and origin on one line
        if plugins:
            row = next(line for line in text.splitlines() if " deep-layers " in line)
            assert "head" in row and "my-kvrl-plugin" in row
        assert all(entry.cls.kind in text for entry in found.values())
