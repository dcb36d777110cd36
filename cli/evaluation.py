"""`kvrl eval`: the strategy x sparsity grid with a progress bar and a results table."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from kvpress_rl.cli.launch import check_num_processes, distributed_rank, launch_data_parallel, report_rank_error, watch_rank
from kvpress_rl.cli.output import strategies_with_warnings
from kvpress_rl.engines.vllm.engine import PlanEngines, check_vllm, model_folder
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.grid import (
    LOCK_HELD_ENV,
    GridSpec,
    check_chat_template_before_loading,
    check_head_shapes,
    check_heads,
    check_training_strategies,
    grid_cells,
    lock_output,
    parse_heads,
    plan_resume,
    resolve_tasks,
    run_grid,
    summarize,
)
from kvpress_rl.evaluators.report import markdown_table, write_breakdown, write_frontier, write_report
from kvpress_rl.identity import weights_identity
from kvpress_rl.models import _DTYPES, DEFAULT_MODEL, available_device, check_device, check_seed, load_model, looks_like_path
from kvpress_rl.plan import check_sparsity
from kvpress_rl.plugins import get_strategy
from kvpress_rl.policies import compressed_head_policy, full_head_policy
from kvpress_rl.profiles import EMBEDDED_PROFILE

ENGINES = ("transformers", "vllm")


def lm_max_length(model) -> int:
    """The longest sequence the engine is sized for: the model's own limit (as lm-eval's HF model reads it)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def split_list(value: str, kind, flag: str) -> list:
    try:
        return [kind(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise KvrlError(f"{flag}: {value!r} is not a comma-separated list of {kind.__name__}") from None


def results_table(rows: list[dict]) -> RenderableType:
    """The results of `kvrl eval`, laid out for the width of the console that prints them.

    With room, every column at its natural width. Narrower, in this order: headers wrap at their
    spaces, the low-value columns (decode tok/s, overlength, repetitive; all in grid.csv and report.md)
    give way, named in the caption, header words fold, seeds and KV saved give way, and last the names
    fold. Numbers stay whole (`36.7 ± 50.3` may wrap at its spaces); no cell ends in an ellipsis.
    """
    headers = ("task", "strategy", "sparsity", "seeds", "accuracy", "change vs full", "KV saved", "decode tok/s", "overlength", "repetitive")
    names = ("task", "strategy")
    body = []
    for r in rows:
        spread = f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 else ""
        body.append((r["task"], r["strategy"], f"{r['sparsity']:g}", str(r["seeds"]), f"{100 * r['accuracy']:.1f}{spread}",
                     f"{100 * r['change']:+.1f}", f"{100 * r['kv_saved']:.0f}%", f"{r['decode_tokens_per_s']:.1f}",
                     str(r["overlength"]), str(r["repetitive"])))

    def longest_word(text: str) -> int:
        return max((len(word) for word in text.split()), default=0)

    natural = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
    # the narrowest a column is with whole names and numbers (a number with spaces may wrap there) ...
    values = [max([1] + [len(row[i]) if h in names else longest_word(row[i]) for row in body]) for i, h in enumerate(headers)]
    # ... and with whole header words too
    whole = [max(longest_word(h), values[i]) for i, h in enumerate(headers)]
    everything = list(range(len(headers)))
    useful = [i for i in everything if headers[i] not in ("decode tok/s", "overlength", "repetitive")]
    core = [i for i in useful if headers[i] not in ("seeds", "KV saved")]
    layouts = ((everything, whole), (useful, whole), (useful, values), (core, whole), (core, values))

    def width_of(shown: list[int], widths: list[int]) -> int:
        return sum(widths[i] + 3 for i in shown) + 1  # each column: 2 of padding and a border; plus the last border

    def table(room: int) -> Table:
        shown, least = next(((shown, least) for shown, least in layouts if width_of(shown, least) <= room), layouts[-1])
        widths = {i: least[i] for i in shown}
        left = room - width_of(shown, least)
        if left < 0:  # the names fold, sharing what the numbers leave
            task, strategy = (i for i in shown if headers[i] in names)
            room_for_names = max(2, widths[task] + widths[strategy] + left)
            short, long = sorted((task, strategy), key=lambda i: values[i])
            widths[short] = min(values[short], room_for_names // 2)
            widths[long] = room_for_names - widths[short]
            left = 0
        for target in (whole, natural):  # spare room: unfold header words first, then up to the natural widths
            for i in sorted(shown, key=lambda i: target[i] - widths[i]):
                grow = max(0, min(left, target[i] - widths[i]))
                widths[i] += grow
                left -= grow
        hidden = [h for i, h in enumerate(headers) if i not in shown]
        built = Table(title="accuracy by strategy and sparsity", caption=f"not shown at this width: {', '.join(hidden)}" if hidden else None)
        for i in shown:
            built.add_column(headers[i], justify="left" if headers[i] in names else "right", width=widths[i], overflow="fold")
        for row in body:
            built.add_row(*(Text(row[i]) for i in shown))
        return built

    class Fitted:
        def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
            yield table(options.max_width)

    return Fitted()


@click.command("eval")
@click.option("--tasks", default=None, help="comma-separated tasks: embedded (default on the embedded model), lm-eval names "
              "(gsm8k, gsm8k_cot, aime24, minerva_math500, mbpp, ...), or the paper's setting (gsm8k_r1, math500_r1, aime24_r1, mbpp_r1)")
@click.option("--strategy", "strategies", default="random,streaming", show_default=True, help="comma-separated strategies")
@click.option("--sparsity", "sparsities", default="0.2,0.4,0.6,0.8", show_default=True, help="comma-separated sparsities in [0, 1]")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (random strategies are averaged over them)")
@click.option("--model", default=None, envvar="KVRL_MODEL", help="model (default: $KVRL_MODEL, else the embedded model)")
@click.option("--heads", default=None, help="scores file of the head strategy (FILE, or NAME=FILE,...) instead of running select")
@click.option("--limit", default=100, show_default=True, type=int, help="problems per task (0: all)")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-tokens", default=None, type=int, help="new tokens per answer (default: the task's own limit)")
@click.option("--data-dir", default=None, envvar="KVRL_DATA_DIR", help="local data directory laid out like shared/data (offline tasks)")
@click.option("--compressed-policy", default="streaming", show_default=True,
              help="token policy of the compressed heads of head strategies: streaming, snapkv, h2o, rkv (hybrid plans)")
@click.option("--full-policy", default=None, help="hybrid plans: token policy of the full heads of head strategies too (streaming, snapkv, h2o, rkv)")
@click.option("--full-budget", "full_budgets", default=None,
              help="with --full-policy, a grid axis: what full heads keep, comma-separated fractions of the sequence (0.5) or "
                   "token counts (512); `all` = everything (the plain head plan)")
@click.option("--plan-rule", type=click.Choice(["official", "round"]), default="official", show_default=True,
              help="how head scores become a plan: official (RLKV's quantile threshold, seeded tie-break) or round (round(n * s) heads)")
@click.option("--decoding-simulation", type=click.IntRange(min=0), default=None,
              help="prompt tokens fed one at a time through the compressed cache before generating (RLKV's decoding "
                   "simulation; 0 = off); default: the task's own (50 for the *_r1 tasks, 0 for the others)")
@click.option("--allow-code-execution", is_flag=True, help="allow running model-written code (mbpp), in a contained subprocess")
@click.option("--chat-template/--no-chat-template", default=None, help="apply the tokenizer's chat template; the flag wins over a task's own setting (default: on for the "
                   "embedded and *_r1 tasks, else when the tokenizer has one)")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one, one GPU per process)")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 on GPU; on CPU float32, the embedded model bfloat16), float32, float16, bfloat16")
@click.option("--num-processes", default=1, show_default=True, type=int, help="data-parallel processes (accelerate launch)")
@click.option("--engine", type=click.Choice(ENGINES), default="transformers", show_default=True,
              help="what generates: transformers (the executor) or vllm (the kvpress-rl vLLM plugin, head plans with streaming heads)")
@click.option("--output", default="kvrl-eval", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--recompute", is_flag=True, help="redo the finished cells of --output that were made with other settings (else refused)")
def eval_command(tasks: str | None, strategies: str, sparsities: str, seeds: str, model: str | None, heads: str | None, limit: int,
                 batch_size: int, max_tokens: int | None, data_dir: str | None, compressed_policy: str, full_policy: str | None,
                 full_budgets: str | None, plan_rule: str, decoding_simulation: int | None, allow_code_execution: bool,
                 chat_template: bool | None, device: str | None, dtype: str, num_processes: int, engine: str, output: Path, recompute: bool) -> None:
    """Evaluate strategies at several sparsities with lm-eval (full cache once per task); resumes an interrupted grid.

    A strategy that trains (rlkv, duo) needs its scores from `kvrl select`, passed with --heads."""
    settings = dict(tasks=tasks, strategies=strategies, sparsities=sparsities, seeds=seeds, model=model, heads=heads, limit=limit,
                    batch_size=batch_size, max_tokens=max_tokens, data_dir=data_dir, compressed_policy=compressed_policy, full_policy=full_policy,
                    full_budgets=full_budgets, plan_rule=plan_rule, decoding_simulation=decoding_simulation, allow_code_execution=allow_code_execution, chat_template=chat_template,
                    device=device, dtype=dtype, engine=engine)
    rank, world_size = check_num_processes(num_processes)
    if engine != "transformers" and num_processes > 1:
        raise KvrlError(f"--engine {engine} runs in one process (vLLM batches the requests itself); drop --num-processes")
    watch_rank()  # a rank of a data-parallel run: its failure ends the whole run
    if num_processes > 1:
        spec, _ = eval_inputs(**settings)  # every input that needs no model, refused once, before launching anything
        lock = lock_output(output)  # held here while the ranks write
        plan_resume(spec, output, recompute)
        os.environ[LOCK_HELD_ENV] = str(output.resolve())
        try:
            launch_data_parallel(num_processes)  # relaunches this command; a rank's KvrlError comes back as one line
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)
            lock.close()
        return
    if world_size <= 1:
        run_eval(settings, output, recompute)
        return
    try:
        run_eval(settings, output, recompute)
    except KvrlError as err:
        report_rank_error(err)


def check_engine(spec: GridSpec) -> None:
    """What the vLLM engine runs (head plans whose compressed heads keep sink + recent tokens), refused before loading."""
    check_vllm()
    model_folder(spec.model)
    token = [name for name, entry in spec.strategies if entry.cls.kind != "head"]
    if token or spec.compressed_policy != "streaming" or spec.full_policy:
        what = f"token strategies ({', '.join(token)})" if token else "--compressed-policy other than streaming or --full-policy"
        raise KvrlError(f"--engine vllm runs head strategies whose compressed heads keep 16 sink + 64 recent tokens; not {what}")
    if spec.decoding_simulation:
        raise KvrlError("--engine vllm has no decoding simulation; pass --decoding-simulation 0 or --engine transformers")


def eval_inputs(*, tasks, strategies, sparsities, seeds, model, heads, limit, batch_size, max_tokens, data_dir, compressed_policy,
                full_policy, full_budgets, plan_rule, decoding_simulation, allow_code_execution, chat_template, device, dtype,
                engine: str = "transformers", quiet: bool = False, validation: bool = False):
    """`(GridSpec, device)`: every input checked before any model loads (and before any process is launched);
    `validation`: the tasks' validation split (tasks without one refused)."""
    found = strategies_with_warnings(quiet)  # quiet: a rank of a data-parallel run (the launching process showed them)
    chosen = [(name, get_strategy(name, found)) for name in split_list(strategies, str, "--strategy")]
    levels = [check_sparsity(s) for s in split_list(sparsities, float, "--sparsity")]
    seed_list = [check_seed(s, "--seeds") for s in split_list(seeds, int, "--seeds")] or [0]
    head_files = parse_heads(heads, chosen)
    check_training_strategies(chosen, head_files)
    compressed_head_policy(compressed_policy)  # refuse an unknown policy before loading anything
    if (full_policy is None) != (full_budgets is None):
        raise KvrlError("--full-policy and --full-budget go together: a policy and what it keeps (0.5 of the sequence, or 512 tokens)")
    budget_list = split_list(full_budgets, str, "--full-budget") if full_budgets else []
    for budget in budget_list:
        if budget != "all":
            full_head_policy(full_policy, budget)  # a bad policy or budget: refused before loading anything
    if limit < 0 or batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise KvrlError("--limit must be >= 0, --batch-size and --max-tokens positive")
    if dtype != "auto" and dtype not in _DTYPES:
        raise KvrlError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(_DTYPES)}")
    device = available_device(check_device(device) if device else "cuda")
    model_spec = model or DEFAULT_MODEL
    if model_spec != DEFAULT_MODEL and not model_spec.startswith("random:") and (looks_like_path(model_spec) or Path(model_spec).expanduser().exists()):
        if not Path(model_spec).expanduser().exists():
            raise KvrlError(f"model path does not exist: {model_spec}")
        identity = str(Path(model_spec).expanduser().resolve())
    else:
        identity = model_spec
    default_task = EMBEDDED_PROFILE.default_task if model_spec == DEFAULT_MODEL else "gsm8k_r1"  # before the model loads
    task_names = split_list(tasks, str, "--tasks") if tasks else [default_task]
    spec = GridSpec(chosen, levels, seed_list, limit or None, batch_size, max_tokens, head_files, task_names, data_dir,
                    compressed_policy, plan_rule, allow_code_execution, chat_template, decoding_simulation=decoding_simulation,
                    model=identity, weights=weights_identity(identity), dtype=dtype if dtype != "auto" else auto_dtype(model_spec, device),
                    full_policy=full_policy, full_budgets=budget_list, engine=engine, split="validation" if validation else "test")
    if engine != "transformers":
        check_engine(spec)
    check_heads(spec)  # every --heads file exists and loads; its shape is checked once the model is loaded
    resolve_tasks(spec)  # bad task names, missing files, code execution: refused before the model loads
    return spec, device


def run_eval(settings: dict, output: Path, recompute: bool) -> None:
    """One process of `kvrl eval` (the only one, or a rank of a data-parallel run, where rank 0 alone reports)."""
    quiet_lm_eval()
    rank, world_size = distributed_rank()
    main_process = rank == 0  # under `--num-processes`, only rank 0 reports
    console = Console(quiet=not main_process)
    spec, device = eval_inputs(**settings, quiet=not main_process)
    check_chat_template_before_loading(spec)  # a template the folder's tokenizer lacks: one line, nothing written
    lock = None
    if main_process and os.environ.get(LOCK_HELD_ENV) != str(output.resolve()):
        lock = lock_output(output)  # a second writer into the same folder is refused here, before the model loads
    try:
        run_locked_eval(spec, device, settings["model"] or DEFAULT_MODEL, output, recompute, console, main_process)
    finally:
        if lock is not None:
            lock.close()


def run_locked_eval(spec: GridSpec, device: str, model_spec: str, output: Path, recompute: bool, console: Console,
                    main_process: bool) -> None:
    plan_resume(spec, output, recompute)  # cells made with other settings: refused before the model loads
    terminal = console.is_terminal
    task_count, limit = len(spec.tasks), spec.limit
    cells_total = task_count * len(grid_cells(spec))
    with evaluation_model(spec, model_spec, device, console) as lm, grid_progress(console, main_process) as progress:
        cells_bar = progress.add_task("cells", total=cells_total)
        samples_bar = progress.add_task("samples", total=limit)
        lm.on_samples = lambda n: progress.advance(samples_bar, n)

        def on_cell(cell):
            progress.advance(cells_bar)
            progress.reset(samples_bar, total=limit)
            line = f"{cell.task} {cell.strategy} s={cell.sparsity:g} seed={cell.seed}: accuracy {100 * cell.accuracy:.1f}%"
            if terminal:
                progress.console.print(line, highlight=False)
            elif main_process:
                print(line, flush=True)  # a log file gets one plain line per cell

        cells = run_grid(lm, spec, output, on_cell=on_cell, recompute=recompute)
        progress.update(cells_bar, completed=cells_total)
    if cells and main_process:
        rows = summarize(cells)
        if terminal:
            console.print(results_table(rows))
            console.print(f"grid: {output / 'grid.csv'}; plot it with `kvrl report {output}`", highlight=False)
        else:  # a log file: a plain Markdown table, whatever its width
            print("accuracy by strategy and sparsity\n\n" + markdown_table(rows), flush=True)
            print(f"grid: {output / 'grid.csv'}; plot it with `kvrl report {output}`", flush=True)


def grid_progress(console: Console, main_process: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                    disable=not (main_process and console.is_terminal))


@contextmanager
def evaluation_model(spec: GridSpec, model_spec: str, device: str, console: Console) -> Iterator:
    """The lm-eval model (`KvrlLM`) that runs a grid's cells, on the executor or on vLLM (closed on exit).

    Under --engine vllm the transformers copy only answers shape and tokenizer questions: it stays off the GPU vLLM takes."""
    from kvpress_rl.evaluators.harness import KvrlLM  # lm-eval's model stack: loaded when an evaluation runs

    with console.status(f"loading model {model_spec}") if console.is_terminal else nullcontext():
        lm_model, tokenizer = load_model(model_spec, dtype=spec.dtype, device="cpu" if spec.engine == "vllm" else device)
    if tokenizer is None:
        raise KvrlError(f"model {model_spec!r} has no tokenizer; evaluation needs a real model (the embedded one, a directory or a hub id)")
    check_head_shapes(spec, lm_model)  # --heads of another model shape: refused before any cell runs
    engine = None
    if spec.engine == "vllm":
        engine = PlanEngines(model_folder(model_spec), dtype=spec.dtype, max_model_len=min(lm_max_length(lm_model), 32768),
                             max_num_seqs=spec.batch_size)
    try:
        yield KvrlLM(lm_model, tokenizer=tokenizer, batch_size=spec.batch_size, engine=engine)
    finally:
        if engine is not None:
            engine.close()


def auto_dtype(model_spec: str, device: str) -> str:
    """`--dtype auto`: bfloat16 on a GPU; on the CPU float32, or the dtype the model's profile evaluates in (the
    embedded model: bfloat16, where its accuracy holds)."""
    if device != "cpu":
        return "bfloat16"
    return (EMBEDDED_PROFILE.eval_dtype or "float32") if model_spec == DEFAULT_MODEL else "float32"


def quiet_lm_eval() -> None:
    """Our progress bars and table replace lm-eval's informational logging."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@click.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--paper", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the paper's results CSV (layout of shared/reference/rlkv_paper_results.csv) to draw beside ours")
@click.option("--paper-model", default=None, help="which of the CSV's models to draw (e.g. Qwen-2.5-7B-R1)")
@click.option("--frontier", is_flag=True, help="also draw accuracy against measured KV memory, the Pareto front marked (frontier.png, frontier.md)")
@click.option("--by", "by_field", default=None, metavar="FIELD",
              help="also break accuracy down by a field of the problems, e.g. hops for the embedded tasks (by_FIELD.png, by_FIELD.md)")
def report_command(directory: Path, paper: Path | None, paper_model: str | None, frontier: bool, by_field: str | None) -> None:
    """Plot accuracy against sparsity per task (report.png) and write report.md, from a `kvrl eval` output."""
    if by_field:
        png, markdown = write_breakdown(directory, by_field)
        Console().print(f"wrote {png} and {markdown}", highlight=False)
    if frontier:
        png, markdown = write_frontier(directory)
        Console().print(f"wrote {png} and {markdown}", highlight=False)
    png, markdown = write_report(directory, paper, paper_model)
    Console().print(f"wrote {png} and {markdown}", highlight=False)
