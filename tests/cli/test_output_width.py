"""Readable output anywhere: plain lines outside a terminal, and tables that keep every name and number
whole on an 80-column terminal (rich would otherwise cut cells to `embe…`)."""

import pytest
from rich.console import Console

from kvpress_rl.cli import main
from kvpress_rl.cli.evaluation import results_table
from kvpress_rl.evaluators.grid import Cell, summarize
from kvpress_rl.plugins import StrategyEntry, discover_strategies
from kvpress_rl.selector import HeadSelector

ELLIPSIS = "…"


def test_select_prints_one_plain_line_per_step_outside_a_terminal(cli):
    # CliRunner's output is not a terminal: no progress bar, no colours, one line per step
    result = cli("select", "--strategy", "duo", "--model", "random:llama", "--steps", "2", "--context-length", "40", "--output", "duo.safetensors")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith("duo step ")]
    assert [line.split(",")[0] for line in steps] == ["duo step 1/2", "duo step 2/2"]
    assert all("loss" in line for line in steps)
    assert "\x1b[" not in result.output and "━" not in result.output
    assert "wrote duo.safetensors" in result.output


def embedded_rows():
    """A realistic `kvrl eval` summary: the embedded task, three strategies at sparsity 0.6, random over three seeds."""
    def cell(strategy, sparsity, seed, accuracy, overlength=2, repetitive=1):
        return Cell("embedded", strategy, sparsity, seed, accuracy, round(accuracy * 30), 30, 1 - sparsity * 0.8, 1234.5, overlength, repetitive)

    cells = [cell("full", 0.0, 0, 0.733, 0, 0), cell("streaming", 0.6, 0, 0.5), cell("retrieval", 0.6, 0, 0.6),
             cell("random", 0.6, 0, 0.0, 14, 3), cell("random", 0.6, 1, 0.1), cell("random", 0.6, 2, 1.0)]
    return summarize(cells)


def rendered(renderable, width: int) -> str:
    console = Console(width=width, record=True, force_terminal=True)
    console.print(renderable)
    return console.export_text()


def test_the_results_table_keeps_names_and_numbers_whole_at_80_columns():
    rows = embedded_rows()
    random_row = next(r for r in rows if r["strategy"] == "random")
    assert random_row["seeds"] == 3
    text = rendered(results_table(rows), 80)
    assert ELLIPSIS not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("embedded", "full", "streaming", "random", "retrieval"):
        assert f" {name} " in text  # whole, on one line
    assert "36.7 ± 55.1" in text  # mean ± std over the seeds, whole
    for r in rows:  # each row's numbers, whole on its line
        line = next(line for line in text.splitlines() if line.startswith(f"│ embedded │ {r['strategy']} "))
        for number in (f"{100 * r['accuracy']:.1f}", f"{100 * r['change']:+.1f}", f"{100 * r['kv_saved']:.0f}%", f"{r['sparsity']:g}"):
            assert f" {number} " in line, (number, line)
    # what did not fit is named, not silently cut
    assert "not shown at this width: decode tok/s, overlength, repetitive" in " ".join(text.split())


def test_the_results_table_shows_every_column_where_there_is_room():
    text = rendered(results_table(embedded_rows()), 160)
    assert ELLIPSIS not in text and "not shown" not in text
    for header in ("decode tok/s", "overlength", "repetitive"):
        assert header in text
    row = next(line for line in text.splitlines() if line.startswith("│ embedded │ random "))
    assert " 1234.5 │ " in row and " 18 │ " in row and " 5 │" in row  # overlength and repetitive, summed over the seeds


@pytest.mark.parametrize("width", [40, 50, 60, 70, 90, 100, 120])
def test_the_results_table_never_cuts_a_cell_and_fits_the_console(width):
    text = rendered(results_table(embedded_rows()), width)
    assert ELLIPSIS not in text
    assert max(len(line) for line in text.splitlines()) <= width
    if width >= 60:  # from 60 columns on, names and numbers are whole on their line
        for piece in ("embedded", "streaming", "retrieval", "-36.6", "73.3", "48%"):
            assert f" {piece} " in text


class DeepLayers(HeadSelector):
    name = "deep-layers"
    description = "deeper layers keep more of their cache: a geometric decay of the score with depth, no data needed"


class LongName(HeadSelector):
    name = "kvrl-plugin-example:deep-layers"
    description = "a plugin strategy whose name had to be prefixed with its distribution because another plugin took it"


@pytest.mark.parametrize("plugins", [(), ((DeepLayers, "my-kvrl-plugin"),), ((DeepLayers, "my-kvrl-plugin"), (LongName, "kvrl-plugin-example"))],
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
