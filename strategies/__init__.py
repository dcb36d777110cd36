"""Built-in strategies, registered through the `kvpress_rl` entry-point group like any plugin."""

from __future__ import annotations

from kvpress_rl.plugins import hookimpl


@hookimpl
def kvrl_strategies():
    from kvpress_rl.strategies.file import FileScores
    from kvpress_rl.strategies.random import RandomHeads

    return [RandomHeads, FileScores]
