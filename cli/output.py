"""What every `kvrl` command prints through: the consoles, and the strategy list with plugin warnings shown."""

from __future__ import annotations

import warnings

from rich.console import Console
from rich.markup import escape

from kvpress_rl.plugins import StrategyEntry, discover_strategies

console = Console()
err_console = Console(stderr=True)


def strategies_with_warnings(quiet: bool = False) -> dict[str, StrategyEntry]:
    """Every strategy; a plugin that failed to load is named on stderr (`quiet`: not shown, e.g. on ranks > 0)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = discover_strategies()
    if not quiet:
        for warning in caught:
            err_console.print(f"[yellow]kvrl: warning:[/] {escape(str(warning.message))}", highlight=False)
    return found
