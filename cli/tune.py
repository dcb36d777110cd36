"""`kvrl tune`: the highest near-lossless sparsity per task and strategy, chosen on validation problems."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from kvpress_rl.cli.engines import ENGINES
from kvpress_rl.cli.eval_request import EvalRequest, eval_inputs
from kvpress_rl.cli.evaluation import cell_line, evaluation_model, grid_progress, quiet_lm_eval
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import Cell
from kvpress_rl.evaluators.chat_template import check_chat_template_before_loading
from kvpress_rl.evaluators.output_lock import lock_output
from kvpress_rl.evaluators.paired import least_bound, normal_quantile, problems_for
from kvpress_rl.evaluators.tune import (
    COARSE_STEP,
    LOSSLESS_DROP,
    RESOLUTION,
    TuneSettings,
    coarse_ladder,
    test_measurements,
    validation_ladders,
)
from kvpress_rl.evaluators.tune_report import outcome_table, write_tune
from kvpress_rl.models import model_spec


def check_settings(margin: float, confidence: float, step: float, resolution: float, split: str) -> TuneSettings:
    """Every tuning setting checked before a model loads; a bad one is one line."""
    if split != "validation":
        raise KvrlError(f"--split {split}: kvrl tune chooses on the validation split only; the test split is measured "
                        "once, after the choice, and never used to choose")
    if not 0.0 < margin < 100.0:
        raise KvrlError(f"--margin is in accuracy points, strictly between 0 and 100, not {margin:g}")
    coarse_ladder(step)
    if not 0.0 < resolution <= step:
        raise KvrlError(f"--resolution must be positive and at most --step ({step:g}), not {resolution:g}")
    normal_quantile(confidence)
    return TuneSettings(margin=margin, confidence=confidence, step=step, resolution=resolution)


@click.command("tune")
@click.option("--heads", default=None,
              help="scores file of the head strategy (FILE, or NAME=FILE,...) instead of running select")
@click.option("--tasks", default=None,
              help="comma-separated tasks with a validation split: embedded (default on the embedded model), "
                   "embedded_long, embedded_count, gsm8k_r1 (with --data-dir)")
@click.option("--strategy", "strategies", default="rlkv", show_default=True,
              help="comma-separated head strategies, each tuned on its own")
@click.option("--margin", default=LOSSLESS_DROP, show_default=True, type=float,
              help="near-lossless: accuracy within this many points of the full cache")
@click.option("--confidence", default=0.95, show_default=True, type=float,
              help="confidence of the paired bound on the accuracy drop")
@click.option("--step", default=COARSE_STEP, show_default=True, type=float,
              help="the coarse ladder: step, 2 step, ... below 1")
@click.option("--resolution", default=RESOLUTION, show_default=True, type=float,
              help="refine between the last sparsity that holds and the next until the gap is this wide")
@click.option("--split", default="validation", show_default=True, help="where the choice is made (validation only)")
@click.option("--limit", default=100, show_default=True, type=int,
              help="validation (and test) problems per task (0: all)")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (random strategies are averaged over them)")
@click.option("--model", default=None, envvar="KVRL_MODEL",
              help="model (default: $KVRL_MODEL, else the embedded model)")
@click.option("--engine", type=click.Choice(ENGINES), default="transformers", show_default=True,
              help="what generates (as in kvrl eval)")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-tokens", default=None, type=int, help="new tokens per answer (default: the task's own limit)")
@click.option("--data-dir", default=None, envvar="KVRL_DATA_DIR", help="local data directory laid out like shared/data")
@click.option("--plan-rule", type=click.Choice(["official", "round"]), default="official", show_default=True)
@click.option("--chat-template/--no-chat-template", default=None, help="as in kvrl eval")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one)")
@click.option("--dtype", default="auto", show_default=True, help="auto (as kvrl eval), float32, float16, bfloat16")
@click.option("--output", default="kvrl-tune", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--recompute", is_flag=True,
              help="redo the finished cells of --output that were made with other settings (else refused)")
def tune_command(heads: str | None, tasks: str | None, strategies: str, margin: float, confidence: float,
                 step: float, resolution: float, split: str, limit: int, seeds: str, model: str | None, engine: str,
                 batch_size: int, max_tokens: int | None, data_dir: str | None, plan_rule: str,
                 chat_template: bool | None, device: str | None, dtype: str, output: Path, recompute: bool) -> None:
    """The largest near-lossless sparsity per task and strategy: a ladder of `kvrl eval` cells on the validation split
    (DIR/validation, resumable), refined where it stops holding, the choice measured once on the test split (DIR/test);
    DIR/tune.md, tune.json and tune.png."""
    settings = check_settings(margin, confidence, step, resolution, split)
    request = EvalRequest(tasks=tasks, strategies=strategies, sparsities=",".join(map(str, coarse_ladder(step))),
                          seeds=seeds, model=model, heads=heads, limit=limit, batch_size=batch_size,
                          max_tokens=max_tokens, data_dir=data_dir, compressed_policy="streaming", full_policy=None,
                          full_budgets=None, plan_rule=plan_rule, decoding_simulation=None, allow_code_execution=False,
                          chat_template=chat_template, device=device, dtype=dtype, engine=engine, output=str(output),
                          recompute=recompute)
    spec, device = eval_inputs(request, validation=True)
    token = [name for name, entry in spec.strategies if entry.cls.kind != "head"]
    if token:
        raise KvrlError(f"kvrl tune chooses a head sparsity; not for token strategies, which compress every head "
                        f"({', '.join(token)}): compare them with kvrl eval")
    check_chat_template_before_loading(spec)
    quiet_lm_eval()
    console = Console()
    warn_if_no_sparsity_can_hold(spec.limit, settings, console)
    lock = lock_output(output)
    try:
        outcomes = run_tune(spec, device, model_spec(model), output, settings, recompute, console)
    finally:
        lock.close()
    show_outcomes(outcomes, output, settings, console)


def warn_if_no_sparsity_can_hold(limit: int | None, settings: TuneSettings, console: Console) -> None:
    least = 100 * least_bound(limit, settings.confidence) if limit else 0.0
    if least > settings.margin:
        console.print(f"warning: on {limit} problems the {100 * settings.confidence:g}% bound of the drop is at least "
                      f"{least:.1f} points even when no answer changes, so no sparsity can hold within "
                      f"{settings.margin:g} with it; --limit {problems_for(settings.margin, settings.confidence)} or "
                      "more makes that possible (the observed choice is reported either way)",
                      highlight=False, markup=False)


def show_outcomes(outcomes: list, output: Path, settings: TuneSettings, console: Console) -> None:
    """tune.md, tune.json and tune.png written; the choices printed, with what serving each saves."""
    md, js, png = write_tune(output, outcomes, settings.margin, settings.confidence)
    console.print(f"near-lossless sparsity (within {settings.margin:g} points, {100 * settings.confidence:g}% paired "
                  "bound)", highlight=False)
    print(outcome_table(outcomes), flush=True)
    for outcome in outcomes:
        where = f"{outcome.choice.task}, {outcome.choice.strategy}"
        for note in outcome.notes:
            console.print(f"{where}: {note}", highlight=False, markup=False)
        if outcome.serve_command:
            console.print(f"{where}: KV cache {outcome.kv_bytes_plan / 2**20:.2f} MiB instead of "
                          f"{outcome.kv_bytes_full / 2**20:.2f} MiB a sequence of {outcome.mean_length:.0f} tokens, "
                          f"ideal throughput {outcome.gain:.2f}x; serve it: {outcome.serve_command}",
                          highlight=False, markup=False)
    console.print(f"wrote {md}, {js} and {png}; the cells: {output / 'validation'}, {output / 'test'}",
                  highlight=False, markup=False)


def run_tune(spec, device: str, model: str, output: Path, settings: TuneSettings, recompute: bool,
             console: Console) -> list:
    with evaluation_model(spec, model, device, console) as lm, grid_progress(console) as progress:
        samples_bar = progress.add_task("samples", total=spec.limit)
        lm.on_samples = lambda n: progress.advance(samples_bar, n)

        def on_cell(cell: Cell) -> None:
            progress.reset(samples_bar, total=spec.limit)
            line = cell_line(cell)
            progress.console.print(line, highlight=False) if console.is_terminal else print(line, flush=True)

        choices = validation_ladders(lm, spec, output, settings, on_cell, recompute)
        return test_measurements(lm, spec, output, choices, on_cell, recompute)
