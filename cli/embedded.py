"""`kvrl embedded train|evaluate`: the recipe of the shipped reasoning model, rerunnable by users."""

from __future__ import annotations

import statistics
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kvpress_rl.embedded.model import ADAPTER_DIR, load_embedded
from kvpress_rl.embedded.task import ANSWER_LIMITS, EMBEDDED_TASK, EVAL_TASKS, accuracy_by_hops, task_problems
from kvpress_rl.embedded.train import TrainConfig, train_adapter
from kvpress_rl.errors import KvrlError
from kvpress_rl.plan import plan_from_scores
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS
from kvpress_rl.scores import HeadScores


@click.group("embedded")
def embedded_group() -> None:
    """Train or evaluate the embedded reasoning model."""


@embedded_group.command("train")
@click.option("--output", default="embedded-adapter", show_default=True, type=click.Path(file_okay=False))
@click.option("--examples", default=1600, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", default=20, show_default=True, type=int)
@click.option("--max-steps", default=64, show_default=True, type=int,
              help="stop after this many steps (the schedule spans EXAMPLES / BATCH-SIZE)")
@click.option("--counted-share", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="fraction of examples from the counted family (the rest: links)")
@click.option("--resume", is_flag=True, help="continue from OUTPUT/checkpoint")
def train_command(output: str, examples: int, batch_size: int, lr: float, seed: int, checkpoint_every: int,
                  max_steps: int, counted_share: float, resume: bool) -> None:
    """Fine-tune the LoRA adapter of SmolLM2-135M-Instruct on the links and counted tasks, mixed."""
    config = TrainConfig(output=output, examples=examples, batch_size=batch_size, lr=lr, seed=seed,
                         checkpoint_every=checkpoint_every, max_steps=max_steps, counted_share=counted_share)
    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        bar = progress.add_task("train", total=min(max_steps, examples // batch_size), loss=float("nan"))
        adapter = train_adapter(config, resume=resume,
                                on_step=lambda step, total, loss: progress.update(bar, completed=step, loss=loss))
    Console().print(f"adapter: {adapter}  (copy it to kvpress_rl/embedded/adapter/ to ship it)", highlight=False)


@embedded_group.command("evaluate")
@click.option("--limit", default=500, show_default=True, type=int)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--task", default=EMBEDDED_TASK, show_default=True, type=click.Choice(list(EVAL_TASKS)))
@click.option("--adapter", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="adapter directory (default: the shipped one)")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--heads", default=None,
              help=f"a HeadScores file, export folder or hf://OWNER/REPO: compress its lowest-scored heads "
                   f"({SINK_TOKENS} sink + {WINDOW_TOKENS} recent) instead of the full cache")
@click.option("--sparsity", default=None, type=float, help="fraction of KV heads to compress (with --heads)")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="weights and activations (bfloat16: what `kvrl select` trains the embedded model in)")
def evaluate_command(limit: int, split: str, task: str, adapter: Path | None, batch_size: int, heads: str | None,
                     sparsity: float | None, dtype: str) -> None:
    """Greedy accuracy (full cache, or a head plan with --heads and --sparsity), and the prompt /
    chain-of-thought lengths in tokens. `--split validation` compares selections without touching the test problems."""
    from kvpress_rl.embedded.evaluate import evaluate  # the executor (transformers): loaded when the command runs

    if (heads is None) != (sparsity is None):
        raise KvrlError("--heads and --sparsity go together: give both (a head plan) or neither (the full cache)")
    plan = plan_from_scores(HeadScores.load(heads), sparsity) if heads else None
    model, tokenizer = load_embedded(dtype=getattr(torch, dtype), adapter=adapter or ADAPTER_DIR)
    items = task_problems(task, split, limit)
    with Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        bar = progress.add_task("eval", total=limit)
        result = evaluate(model, tokenizer, items, plan=plan, batch_size=batch_size, max_new_tokens=ANSWER_LIMITS[task],
                          on_batch=lambda n: progress.advance(bar, n))
    console = Console()
    setting = (f"{heads} at sparsity {sparsity:g}" if heads else "full cache") + f", {dtype}"
    console.print(f"accuracy {100 * result.accuracy:.1f}% ({result.correct}/{result.total}) on {task} {split}, "
                  f"{setting}, greedy", highlight=False, soft_wrap=True)
    by_hops = accuracy_by_hops(items, result.solved)
    if len(by_hops) > 1:
        shares = ", ".join(f"{hops}: {100 * acc:.0f}% of {n}" for hops, (acc, n) in by_hops.items())
        console.print(f"by steps: {shares}", highlight=False, soft_wrap=True)
    for label, values in (("prompt tokens", result.prompt_lengths), ("chain-of-thought tokens", result.output_lengths)):
        q = statistics.quantiles(values, n=20)
        console.print(f"{label}: min {min(values)}, p5 {q[0]:.0f}, median {statistics.median(values):.0f}, "
                      f"p95 {q[-1]:.0f}, max {max(values)}", highlight=False)
