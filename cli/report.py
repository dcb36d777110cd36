"""`kvrl report`: what a user reads off finished runs. `kvrl report DIR` (= `kvrl report grid DIR`) plots a
`kvrl eval` output; `paired`, `engines` and `rewards` compare two cells, two engines' grids and RLKV trainings."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from kvpress_rl.cli.output import OneLineErrorsGroup
from kvpress_rl.evaluators.breakdown import write_breakdown
from kvpress_rl.evaluators.engine_comparison import agreement_table, compare_engines
from kvpress_rl.evaluators.frontier import write_frontier
from kvpress_rl.evaluators.paired import compare_cells, sign_test_line, solved_problems
from kvpress_rl.evaluators.report import write_report
from kvpress_rl.evaluators.reward_curves import read_train_log, run_summary, steps_table, write_reward_curves
from kvpress_rl.strategies.rlkv.checkpoints import TRAIN_LOG

DEFAULT_SUBCOMMAND = "grid"


class DefaultGridGroup(OneLineErrorsGroup):
    """A group whose first argument, when it names no subcommand (nor asks for help), is the folder of
    `kvrl report grid`: `kvrl report DIR --frontier` reads as `kvrl report grid DIR --frontier`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_SUBCOMMAND, *args]
        return super().parse_args(ctx, args)


@click.group("report", cls=DefaultGridGroup)
def report_group() -> None:
    """Plot and compare finished runs. `kvrl report DIR [OPTIONS]`, a first argument that names no command, is
    `kvrl report grid DIR [OPTIONS]`."""


def wrote(png: Path, markdown: Path) -> None:
    Console().print(f"wrote {png} and {markdown}", highlight=False)


@report_group.command("grid", short_help="Plot a `kvrl eval` output (also `kvrl report DIR`).")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--paper", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the paper's results CSV (layout of shared/reference/rlkv_paper_results.csv) to draw beside ours")
@click.option("--paper-model", default=None, help="which of the CSV's models to draw (e.g. Qwen-2.5-7B-R1)")
@click.option("--frontier", is_flag=True,
              help="also draw accuracy against measured KV memory, the Pareto front marked (frontier.png, frontier.md)")
@click.option("--by", "by_field", default=None, metavar="FIELD",
              help="also break accuracy down by a field of the problems, e.g. hops for the embedded tasks "
                   "(by_FIELD.png, by_FIELD.md)")
def grid_command(directory: Path, paper: Path | None, paper_model: str | None, frontier: bool,
                 by_field: str | None) -> None:
    """Plot accuracy against sparsity per task (report.png) and write report.md, from a `kvrl eval` output."""
    if by_field:
        wrote(*write_breakdown(directory, by_field))
    if frontier:
        wrote(*write_frontier(directory))
    wrote(*write_report(directory, paper, paper_model))


@report_group.command("paired", short_help="Sign test of two cells on the same problems.")
@click.argument("first", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--common", is_flag=True,
              help="compare the problems both cells ran (cells run with different --limit: the first problems)")
def paired_command(first: Path, second: Path, common: bool) -> None:
    """Exact two-sided sign test of two cells on the same problems, from their samples
    (DIR/samples/TASK/CELL.jsonl of `kvrl eval`): the problems only the first solves, only the second solves,
    and the probability of a split at least that uneven if both were equally good."""
    test = compare_cells(solved_problems(first), solved_problems(second), common=common)
    click.echo(sign_test_line(first.stem, second.stem, test))


@report_group.command("engines", short_help="Two engines' outputs of one grid, cell by cell.")
@click.argument("first", type=click.Path(file_okay=False, path_type=Path))
@click.argument("second", type=click.Path(file_okay=False, path_type=Path))
def engines_command(first: Path, second: Path) -> None:
    """Two `kvrl eval` outputs of the same grid, one per --engine, cell by cell (a Markdown table): the accuracy in
    each, how many answers are identical, and the problems whose answers differ (with the first character where
    they part)."""
    click.echo(agreement_table(first.name, second.name, compare_engines(first, second)))


def parse_runs(ctx: click.Context, param: click.Parameter, items: tuple[str, ...]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise click.BadParameter(f"{item!r}: expected NAME=WORK_FOLDER", ctx=ctx, param=param)
        runs[name] = Path(folder)
    return runs


@report_group.command("rewards", short_help="RLKV trainings' reward and gate curves.")
@click.argument("runs", nargs=-1, required=True, metavar="NAME=WORK_FOLDER...", callback=parse_runs)
@click.option("--output", default=Path("reward_curves.png"), show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="the figure (its format from the suffix)")
def rewards_command(runs: dict[str, Path], output: Path) -> None:
    """Reward and mean-gate curves of RLKV trainings side by side, from the work folder (OUTPUT.run) of each
    `kvrl select --strategy rlkv`: a table per step, each run's totals, and one figure of every run's curves."""
    logs = {name: read_train_log(folder / TRAIN_LOG) for name, folder in runs.items()}
    click.echo(steps_table(logs))
    for name, log in logs.items():
        click.echo(run_summary(name, log))
    click.echo(f"wrote {write_reward_curves(logs, output)}")
