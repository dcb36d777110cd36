"""`kvrl`: list, run and plan KV-cache compression strategies."""

from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import kvpress_rl
from kvpress_rl.cli.options import describe_options, parse_strategy_options
from kvpress_rl.errors import KvrlError
from kvpress_rl.plugins import StrategyEntry, discover_strategies, get_strategy

console = Console()
err_console = Console(stderr=True)


class KvrlGroup(click.Group):
    """Turns `KvrlError` into a one-line message and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KvrlError as err:
            raise click.UsageError(str(err)) from None


def strategies_with_warnings() -> dict[str, StrategyEntry]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = discover_strategies()
    for warning in caught:
        err_console.print(f"[yellow]kvrl: warning:[/] {warning.message}", highlight=False)
    return found


@click.group(cls=KvrlGroup)
@click.version_option(kvpress_rl.__version__, prog_name="kvrl", message="%(prog)s %(version)s")
def app() -> None:
    """Head-wise KV cache compression for reasoning LLMs (RLKV and baselines)."""


@app.command("strategies")
@click.argument("name", required=False)
def strategies_command(name: str | None) -> None:
    """List the strategies, or show one strategy's options."""
    found = strategies_with_warnings()
    if name is None:
        table = Table(title="strategies")
        for column in ("name", "kind", "origin", "description"):
            table.add_column(column)
        for key in sorted(found):
            entry = found[key]
            table.add_row(key, entry.cls.kind, entry.origin, entry.cls.description)
        console.print(table)
        return
    entry = get_strategy(name, found)
    console.print(f"[bold]{name}[/] ({entry.cls.kind} strategy, {entry.origin}): {entry.cls.description}", highlight=False)
    doc = inspect.cleandoc(entry.cls.__doc__ or "")
    if doc:
        console.print(doc, highlight=False)
    rows = describe_options(entry.cls)
    if not rows:
        console.print("options: none")
        return
    table = Table(title=f"options of {name}")
    for column in ("option", "type", "default", "help"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("select", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--strategy", "strategy_name", required=True, help="strategy name (see `kvrl strategies`)")
@click.option("--model", default=None, help="hub id, local directory, .gguf file or random:ARCH (default: the embedded model)")
@click.option("--gguf-file", default=None, help="GGUF file inside --model DIR")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help="scores file (.safetensors or .tsv)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--data-dir", default=None, help="local data directory (layout of shared/data)")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16, bfloat16")
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="allow model code from the hub (off by default)")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option("--resume", is_flag=True, help="continue a training strategy from its last checkpoint (OUTPUT.run/)")
@click.pass_context
def select_command(ctx: click.Context, strategy_name: str, model: str | None, gguf_file: str | None, output: Path | None,
                   seed: int, data_dir: str | None, dtype: str, device: str, trust_remote_code: bool, overwrite: bool, resume: bool) -> None:
    """Score every (layer, KV head) with a strategy and write a HeadScores file.

    Strategy options follow as `--option value` (see `kvrl strategies NAME`).
    """
    from kvpress_rl.io import check_writable
    from kvpress_rl.models import load_model, model_id
    from kvpress_rl.selector import SelectionContext

    entry = get_strategy(strategy_name, strategies_with_warnings())
    options = parse_strategy_options(entry.cls, ctx.args)
    output = output or Path(f"heads-{strategy_name}.safetensors")
    if output.suffix not in (".safetensors", ".tsv"):
        raise KvrlError(f"output {output} must end in .safetensors or .tsv")
    check_writable(output, overwrite)  # fail before loading a model or training anything
    with console.status(f"loading model {model or '(default)'}"):
        lm, tokenizer = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    selector = entry.cls(options)
    work_dir = output.with_suffix(".run")
    with Progress(TextColumn(f"{strategy_name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task(strategy_name, total=None, metrics="")

        def on_step(step: int, total: int, metrics) -> None:
            shown = metrics if isinstance(metrics, dict) else {"loss": metrics}
            text = " ".join(f"{k}={v:.3g}" for k, v in shown.items() if isinstance(v, float) and k in ("mean_reward", "mean_alpha", "beta_prime", "seconds", "loss"))
            progress.update(bar, completed=step, total=total, metrics=text)

        context = SelectionContext(seed=seed, data_dir=data_dir, device=device, model_id=model_id(lm), work_dir=str(work_dir),
                                   resume=resume, on_step=on_step)
        scores = selector.select(lm, tokenizer, context)
    if output.suffix == ".tsv":
        scores.to_tsv(output, overwrite=overwrite)
    else:
        scores.save(output, overwrite=overwrite)
    console.print(f"wrote {output}: {scores.shape[0]} layers x {scores.shape[1]} KV heads, strategy {strategy_name}, "
                  f"{scores.wall_time_s or 0:.2f} s", highlight=False)
    if (work_dir / "train_log.jsonl").is_file():
        from kvpress_rl.evaluators.plots import gate_heatmap, training_curves

        curves = training_curves(work_dir / "train_log.jsonl", work_dir / "training.png")
        heatmap = gate_heatmap(scores, work_dir / "gates.png")
        console.print(f"training log {work_dir / 'train_log.jsonl'}, plots {curves} and {heatmap}", highlight=False)


@app.command("plan")
@click.option("--heads", required=True, type=click.Path(path_type=Path), help="scores file (.safetensors or .tsv)")
@click.option("--sparsity", required=True, type=float, help="fraction of KV heads to compress, in [0, 1]")
@click.option("--seq-len", default=8192, show_default=True, type=int, help="sequence length for the memory estimate")
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--head-dim", default=128, show_default=True, type=int)
@click.option("--dtype", "dtype_name", default="bfloat16", show_default=True, help="float32, float16, bfloat16")
@click.option("--compressed-policy", default="streaming", show_default=True, help="token policy of compressed heads")
def plan_command(heads: Path, sparsity: float, seq_len: int, batch: int, head_dim: int, dtype_name: str, compressed_policy: str) -> None:
    """Print the plan for a scores file and its KV memory against the full cache."""
    import torch

    from kvpress_rl.executor.policies import BUDGET_BASE, make_policy
    from kvpress_rl.models import _DTYPES
    from kvpress_rl.plan import plan_from_scores
    from kvpress_rl.scores import HeadScores

    if dtype_name not in _DTYPES:
        raise KvrlError(f"unknown dtype {dtype_name!r}; accepted: {', '.join(_DTYPES)}")
    if seq_len < 1 or batch < 1 or head_dim < 1:
        raise KvrlError("--seq-len, --batch and --head-dim must be positive")
    scores = HeadScores.load(heads)
    policy = make_policy(compressed_policy, fixed_budget=BUDGET_BASE)  # same memory as 16 + 64 whatever the policy
    plan = plan_from_scores(scores, sparsity, policy)
    dtype: torch.dtype = _DTYPES[dtype_name]
    console.print(plan.summary(), highlight=False)
    planned = plan.kv_bytes(seq_len, batch, head_dim=head_dim, dtype=dtype)
    full = plan.full_kv_bytes(seq_len, batch, head_dim=head_dim, dtype=dtype)
    table = Table(title=f"KV memory at {seq_len} tokens, batch {batch}, head dim {head_dim}, {dtype_name}")
    for column in ("cache", "bytes", "MiB", "of full"):
        table.add_column(column, justify="right")
    table.add_row("full", str(full), f"{full / 2**20:.2f}", "100.0%")
    table.add_row("plan", str(planned), f"{planned / 2**20:.2f}", f"{100 * planned / full:.1f}%")
    console.print(table)


def _register_subcommands() -> None:
    from kvpress_rl.cli.embedded import embedded_group
    from kvpress_rl.cli.evaluation import eval_command, report_command

    app.add_command(eval_command)
    app.add_command(report_command)
    app.add_command(embedded_group)


_register_subcommands()


def main() -> None:
    app(prog_name="kvrl")


if __name__ == "__main__":
    sys.exit(main())
