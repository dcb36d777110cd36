"""`kvrl`: list, run and plan KV-cache compression strategies."""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import click
import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import kvpress_rl
from kvpress_rl.cli.embedded import embedded_group
from kvpress_rl.cli.evaluation import eval_command, report_command
from kvpress_rl.cli.export import export_command
from kvpress_rl.cli.launch import check_num_processes, distributed_rank, join_process_group, launch_data_parallel, report_rank_error, watch_rank
from kvpress_rl.cli.options import describe_options, parse_strategy_options
from kvpress_rl.cli.output import console, strategies_with_warnings
from kvpress_rl.cli.serve import serve_command
from kvpress_rl.cli.tune import tune_command
from kvpress_rl.engines.vllm.engine import GatedRollouts, check_vllm, model_folder
from kvpress_rl.engines.vllm.layout import GatedBranch
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.plots import gate_heatmap, training_curves
from kvpress_rl.identity import code_identity, weights_identity
from kvpress_rl.io import check_folder_writable, check_writable
from kvpress_rl.models import _DTYPES, DEFAULT_MODEL, ModelShape, check_device, check_seed, load_model, model_id
from kvpress_rl.plan import plan_from_scores
from kvpress_rl.plugins import StrategyEntry, get_strategy
from kvpress_rl.policies import full_head_policy
from kvpress_rl.profiles import profile_of
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import SelectionContext


class KvrlGroup(click.Group):
    """Turns `KvrlError` into a one-line message and exit code 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KvrlError as err:
            raise click.UsageError(str(err)) from None


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
        rows = [(key, str(found[key].cls.kind), str(found[key].origin), str(found[key].cls.description)) for key in sorted(found)]
        # name, kind and origin whole, the description wrapped beside them; where that would leave the
        # description under 24 columns, two columns: the name, then "kind, origin: description". A cell
        # too wide even so folds onto the next line; none is cut to an ellipsis.
        widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(("name", "kind", "origin"))]
        table = Table(title="strategies")
        if console.width - sum(widths) - 13 >= 24:  # 4 columns of 2 padding and a border each, and the last border
            for column, width in zip(("name", "kind", "origin"), widths):
                table.add_column(column, width=width, overflow="fold")
            table.add_column("description", overflow="fold")
            for row in rows:
                table.add_row(*(Text(cell) for cell in row))
        else:
            table.add_column("name", width=max(1, min(widths[0], max(console.width - 7 - 24, (console.width - 7) // 2))), overflow="fold")
            table.add_column("kind, origin: description", overflow="fold")
            for key, kind, origin, description in rows:
                table.add_row(Text(key), Text(f"{kind}, {origin}: {description}"))
        console.print(table)
        return
    entry = get_strategy(name, found)
    # user text (a plugin's names, description, doc and option help) is printed as is, never read as markup
    console.print(f"[bold]{escape(name)}[/] ({escape(entry.cls.kind)} strategy, {escape(entry.origin)}): {escape(entry.cls.description)}",
                  highlight=False)
    doc = inspect.cleandoc(entry.cls.__doc__ or "") if isinstance(entry.cls.__doc__, str) else ""
    if doc:
        console.print(doc, highlight=False, markup=False)
    rows = describe_options(entry.cls)
    if not rows:
        console.print("options: none")
        return
    table = Table(title=Text(f"options of {name}"))
    for column in ("option", "type", "default", "help"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


# Under `kvrl select --num-processes N`, the launching process points its ranks at a folder where a rank
# that hits a KvrlError leaves the message (and exits 0, so the launcher prints no failure report of its
# own); the launching process then shows the first message once, as one line, with exit code 2.
@app.command("select", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--strategy", "strategy_name", required=True, help="strategy name (see `kvrl strategies`)")
@click.option("--model", default=None, help="hub id, local directory, .gguf file or random:ARCH (default: the embedded model)")
@click.option("--gguf-file", default=None, help="GGUF file inside --model DIR")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help="scores file (.safetensors or .tsv)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--data-dir", default=None, help="local data directory (layout of shared/data)")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16, bfloat16")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda (under --num-processes: cuda:LOCAL_RANK per process)")
@click.option("--trust-remote-code", is_flag=True, help="allow model code from the hub (off by default)")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option("--resume", is_flag=True, help="continue a training strategy from its last checkpoint (OUTPUT.run/)")
@click.option("--num-processes", default=1, show_default=True, type=int,
              help="data-parallel processes (accelerate launch): rlkv splits each step's prompts and sums gate gradients over them")
@click.option("--rollout-engine", default="transformers", show_default=True,
              help="where a strategy that samples from the gated model (rlkv) samples: transformers, or vllm (the gated model in "
                   "vLLM, its gates replaced after every step; the backward stays in transformers)")
@click.pass_context
def select_command(ctx: click.Context, strategy_name: str, model: str | None, gguf_file: str | None, output: Path | None,
                   seed: int, data_dir: str | None, dtype: str, device: str, trust_remote_code: bool, overwrite: bool, resume: bool,
                   num_processes: int, rollout_engine: str) -> None:
    """Score every (layer, KV head) with a strategy and write a HeadScores file.

    Strategy options follow as `--option value` (see `kvrl strategies NAME`).
    """
    if num_processes > 1 and rollout_engine != "transformers":
        raise KvrlError(f"--rollout-engine {rollout_engine} runs one process (one engine beside one learner); drop --num-processes")
    rank, world_size = check_num_processes(num_processes)
    watch_rank()  # a rank of a data-parallel run: its failure ends the whole run
    if num_processes > 1:
        select_inputs(strategy_name, ctx.args, output, overwrite, seed=seed, device=device, resume=resume)  # refuse bad input once, before launching anything
        launch_data_parallel(num_processes)
        return
    if world_size <= 1:
        run_select(ctx.args, strategy_name, model, gguf_file, output, seed, data_dir, dtype, device, trust_remote_code, overwrite, resume,
                   rollout_engine)
        return
    try:
        run_select(ctx.args, strategy_name, model, gguf_file, output, seed, data_dir, dtype, device, trust_remote_code, overwrite, resume)
    except KvrlError as err:
        report_rank_error(err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What a training strategy keeps in the work folder OUTPUT.run/ (a fresh run starts without them; --resume keeps them).
RUN_FILES = ("train_log.jsonl", "checkpoint.pt", "checkpoint.pt.tmp", "train_set.jsonl", "training.png", "gates.png")


def work_dir_of(output: Path) -> Path:
    return output.with_suffix(".run")


def earlier_run_files(work_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (work_dir / name).exists()]


def select_inputs(strategy_name: str, args: list[str], output: Path | None, overwrite: bool, quiet: bool = False, *,
                  seed: int = 0, device: str = "cpu", resume: bool = False):
    """`(entry, options, output, device)`, checked before any model loads: the strategy and its options, the
    seed, the device, and that the output file and its work folder can be written."""
    entry = get_strategy(strategy_name, strategies_with_warnings(quiet))  # quiet: the launching process showed the warnings
    options = parse_strategy_options(entry.cls, args)
    check_seed(seed)
    device = check_device(device)
    output = output or Path(f"heads-{strategy_name}.safetensors")
    if output.suffix not in (".safetensors", ".tsv"):
        raise KvrlError(f"output {output} must end in .safetensors or .tsv")
    check_writable(output, overwrite)  # fail before loading a model or training anything
    work_dir = work_dir_of(output)
    if work_dir.exists():
        if not work_dir.is_dir():
            raise KvrlError(f"cannot write the work folder {work_dir}: it is a file, not a folder")
        check_folder_writable(work_dir)
        earlier = earlier_run_files(work_dir)
        if earlier and not resume and not overwrite:
            raise KvrlError(f"{work_dir} holds an earlier run ({', '.join(earlier)}); pass --resume to continue it "
                            "or --overwrite to start afresh")
    return entry, options, output, device


def clear_earlier_run(work_dir: Path) -> None:
    """A fresh run starts with a clean work folder: the log, checkpoint and training set of an earlier run go."""
    for name in earlier_run_files(work_dir):
        try:
            (work_dir / name).unlink()
        except OSError as err:
            raise KvrlError(f"cannot remove {work_dir / name} of an earlier run: {err.strerror or type(err).__name__}") from None


def check_result(scores, entry: StrategyEntry, lm) -> None:
    """Refuse what a strategy's select returned unless it is a HeadScores of this model's shape."""
    who = f"strategy {entry.cls.name!r} ({entry.origin})"
    if not isinstance(scores, HeadScores):
        raise KvrlError(f"{who} returned {type(scores).__name__}, not HeadScores; nothing was written")
    values = scores.scores
    if not isinstance(values, torch.Tensor) or values.ndim != 2 or not torch.isfinite(values).all():
        raise KvrlError(f"{who} returned scores that are not a finite [layers, kv_heads] matrix; nothing was written")
    try:
        scores.check_shape(ModelShape.from_config(lm.config))
    except KvrlError as err:
        raise KvrlError(f"{who} returned the wrong shape: {err}; nothing was written") from None


def step_line(name: str, step: int, total: int, metrics: dict) -> str:
    """One plain progress line (stdout not a terminal): step k/n, reward, mean alpha, loss, seconds."""
    parts = [f"{name} step {step}/{total}"]
    for key, label in (("mean_reward", "reward"), ("mean_alpha", "mean alpha"), ("loss", "loss")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{label} {metrics[key]:.4g}")
    if isinstance(metrics.get("seconds"), (int, float)):
        parts.append(f"{metrics['seconds']:.1f} s")
    return ", ".join(parts)


def in_select_dtype(lm, dtype: str, device: str, show: Console):
    """`--dtype auto` on the CPU: the dtype the model's profile selects in (the embedded model: bfloat16), else as loaded."""
    wanted = profile_of(lm).select_dtype
    if dtype != "auto" or device != "cpu" or wanted is None or lm.dtype == _DTYPES[wanted]:
        return lm
    show.print(f"--dtype auto: {wanted}, the {profile_of(lm).family} profile's selection dtype (--dtype float32 to keep float32)",
               highlight=False, markup=False)
    return lm.to(_DTYPES[wanted])


ROLLOUT_ENGINES = ("transformers", "vllm")


def check_rollout_engine(name: str, entry: StrategyEntry, model: str | None, gguf_file: str | None) -> None:
    """Refuse `--rollout-engine` values `select` cannot run, before a model loads."""
    if name not in ROLLOUT_ENGINES:
        raise KvrlError(f"unknown --rollout-engine {name!r}; accepted: {', '.join(ROLLOUT_ENGINES)}")
    if name == "transformers":
        return
    if not entry.cls.samples_rollouts:
        raise KvrlError(f"--rollout-engine {name} is for strategies that sample from a gated model (rlkv); "
                        f"{entry.cls.name!r} samples nothing")
    if gguf_file:
        raise KvrlError("--rollout-engine vllm loads a folder of weights or a hub id, not a GGUF file")
    model_folder(model)  # refuses random: and .gguf models in one line
    check_vllm()


def rollout_engine_factory(name: str, model: str | None, lm):
    """`SelectionContext.rollout_engine`: None (transformers), or a callable that starts the gated model in vLLM with the
    learner's streaming branch, in the learner's dtype."""
    if name == "transformers":
        return None
    dtype = str(lm.dtype).removeprefix("torch.")
    max_len = min(int(getattr(lm.config, "max_position_embeddings", 32768) or 32768), 32768)
    return lambda **branch: GatedRollouts(model, GatedBranch(**branch), dtype=dtype, max_model_len=max_len)


def run_select(args: list[str], strategy_name: str, model: str | None, gguf_file: str | None, output: Path | None, seed: int,
               data_dir: str | None, dtype: str, device: str, trust_remote_code: bool, overwrite: bool, resume: bool,
               rollout_engine: str = "transformers") -> None:
    """One process of `kvrl select`; under a data-parallel launch only rank 0 prints and writes files."""
    rank, world_size = distributed_rank()
    show = console if rank == 0 else Console(quiet=True)
    if rank > 0:  # only rank 0 prints: no warnings or loading bars from the others
        from transformers.utils import logging as hf_logging

        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
    entry, options, output, device = select_inputs(strategy_name, args, output, overwrite, quiet=rank > 0, seed=seed, device=device,
                                                   resume=resume)
    check_rollout_engine(rollout_engine, entry, model, gguf_file)
    device = join_process_group(device)
    with show.status(escape(f"loading model {model or '(default)'}")):
        lm, tokenizer = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        lm = in_select_dtype(lm, dtype, device, show)
    selector = entry.cls(options)
    show.print(selector.resolved_options(lm), highlight=False, markup=False)
    work_dir = work_dir_of(output)  # shared by the ranks: the strategy writes from rank 0 and resumes every rank from it
    if not resume and rank == 0:
        clear_earlier_run(work_dir)
    # on a terminal a progress bar; elsewhere (a log file, a pipe) one plain line per step, flushed
    plain = rank == 0 and not show.is_terminal
    with Progress(TextColumn(strategy_name, markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}", markup=False),
                  TimeElapsedColumn(), console=show, disable=rank > 0 or plain) as progress:
        bar = progress.add_task(strategy_name, total=None, metrics="")

        def on_step(step: int, total: int, metrics) -> None:
            shown = metrics if isinstance(metrics, dict) else {"loss": metrics}
            if plain:
                show.print(step_line(strategy_name, step, total, shown), highlight=False, markup=False, soft_wrap=True)
                show.file.flush()
                return
            text = " ".join(f"{k}={v:.3g}" for k, v in shown.items() if isinstance(v, float) and k in ("mean_reward", "mean_alpha", "beta_prime", "seconds", "loss"))
            progress.update(bar, completed=step, total=total, metrics=text)

        context = SelectionContext(seed=seed, data_dir=data_dir, device=device, model_id=model_id(lm), work_dir=str(work_dir),
                                   resume=resume, on_step=on_step, rollout_engine=rollout_engine_factory(rollout_engine, model, lm))
        try:
            scores = selector.select(lm, tokenizer, context)
        except SystemExit as exit_:  # a strategy must not end kvrl (quietly, with exit 0) in the middle of a select
            raise KvrlError(f"strategy {strategy_name!r} ({entry.origin}) called exit({exit_.code!r}) in select; nothing was written") from None
    if rank > 0:
        return
    check_result(scores, entry, lm)
    named = model or os.environ.get("KVRL_MODEL") or DEFAULT_MODEL
    scores.extra = {**scores.extra, "weights": weights_identity(str(Path(named) / gguf_file) if gguf_file else named), "code": code_identity(),
                    "dtype": str(lm.dtype).removeprefix("torch.")}
    if output.suffix == ".tsv":
        scores.to_tsv(output, overwrite=overwrite)
    else:
        scores.save(output, overwrite=overwrite)
    processes = f", {world_size} processes" if world_size > 1 else ""
    show.print(f"wrote {output}: {scores.shape[0]} layers x {scores.shape[1]} KV heads, strategy {strategy_name}, "
               f"{scores.wall_time_s or 0:.2f} s{processes}", highlight=False, markup=False)
    if (work_dir / "train_log.jsonl").is_file():
        curves = training_curves(work_dir / "train_log.jsonl", work_dir / "training.png")
        heatmap = gate_heatmap(scores, work_dir / "gates.png")
        show.print(f"training log {work_dir / 'train_log.jsonl'}, plots {curves} and {heatmap}", highlight=False, markup=False)


def check_full_heads(full_policy: str | None, full_budget: str | None):
    """The full heads' policy of a hybrid plan (None: they keep everything); the two options go together."""
    if (full_policy is None) != (full_budget is None):
        raise KvrlError("--full-policy and --full-budget go together: a policy and what it keeps (0.5 of the sequence, or 512 tokens)")
    return None if full_policy is None else full_head_policy(full_policy, full_budget)


@app.command("plan")
@click.option("--heads", required=True, type=click.Path(path_type=Path), help="scores file (.safetensors or .tsv)")
@click.option("--sparsity", required=True, type=float, help="fraction of KV heads to compress, in [0, 1]")
@click.option("--seq-len", default=8192, show_default=True, type=int, help="sequence length for the memory estimate")
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--head-dim", default=128, show_default=True, type=int)
@click.option("--dtype", "dtype_name", default="bfloat16", show_default=True, help="float32, float16, bfloat16")
@click.option("--compressed-policy", default="streaming", show_default=True, help="token policy of compressed heads")
@click.option("--rule", "rule", type=click.Choice(["official", "round"]), default="official", show_default=True,
              help="official: RLKV's quantile threshold with seeded tie-breaking noise; round: exactly round(n * s) heads")
@click.option("--full-policy", default=None, help="a hybrid plan: token policy of the full heads too (streaming, snapkv, h2o, rkv)")
@click.option("--full-budget", default=None, help="with --full-policy: what full heads keep, a fraction of the sequence (0.5) or tokens (512)")
def plan_command(heads: Path, sparsity: float, seq_len: int, batch: int, head_dim: int, dtype_name: str, compressed_policy: str, rule: str,
                 full_policy: str | None, full_budget: str | None) -> None:
    """Print the plan for a scores file and its KV memory against the full cache."""
    if dtype_name not in _DTYPES:
        raise KvrlError(f"unknown dtype {dtype_name!r}; accepted: {', '.join(_DTYPES)}")
    if seq_len < 1 or batch < 1 or head_dim < 1:
        raise KvrlError("--seq-len, --batch and --head-dim must be positive")
    full_heads = check_full_heads(full_policy, full_budget)
    scores = HeadScores.load(heads)
    plan = plan_from_scores(scores, sparsity, compressed_policy, rule)  # 80 tokens per compressed head whatever the policy
    if full_heads is not None:
        plan = replace(plan, full_policy=full_heads)
    dtype: torch.dtype = _DTYPES[dtype_name]
    console.print(plan.summary(), highlight=False, markup=False)
    planned = plan.kv_bytes(seq_len, batch, head_dim=head_dim, dtype=dtype)
    full = plan.full_kv_bytes(seq_len, batch, head_dim=head_dim, dtype=dtype)
    table = Table(title=f"KV memory at {seq_len} tokens, batch {batch}, head dim {head_dim}, {dtype_name}")
    for column in ("cache", "bytes", "MiB", "of full"):
        table.add_column(column, justify="right")
    table.add_row("full", str(full), f"{full / 2**20:.2f}", "100.0%")
    table.add_row("plan", str(planned), f"{planned / 2**20:.2f}", f"{100 * planned / full:.1f}%")
    console.print(table)


app.add_command(eval_command)
app.add_command(report_command)
app.add_command(embedded_group)
app.add_command(export_command)
app.add_command(serve_command)
app.add_command(tune_command)


def main() -> None:
    app(prog_name="kvrl")


if __name__ == "__main__":
    sys.exit(main())
