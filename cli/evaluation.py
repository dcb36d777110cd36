"""`kvrl eval`: the strategy x sparsity grid with a progress bar and a results table."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvpress_rl.cli.engines import ENGINES, engine_max_model_len
from kvpress_rl.cli.eval_request import EvalRequest, eval_inputs
from kvpress_rl.cli.launch import (
    check_num_processes,
    distributed_rank,
    launch_data_parallel,
    rank_process,
    watch_rank,
)
from kvpress_rl.cli.output import Column, Layout, fitted_table, quiet_other_ranks
from kvpress_rl.engines.vllm.engine import PlanSwitchingEngine, model_folder
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import summarize
from kvpress_rl.evaluators.chat_template import check_chat_template_before_loading
from kvpress_rl.evaluators.grid import run_grid
from kvpress_rl.evaluators.grid_spec import GridSpec, grid_cells
from kvpress_rl.evaluators.output_lock import LOCK_HELD_ENV, lock_output
from kvpress_rl.evaluators.report import markdown_table
from kvpress_rl.evaluators.resume import plan_resume
from kvpress_rl.evaluators.strategy_scores import check_head_shapes
from kvpress_rl.models import load_model, model_spec

RESULT_HEADERS = ("task", "strategy", "sparsity", "seeds", "accuracy", "change vs full", "KV saved", "decode tok/s",
                  "overlength", "repetitive")
NAMES = ("task", "strategy")
LOW_VALUE = ("decode tok/s", "overlength", "repetitive")  # the first to give way (all in grid.csv and report.md)
SECONDARY = ("seeds", "KV saved")  # the next


def result_cells(row: dict) -> tuple[str, ...]:
    spread = f" ± {100 * row['accuracy_std']:.1f}" if row["seeds"] > 1 else ""
    return (row["task"], row["strategy"], f"{row['sparsity']:g}", str(row["seeds"]),
            f"{100 * row['accuracy']:.1f}{spread}", f"{100 * row['change']:+.1f}", f"{100 * row['kv_saved']:.0f}%",
            f"{row['decode_tokens_per_s']:.1f}", str(row["overlength"]), str(row["repetitive"]))


def results_table(rows: list[dict]) -> RenderableType:
    """The results of `kvrl eval`, laid out for the width of the console that prints them.

    With room, every column at its natural width. Narrower, in this order: headers wrap at their spaces, the
    low-value columns (decode tok/s, overlength, repetitive) give way, named in the caption, header words fold,
    seeds and KV saved give way, and last the names fold. Numbers stay whole (`36.7 ± 50.3` may wrap at its
    spaces); no cell ends in an ellipsis.
    """
    body = [result_cells(row) for row in rows]
    columns = [Column(header=header, cells=tuple(cells[i] for cells in body), name=header in NAMES,
                      justify="left" if header in NAMES else "right") for i, header in enumerate(RESULT_HEADERS)]
    everything = tuple(range(len(RESULT_HEADERS)))
    useful = tuple(i for i in everything if RESULT_HEADERS[i] not in LOW_VALUE)
    core = tuple(i for i in useful if RESULT_HEADERS[i] not in SECONDARY)
    layouts = [Layout(shown=everything), Layout(shown=useful), Layout(shown=useful, whole_headers=False),
               Layout(shown=core), Layout(shown=core, whole_headers=False)]
    return fitted_table(columns, layouts, title="accuracy by strategy and sparsity")


@click.command("eval")
@click.option("--tasks", default=None,
              help="comma-separated tasks: embedded (default on the embedded model), lm-eval names (gsm8k, gsm8k_cot, "
                   "aime24, minerva_math500, mbpp, ...), or the paper's setting (gsm8k_r1, math500_r1, aime24_r1, "
                   "mbpp_r1)")
@click.option("--strategy", "strategies", default="random,streaming", show_default=True,
              help="comma-separated strategies")
@click.option("--sparsity", "sparsities", default="0.2,0.4,0.6,0.8", show_default=True,
              help="comma-separated sparsities in [0, 1]")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (random strategies are averaged over them)")
@click.option("--model", default=None, envvar="KVRL_MODEL",
              help="model (default: $KVRL_MODEL, else the embedded model)")
@click.option("--heads", default=None,
              help="scores file of the head strategy (FILE, or NAME=FILE,...) instead of running select")
@click.option("--limit", default=100, show_default=True, type=int, help="problems per task (0: all)")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-tokens", default=None, type=int, help="new tokens per answer (default: the task's own limit)")
@click.option("--data-dir", default=None, envvar="KVRL_DATA_DIR",
              help="local data directory laid out like shared/data (offline tasks)")
@click.option("--compressed-policy", default="streaming", show_default=True,
              help="token policy of the compressed heads of head strategies: streaming, snapkv, h2o, rkv "
                   "(hybrid plans)")
@click.option("--full-policy", default=None,
              help="hybrid plans: token policy of the full heads of head strategies too (streaming, snapkv, h2o, rkv)")
@click.option("--full-budget", "full_budgets", default=None,
              help="with --full-policy, a grid axis: what full heads keep, comma-separated fractions of the sequence "
                   "(0.5) or token counts (512); `all` = everything (the plain head plan)")
@click.option("--plan-rule", type=click.Choice(["official", "round"]), default="official", show_default=True,
              help="how head scores become a plan: official (RLKV's quantile threshold, seeded tie-break) or round "
                   "(round(n * s) heads)")
@click.option("--decoding-simulation", type=click.IntRange(min=0), default=None,
              help="prompt tokens fed one at a time through the compressed cache before generating (RLKV's decoding "
                   "simulation; 0 = off); default: the task's own (50 for the *_r1 tasks, 0 for the others)")
@click.option("--allow-code-execution", is_flag=True,
              help="allow running model-written code (mbpp), in a contained subprocess")
@click.option("--chat-template/--no-chat-template", default=None,
              help="apply the tokenizer's chat template; the flag wins over a task's own setting (default: on for the "
                   "embedded and *_r1 tasks, else when the tokenizer has one)")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one, one GPU per process)")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 on GPU; on CPU float32, the embedded model bfloat16), float32, float16, bfloat16")
@click.option("--num-processes", default=1, show_default=True, type=int,
              help="data-parallel processes (accelerate launch)")
@click.option("--engine", type=click.Choice(ENGINES), default="transformers", show_default=True,
              help="what generates: transformers (the executor) or vllm (the kvpress-rl vLLM plugin, head plans with "
                   "streaming heads)")
@click.option("--output", default="kvrl-eval", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--recompute", is_flag=True,
              help="redo the finished cells of --output that were made with other settings (else refused)")
def eval_command(tasks: str | None, strategies: str, sparsities: str, seeds: str, model: str | None,
                 heads: str | None, limit: int, batch_size: int, max_tokens: int | None, data_dir: str | None,
                 compressed_policy: str, full_policy: str | None, full_budgets: str | None, plan_rule: str,
                 decoding_simulation: int | None, allow_code_execution: bool, chat_template: bool | None,
                 device: str | None, dtype: str, num_processes: int, engine: str, output: Path,
                 recompute: bool) -> None:
    """Evaluate strategies at several sparsities with lm-eval (full cache once per task); resumes an interrupted grid.

    A strategy that trains (rlkv, duo) needs its scores from `kvrl select`, passed with --heads."""
    request = EvalRequest(tasks=tasks, strategies=strategies, sparsities=sparsities, seeds=seeds, model=model,
                          heads=heads, limit=limit, batch_size=batch_size, max_tokens=max_tokens, data_dir=data_dir,
                          compressed_policy=compressed_policy, full_policy=full_policy, full_budgets=full_budgets,
                          plan_rule=plan_rule, decoding_simulation=decoding_simulation,
                          allow_code_execution=allow_code_execution, chat_template=chat_template, device=device,
                          dtype=dtype, engine=engine, output=str(output), recompute=recompute)
    check_num_processes(num_processes)
    if engine != "transformers" and num_processes > 1:
        raise KvrlError(f"--engine {engine} runs in one process (vLLM batches the requests itself); "
                        "drop --num-processes")
    watch_rank()  # a rank of a data-parallel run: its failure ends the whole run
    if num_processes > 1:
        launch_ranks(request, num_processes)
        return
    with rank_process():
        run_eval(request)


def launch_ranks(request: EvalRequest, num_processes: int) -> None:
    """Every input that needs no model refused once, before launching anything; the output folder locked here
    while the ranks write; a rank's KvrlError comes back as one line."""
    spec, _ = eval_inputs(request)
    output = Path(request.output)
    lock = lock_output(output)
    plan_resume(spec, output, request.recompute)
    os.environ[LOCK_HELD_ENV] = str(output.resolve())
    try:
        launch_data_parallel(num_processes, request)
    finally:
        os.environ.pop(LOCK_HELD_ENV, None)
        lock.close()


def run_eval(request: EvalRequest) -> None:
    """One process of `kvrl eval` (the only one, or a rank of a data-parallel run, where rank 0 alone reports)."""
    quiet_lm_eval()
    rank, _ = distributed_rank()
    main_process = rank == 0  # under `--num-processes`, only rank 0 reports
    console = quiet_other_ranks(rank)
    spec, device = eval_inputs(request, quiet=not main_process)
    check_chat_template_before_loading(spec)  # a template the folder's tokenizer lacks: one line, nothing written
    output = Path(request.output)
    lock = None
    if main_process and os.environ.get(LOCK_HELD_ENV) != str(output.resolve()):
        lock = lock_output(output)  # a second writer into the same folder is refused here, before the model loads
    try:
        run_locked_eval(spec, device, model_spec(request.model), output, request.recompute, console, main_process)
    finally:
        if lock is not None:
            lock.close()


def run_locked_eval(spec: GridSpec, device: str, model: str, output: Path, recompute: bool, console: Console,
                    main_process: bool) -> None:
    plan_resume(spec, output, recompute)  # cells made with other settings: refused before the model loads
    terminal = console.is_terminal
    limit = spec.limit
    cells_total = len(spec.tasks) * len(grid_cells(spec))
    with evaluation_model(spec, model, device, console) as lm, grid_progress(console, main_process) as progress:
        cells_bar = progress.add_task("cells", total=cells_total)
        samples_bar = progress.add_task("samples", total=limit)
        lm.on_samples = lambda n: progress.advance(samples_bar, n)

        def on_cell(cell):
            progress.advance(cells_bar)
            progress.reset(samples_bar, total=limit)
            if terminal:
                progress.console.print(cell_line(cell), highlight=False)
            elif main_process:
                print(cell_line(cell), flush=True)  # a log file gets one plain line per cell

        cells = run_grid(lm, spec, output, on_cell=on_cell, recompute=recompute)
        progress.update(cells_bar, completed=cells_total)
    if cells and main_process:
        show_results(summarize(cells), output, console)


def cell_line(cell) -> str:
    return f"{cell.task} {cell.strategy} s={cell.sparsity:g} seed={cell.seed}: accuracy {100 * cell.accuracy:.1f}%"


def show_results(rows: list[dict], output: Path, console: Console) -> None:
    """On a terminal the fitted table; in a log file a plain Markdown table, whatever its width."""
    where = f"grid: {output / 'grid.csv'}; plot it with `kvrl report {output}`"
    if console.is_terminal:
        console.print(results_table(rows))
        console.print(where, highlight=False)
    else:
        print("accuracy by strategy and sparsity\n\n" + markdown_table(rows), flush=True)
        print(where, flush=True)


def grid_progress(console: Console, main_process: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not (main_process and console.is_terminal))


@contextmanager
def evaluation_model(spec: GridSpec, model: str, device: str, console: Console) -> Iterator:
    """The lm-eval model (`KvrlLM`) that runs a grid's cells, on the executor or on vLLM (closed on exit).

    Under --engine vllm the transformers copy only answers shape and tokenizer questions: it stays off the GPU vLLM
    takes."""
    from kvpress_rl.evaluators.harness import KvrlLM  # lm-eval's model stack: loaded when an evaluation runs

    with console.status(f"loading model {model}") if console.is_terminal else nullcontext():
        lm_model, tokenizer = load_model(model, dtype=spec.dtype, device="cpu" if spec.engine == "vllm" else device)
    if tokenizer is None:
        raise KvrlError(f"model {model!r} has no tokenizer; evaluation needs a real model (the embedded one, a "
                        "directory or a hub id)")
    check_head_shapes(spec, lm_model)  # --heads of another model shape: refused before any cell runs
    engine = None
    if spec.engine == "vllm":
        engine = PlanSwitchingEngine(model_folder(model), dtype=spec.dtype,
                                     # 2048 where the config has none, as lm-eval's HF model reads it
                                     max_model_len=engine_max_model_len(lm_model.config, unknown=2048),
                                     max_num_seqs=spec.batch_size)
    try:
        yield KvrlLM(lm_model, tokenizer=tokenizer, batch_size=spec.batch_size, engine=engine)
    finally:
        if engine is not None:
            engine.close()


def quiet_lm_eval() -> None:
    """Our progress bars and table replace lm-eval's informational logging."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
