"""`kvrl eval`: the strategy x sparsity grid with a progress bar and a results table."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpress_rl.errors import KvrlError


def split_list(value: str, kind, flag: str) -> list:
    try:
        return [kind(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise KvrlError(f"{flag}: {value!r} is not a comma-separated list of {kind.__name__}") from None


def results_table(rows: list[dict]) -> Table:
    table = Table(title="accuracy by strategy and sparsity")
    for column in ("task", "strategy", "sparsity", "seeds", "accuracy", "change vs full", "KV saved", "decode tok/s"):
        table.add_column(column, justify="right" if column not in ("task", "strategy") else "left")
    for r in rows:
        spread = f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 else ""
        table.add_row(r["task"], r["strategy"], f"{r['sparsity']:g}", str(r["seeds"]), f"{100 * r['accuracy']:.1f}{spread}",
                      f"{100 * r['change']:+.1f}", f"{100 * r['kv_saved']:.0f}%", f"{r['decode_tokens_per_s']:.1f}")
    return table


@click.command("eval")
@click.option("--tasks", default="embedded", show_default=True, help="comma-separated task names")
@click.option("--strategy", "strategies", default="random,streaming", show_default=True, help="comma-separated strategies")
@click.option("--sparsity", "sparsities", default="0.2,0.4,0.6,0.8", show_default=True, help="comma-separated sparsities in [0, 1]")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (random strategies are averaged over them)")
@click.option("--model", default=None, help="model (default: the embedded model)")
@click.option("--heads", default=None, help="scores file of the head strategy (FILE, or NAME=FILE,...) instead of running select")
@click.option("--limit", default=100, show_default=True, type=int, help="problems per task")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-tokens", default=96, show_default=True, type=int, help="new tokens per answer")
@click.option("--data-dir", default=None, envvar="KVRL_DATA_DIR", help="local data directory")
@click.option("--compressed-policy", default="streaming", show_default=True,
              help="token policy of the compressed heads of head strategies: streaming, snapkv, h2o, rkv (hybrid plans)")
@click.option("--output", default="kvrl-eval", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def eval_command(tasks: str, strategies: str, sparsities: str, seeds: str, model: str | None, heads: str | None, limit: int,
                 batch_size: int, max_tokens: int, data_dir: str | None, compressed_policy: str, output: Path) -> None:
    """Evaluate strategies at several sparsities (full cache included once); resumes an interrupted grid."""
    from kvpress_rl.cli.main import strategies_with_warnings
    from kvpress_rl.models import load_model
    from kvpress_rl.plan import check_sparsity
    from kvpress_rl.plugins import get_strategy
    from kvpress_rl.evaluators.grid import GridSpec, check_task, parse_heads, run_grid, summarize

    console = Console()
    task_names = [check_task(t) for t in split_list(tasks, str, "--tasks")]
    found = strategies_with_warnings()
    chosen = [(name, get_strategy(name, found)) for name in split_list(strategies, str, "--strategy")]
    levels = [check_sparsity(s) for s in split_list(sparsities, float, "--sparsity")]
    seed_list = split_list(seeds, int, "--seeds") or [0]
    head_files = parse_heads(heads, [name for name, _ in chosen])
    from kvpress_rl.executor.policies import BUDGET_BASE, make_policy

    make_policy(compressed_policy, fixed_budget=BUDGET_BASE)  # refuse an unknown policy before loading anything
    if limit < 1 or batch_size < 1 or max_tokens < 1:
        raise KvrlError("--limit, --batch-size and --max-tokens must be positive")
    with console.status(f"loading model {model or '(default)'}"):
        lm, tokenizer = load_model(model)
    if tokenizer is None:
        raise KvrlError(f"model {model!r} has no tokenizer; evaluation needs a real model (the embedded one, a directory or a hub id)")
    cells_per_task = 1 + sum(len(seed_list) if name == "random" else 1 for name, _ in chosen) * len(levels)
    all_cells = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        for task in task_names:
            spec = GridSpec(chosen, levels, seed_list, limit, batch_size, max_tokens, head_files, task, data_dir, compressed_policy)
            cells_bar = progress.add_task(f"{task}: cells", total=cells_per_task)
            samples_bar = progress.add_task(f"{task}: samples", total=limit)

            def on_cell(cell, bar=cells_bar, samples=samples_bar):
                progress.advance(bar)
                progress.reset(samples, total=limit)
                progress.console.print(f"{cell.task} {cell.strategy} s={cell.sparsity:g} seed={cell.seed}: accuracy {100 * cell.accuracy:.1f}%", highlight=False)

            cells = run_grid(lm, tokenizer, spec, output, on_cell=on_cell, on_samples=lambda n, bar=samples_bar: progress.advance(bar, n))
            progress.update(cells_bar, completed=cells_per_task)
            all_cells.extend(cells)
    console.print(results_table(summarize(all_cells)))
    console.print(f"grid: {output / 'grid.csv'}", highlight=False)
