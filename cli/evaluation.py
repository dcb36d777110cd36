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
    for column in ("task", "strategy", "sparsity", "seeds", "accuracy", "change vs full", "KV saved", "decode tok/s", "overlength", "repetitive"):
        table.add_column(column, justify="right" if column not in ("task", "strategy") else "left")
    for r in rows:
        spread = f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 else ""
        table.add_row(r["task"], r["strategy"], f"{r['sparsity']:g}", str(r["seeds"]), f"{100 * r['accuracy']:.1f}{spread}",
                      f"{100 * r['change']:+.1f}", f"{100 * r['kv_saved']:.0f}%", f"{r['decode_tokens_per_s']:.1f}",
                      str(r["overlength"]), str(r["repetitive"]))
    return table


@click.command("eval")
@click.option("--tasks", default=None, help="comma-separated tasks: embedded (default on the embedded model), lm-eval names "
              "(gsm8k, gsm8k_cot, aime24, minerva_math500, mbpp, ...), or the paper's setting (gsm8k_r1, math500_r1, aime24_r1, mbpp_r1)")
@click.option("--strategy", "strategies", default="random,streaming", show_default=True, help="comma-separated strategies")
@click.option("--sparsity", "sparsities", default="0.2,0.4,0.6,0.8", show_default=True, help="comma-separated sparsities in [0, 1]")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (random strategies are averaged over them)")
@click.option("--model", default=None, help="model (default: the embedded model)")
@click.option("--heads", default=None, help="scores file of the head strategy (FILE, or NAME=FILE,...) instead of running select")
@click.option("--limit", default=100, show_default=True, type=int, help="problems per task (0: all)")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-tokens", default=None, type=int, help="new tokens per answer (default: the task's own limit)")
@click.option("--data-dir", default=None, envvar="KVRL_DATA_DIR", help="local data directory laid out like shared/data (offline tasks)")
@click.option("--compressed-policy", default="streaming", show_default=True,
              help="token policy of the compressed heads of head strategies: streaming, snapkv, h2o, rkv (hybrid plans)")
@click.option("--allow-code-execution", is_flag=True, help="allow running model-written code (mbpp), in a contained subprocess")
@click.option("--chat-template/--no-chat-template", default=None, help="apply the tokenizer's chat template (default: when it has one)")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one, one GPU per process)")
@click.option("--dtype", default="auto", show_default=True, help="auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16")
@click.option("--num-processes", default=1, show_default=True, type=int, help="data-parallel processes (accelerate launch)")
@click.option("--output", default="kvrl-eval", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def eval_command(tasks: str | None, strategies: str, sparsities: str, seeds: str, model: str | None, heads: str | None, limit: int,
                 batch_size: int, max_tokens: int | None, data_dir: str | None, compressed_policy: str, allow_code_execution: bool,
                 chat_template: bool | None, device: str | None, dtype: str, num_processes: int, output: Path) -> None:
    """Evaluate strategies at several sparsities with lm-eval (full cache once per task); resumes an interrupted grid."""
    from kvpress_rl.cli.main import strategies_with_warnings
    from kvpress_rl.evaluators.grid import GridSpec, parse_heads, resolve_tasks, run_grid, summarize
    from kvpress_rl.evaluators.harness import KvrlLM, available_device
    from kvpress_rl.executor.policies import BUDGET_BASE, make_policy
    from kvpress_rl.models import DEFAULT_MODEL, load_model
    from kvpress_rl.plan import check_sparsity
    from kvpress_rl.plugins import get_strategy

    if num_processes > 1:
        relaunch_data_parallel(num_processes)
        return
    quiet_lm_eval()
    import os

    main_process = int(os.environ.get("RANK", "0")) == 0  # under `--num-processes`, only rank 0 reports
    console = Console(quiet=not main_process)
    found = strategies_with_warnings()
    chosen = [(name, get_strategy(name, found)) for name in split_list(strategies, str, "--strategy")]
    levels = [check_sparsity(s) for s in split_list(sparsities, float, "--sparsity")]
    seed_list = split_list(seeds, int, "--seeds") or [0]
    head_files = parse_heads(heads, [name for name, _ in chosen])
    make_policy(compressed_policy, fixed_budget=BUDGET_BASE)  # refuse an unknown policy before loading anything
    if limit < 0 or batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise KvrlError("--limit must be >= 0, --batch-size and --max-tokens positive")
    model_spec = model or DEFAULT_MODEL
    task_names = split_list(tasks, str, "--tasks") if tasks else ["embedded" if model_spec == DEFAULT_MODEL else "gsm8k_r1"]
    spec = GridSpec(chosen, levels, seed_list, limit or None, batch_size, max_tokens, head_files, task_names, data_dir,
                    compressed_policy, allow_code_execution, chat_template)
    resolve_tasks(spec)  # bad task names, missing files, code execution: refused before the model loads
    with console.status(f"loading model {model_spec}"):
        lm_model, tokenizer = load_model(model_spec, dtype=dtype, device=available_device(device or "cuda"))
    if tokenizer is None:
        raise KvrlError(f"model {model_spec!r} has no tokenizer; evaluation needs a real model (the embedded one, a directory or a hub id)")
    cells_total = len(task_names) * (1 + sum(len(seed_list) if name == "random" else 1 for name, _ in chosen) * len(levels))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  disable=not main_process) as progress:
        cells_bar = progress.add_task("cells", total=cells_total)
        samples_bar = progress.add_task("samples", total=limit or None)
        lm = KvrlLM(lm_model, tokenizer=tokenizer, batch_size=batch_size, on_samples=lambda n: progress.advance(samples_bar, n))

        def on_cell(cell):
            progress.advance(cells_bar)
            progress.reset(samples_bar, total=limit or None)
            progress.console.print(f"{cell.task} {cell.strategy} s={cell.sparsity:g} seed={cell.seed}: accuracy {100 * cell.accuracy:.1f}%", highlight=False)

        cells = run_grid(lm, spec, output, on_cell=on_cell)
        progress.update(cells_bar, completed=cells_total)
    if cells:
        console.print(results_table(summarize(cells)))
        console.print(f"grid: {output / 'grid.csv'}; plot it with `kvrl report {output}`", highlight=False)


def quiet_lm_eval() -> None:
    """Our progress bars and table replace lm-eval's informational logging."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def relaunch_data_parallel(num_processes: int) -> None:
    """Run this same `kvrl eval` under `accelerate launch` with N processes (lm-eval's data-parallel path:
    each process loads the model, takes its share of every cell's requests; rank 0 writes the results)."""
    import subprocess
    import sys

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    # `--multi_gpu` is accelerate's torchrun path; on a machine without GPUs it runs CPU processes (gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kvpress_rl.cli.main", *args]
    raise SystemExit(subprocess.call(command))


@click.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--paper", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the paper's results CSV (layout of shared/reference/rlkv_paper_results.csv) to draw beside ours")
@click.option("--paper-model", default=None, help="which of the CSV's models to draw (e.g. Qwen-2.5-7B-R1)")
def report_command(directory: Path, paper: Path | None, paper_model: str | None) -> None:
    """Plot accuracy against sparsity per task (report.png) and write report.md, from a `kvrl eval` output."""
    from kvpress_rl.evaluators.report import write_report

    png, markdown = write_report(directory, paper, paper_model)
    Console().print(f"wrote {png} and {markdown}", highlight=False)
