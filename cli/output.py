"""What every `kvrl` command prints through: the consoles, errors as one line, the strategy list with plugin warnings
shown, and `fitted_table`, the one way a table is laid out for the width of the terminal that prints it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import click
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kvpress_rl.errors import KvrlError
from kvpress_rl.plugins import StrategyEntry, discover_strategies

console = Console()
err_console = Console(stderr=True)


def quiet_other_ranks(rank: int) -> Console:
    """The console a rank of a data-parallel run prints on: only rank 0 prints; the others show no warnings and no
    loading bars (a bar cut off when a failed run stops its ranks would run into the launcher's one error line)."""
    if rank == 0:
        return console
    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.disable_progress_bar()
    return Console(quiet=True)


BORDERED = 3  # what a column takes beside its text: 2 of padding and a border (the table adds one last border)


class OneLineErrors:
    """Mixed into a click command or group: a `KvrlError` becomes one line `Error: ...` and exit code 2, without a
    traceback (also when the command runs on its own, outside `kvrl`'s group)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KvrlError as err:
            raise click.UsageError(str(err)) from None


class OneLineErrorsCommand(OneLineErrors, click.Command):
    pass


class OneLineErrorsGroup(OneLineErrors, click.Group):
    pass


def strategies_with_warnings(quiet: bool = False) -> dict[str, StrategyEntry]:
    """Every strategy; a plugin that failed to load is named on stderr (`quiet`: not shown, e.g. on ranks > 0)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = discover_strategies()
    if not quiet:
        for warning in caught:
            err_console.print(f"[yellow]kvrl: warning:[/] {escape(str(warning.message))}", highlight=False)
    return found


def longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


@dataclass(frozen=True, kw_only=True)
class Column:
    """One column of a fitted table. A `name` column keeps each cell on one line while anything else can give way
    (it folds last); the other cells may wrap at their spaces. `least`: never narrower while the layout fits."""

    header: str
    cells: tuple[str, ...]
    justify: Literal["left", "right"] = "left"
    name: bool = False
    least: int = 1
    named_when_hidden: bool = True  # False: what it shows is in another column of a narrower layout

    @property
    def natural(self) -> int:
        return max([len(self.header)] + [len(cell) for cell in self.cells])

    @property
    def values(self) -> int:
        """The narrowest with whole names and numbers (a number with spaces may wrap there)."""
        return max([self.least] + [len(cell) if self.name else longest_word(cell) for cell in self.cells])

    @property
    def whole(self) -> int:
        """The narrowest with whole header words too."""
        return max(longest_word(self.header), self.values)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The columns shown (indices into the table's columns), and whether their header words stay whole."""

    shown: tuple[int, ...]
    whole_headers: bool = True

    def least(self, column: Column) -> int:
        return column.whole if self.whole_headers else column.values

    def width(self, columns: Sequence[Column]) -> int:
        return sum(self.least(columns[i]) + BORDERED for i in self.shown) + 1


def column_widths(columns: Sequence[Column], layouts: Sequence[Layout], room: int) -> tuple[Layout, dict[int, int]]:
    """The first layout that fits `room` (else the last, its names folding into what the rest leave), and the width
    of each column shown: spare room unfolds header words first, then widens columns up to their natural width."""
    layout = next((layout for layout in layouts if layout.width(columns) <= room), layouts[-1])
    widths = {i: layout.least(columns[i]) for i in layout.shown}
    left = room - layout.width(columns)
    if left < 0:
        names = sorted((i for i in layout.shown if columns[i].name), key=lambda i: columns[i].values)
        room_for_names = max(len(names), sum(widths[i] for i in names) + left)
        for place, i in enumerate(names):
            share = room_for_names // (len(names) - place)
            widths[i] = room_for_names if place == len(names) - 1 else min(columns[i].values, share)
            room_for_names -= widths[i]
        left = 0
    for target in (lambda column: column.whole, lambda column: column.natural):
        for i in sorted(layout.shown, key=lambda i: target(columns[i]) - widths[i]):
            grow = max(0, min(left, target(columns[i]) - widths[i]))
            widths[i] += grow
            left -= grow
    return layout, widths


def built_table(columns: Sequence[Column], layouts: Sequence[Layout], room: int, title: str | Text | None) -> Table:
    layout, widths = column_widths(columns, layouts, room)
    hidden = [column.header for i, column in enumerate(columns) if i not in layout.shown and column.named_when_hidden]
    table = Table(title=title, caption=f"not shown at this width: {', '.join(hidden)}" if hidden else None)
    for i in layout.shown:
        table.add_column(columns[i].header, justify=columns[i].justify, width=widths[i], overflow="fold")
    for row in zip(*(columns[i].cells for i in layout.shown)):
        table.add_row(*(Text(cell) for cell in row))
    return table


class FittedTable:
    """A table laid out when it is printed, for the width of the console that prints it: no cell is ever cut to an
    ellipsis; what gives way at a narrow width is named in the caption."""

    def __init__(self, columns: Sequence[Column], layouts: Sequence[Layout] | None = None,
                 title: str | Text | None = None) -> None:
        self.columns = list(columns)
        self.layouts = list(layouts or [Layout(shown=tuple(range(len(self.columns))))])
        self.title = title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield built_table(self.columns, self.layouts, options.max_width, self.title)


def fitted_table(columns: Sequence[Column], layouts: Sequence[Layout] | None = None, *,
                 title: str | Text | None = None) -> RenderableType:
    """`columns` laid out by the first of `layouts` (default: every column) that fits the console's width."""
    return FittedTable(columns, layouts, title)
