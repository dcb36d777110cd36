"""`kvrl select`: score every (layer, KV head) with a strategy and write a HeadScores file.

Under `kvrl select --num-processes N` the launching process checks the request once and starts N ranks on it
(`kvpress_rl.cli.launch`); a rank that hits a KvrlError leaves the message for the launching process, which shows
the first one as one line, with exit code 2. Only rank 0 prints and writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvpress_rl.cli.engines import ENGINE_LENGTH_CAP, ENGINES, engine_max_model_len
from kvpress_rl.cli.launch import (
    check_num_processes,
    distributed_rank,
    join_process_group,
    launch_data_parallel,
    rank_process,
    watch_rank,
)
from kvpress_rl.cli.options import parse_strategy_options
from kvpress_rl.cli.output import quiet_other_ranks, strategies_with_warnings
from kvpress_rl.engines.vllm.engine import GatedRollouts, check_vllm, gated_engine_refusal, model_folder
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.plots import gate_heatmap, training_curves
from kvpress_rl.identity import code_identity, weights_identity
from kvpress_rl.io import check_folder_writable, check_writable
from kvpress_rl.models import (
    _DTYPES,
    ModelShape,
    auto_dtype,
    check_device,
    check_seed,
    load_model,
    model_id,
    model_spec,
)
from kvpress_rl.plugins import StrategyEntry, get_strategy
from kvpress_rl.profiles import profile_of
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import SelectionContext

# What a training strategy keeps in the work folder OUTPUT.run/ (a fresh run starts without them; --resume keeps them).
RUN_FILES = ("train_log.jsonl", "checkpoint.pt", "checkpoint.pt.tmp", "train_set.jsonl", "training.png", "gates.png")
SHOWN_METRICS = ("mean_reward", "mean_alpha", "beta_prime", "seconds", "loss")  # beside a terminal's progress bar


@dataclass(frozen=True, kw_only=True)
class SelectRequest:
    """One `kvrl select`, as its options give it (and as every rank of a data-parallel run gets it, as JSON)."""

    strategy: str
    strategy_args: tuple[str, ...] = ()  # the strategy's own options, `--option value` words
    model: str | None = None
    gguf_file: str | None = None
    output: str | None = None  # default: heads-STRATEGY.safetensors
    seed: int = 0
    data_dir: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    overwrite: bool = False
    resume: bool = False
    rollout_engine: str = "auto"


@dataclass(frozen=True, kw_only=True)
class CheckedSelect:
    """What `select_inputs` checked before any model loads: the strategy, its options, the output and the device."""

    entry: StrategyEntry
    options: Any
    output: Path
    device: str


@click.command("select", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--strategy", "strategy_name", required=True, help="strategy name (see `kvrl strategies`)")
@click.option("--model", default=None,
              help="hub id, local directory, .gguf file or random:ARCH (default: the embedded model)")
@click.option("--gguf-file", default=None, help="GGUF file inside --model DIR")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="scores file (.safetensors or .tsv)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--data-dir", default=None, help="local data directory (layout of shared/data)")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16, bfloat16")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda (under --num-processes: cuda:LOCAL_RANK per process)")
@click.option("--trust-remote-code", is_flag=True, help="allow model code from the hub (off by default)")
@click.option("--overwrite", is_flag=True, help="replace an existing output file")
@click.option("--resume", is_flag=True, help="continue a training strategy from its last checkpoint (OUTPUT.run/)")
@click.option("--num-processes", default=1, show_default=True, type=int,
              help="data-parallel processes (accelerate launch): rlkv splits each step's prompts and sums gate "
                   "gradients over them")
@click.option("--rollout-engine", default="auto", show_default=True,
              help="where a strategy that samples from the gated model (rlkv) samples: transformers, vllm (the "
                   "gated model in vLLM, its gates replaced after every step; the backward stays in transformers), "
                   "or auto: vllm where it is installed and runs the model in one process, else transformers")
@click.pass_context
def select_command(ctx: click.Context, strategy_name: str, model: str | None, gguf_file: str | None,
                   output: Path | None, seed: int, data_dir: str | None, dtype: str, device: str,
                   trust_remote_code: bool, overwrite: bool, resume: bool, num_processes: int,
                   rollout_engine: str) -> None:
    """Score every (layer, KV head) with a strategy and write a HeadScores file.

    Strategy options follow as `--option value` (see `kvrl strategies NAME`).
    """
    request = SelectRequest(strategy=strategy_name, strategy_args=tuple(ctx.args), model=model, gguf_file=gguf_file,
                            output=None if output is None else str(output), seed=seed, data_dir=data_dir, dtype=dtype,
                            device=device, trust_remote_code=trust_remote_code, overwrite=overwrite, resume=resume,
                            rollout_engine=rollout_engine)
    check_processes(request, num_processes)
    watch_rank()  # a rank of a data-parallel run: its failure ends the whole run
    if num_processes > 1:
        select_inputs(request)  # refuse bad input once, before launching anything
        launch_data_parallel(num_processes, request)
        return
    with rank_process():
        run_select(request)


def check_processes(request: SelectRequest, num_processes: int) -> None:
    """Refuse a bad `--num-processes`, and a rollout engine beside more than one process."""
    _, world_size = check_num_processes(num_processes)
    if max(num_processes, world_size) > 1 and request.rollout_engine not in ("transformers", "auto"):
        raise KvrlError(f"--rollout-engine {request.rollout_engine} runs one process (one engine beside one learner); "
                        "drop --num-processes")


def work_dir_of(output: Path) -> Path:
    return output.with_suffix(".run")


def earlier_run_files(work_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (work_dir / name).exists()]


def select_inputs(request: SelectRequest, quiet: bool = False) -> CheckedSelect:
    """Everything checked before any model loads: the strategy and its options, the seed, the device, and that the
    output file and its work folder can be written (`quiet`: the launching process showed the plugin warnings)."""
    entry = get_strategy(request.strategy, strategies_with_warnings(quiet))
    options = parse_strategy_options(entry.cls, list(request.strategy_args))
    check_seed(request.seed)
    device = check_device(request.device)
    output = Path(request.output or f"heads-{request.strategy}.safetensors")
    if output.suffix not in (".safetensors", ".tsv"):
        raise KvrlError(f"output {output} must end in .safetensors or .tsv")
    check_writable(output, request.overwrite)  # fail before loading a model or training anything
    check_work_dir(work_dir_of(output), request)
    return CheckedSelect(entry=entry, options=options, output=output, device=device)


def check_work_dir(work_dir: Path, request: SelectRequest) -> None:
    """The work folder can be written, and an earlier run in it is neither resumed nor replaced silently."""
    if not work_dir.exists():
        return
    if not work_dir.is_dir():
        raise KvrlError(f"cannot write the work folder {work_dir}: it is a file, not a folder")
    check_folder_writable(work_dir)
    earlier = earlier_run_files(work_dir)
    if earlier and not request.resume and not request.overwrite:
        raise KvrlError(f"{work_dir} holds an earlier run ({', '.join(earlier)}); pass --resume to continue it "
                        "or --overwrite to start afresh")


def clear_earlier_run(work_dir: Path) -> None:
    """A fresh run starts with a clean work folder: the log, checkpoint and training set of an earlier run go."""
    for name in earlier_run_files(work_dir):
        try:
            (work_dir / name).unlink()
        except OSError as err:
            why = err.strerror or type(err).__name__
            raise KvrlError(f"cannot remove {work_dir / name} of an earlier run: {why}") from None


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
    """`--dtype auto` on the CPU: the dtype the model's profile selects in (the embedded model: bfloat16); on a GPU
    `load_model` chose it already."""
    if dtype != "auto" or device != "cpu":
        return lm
    wanted = auto_dtype(device, profile_of(lm).select_dtype)
    if lm.dtype == _DTYPES[wanted]:
        return lm
    show.print(f"--dtype auto: {wanted}, the {profile_of(lm).family} profile's selection dtype "
               "(--dtype float32 to keep float32)", highlight=False, markup=False)
    return lm.to(_DTYPES[wanted])


def chosen_rollout_engine(name: str, entry: StrategyEntry, model: str, gguf_file: str | None, world_size: int,
                          show: Console) -> str:
    """The engine `--rollout-engine` names, checked before a model loads; `auto`: vllm where it can sample this
    strategy's rollouts of this model in one process (it samples faster than the learner's own loop,
    benchmarks/README.md), else transformers, said in one line either way."""
    if name != "auto":
        check_rollout_engine(name, entry, model, gguf_file)
        return name
    if not entry.cls.samples_rollouts:
        return "transformers"
    refusal = ("it runs in one process" if world_size > 1 else
               "it loads a folder of weights or a hub id" if gguf_file else gated_engine_refusal(model))
    chosen = "transformers" if refusal else "vllm"
    why = f" (not vllm: {refusal})" if refusal else " (--rollout-engine transformers for the learner's own loop)"
    show.print(f"--rollout-engine auto: {chosen}{why}", highlight=False, markup=False)
    return chosen


def check_rollout_engine(name: str, entry: StrategyEntry, model: str, gguf_file: str | None) -> None:
    """Refuse `--rollout-engine` values `select` cannot run, before a model loads."""
    if name not in ENGINES:
        raise KvrlError(f"unknown --rollout-engine {name!r}; accepted: auto, {', '.join(ENGINES)}")
    if name == "transformers":
        return
    if not entry.cls.samples_rollouts:
        raise KvrlError(f"--rollout-engine {name} is for strategies that sample from a gated model (rlkv); "
                        f"{entry.cls.name!r} samples nothing")
    if gguf_file:
        raise KvrlError("--rollout-engine vllm loads a folder of weights or a hub id, not a GGUF file")
    model_folder(model)  # refuses random: and .gguf models in one line
    check_vllm()


def rollout_sampler(name: str, model: str, lm) -> GatedRollouts | None:
    """`SelectionContext.sampler`: None (the strategy's own loop in transformers), or vLLM's gated model in the
    learner's dtype (its engine starts on the first rollouts, with the learner's streaming branch)."""
    if name == "transformers":
        return None
    dtype = str(lm.dtype).removeprefix("torch.")
    return GatedRollouts(model, dtype=dtype, max_model_len=engine_max_model_len(lm.config, unknown=ENGINE_LENGTH_CAP))


def run_select(request: SelectRequest) -> None:
    """One process of `kvrl select`; under a data-parallel launch only rank 0 prints and writes files."""
    rank, world_size = distributed_rank()
    show = quiet_other_ranks(rank)
    checked = select_inputs(request, quiet=rank > 0)
    model = model_spec(request.model)
    engine = chosen_rollout_engine(request.rollout_engine, checked.entry, model, request.gguf_file, world_size, show)
    device = join_process_group(checked.device)
    with show.status(escape(f"loading model {request.model or '(default)'}")):
        lm, tokenizer = load_model(request.model, dtype=request.dtype, device=device,
                                   trust_remote_code=request.trust_remote_code, gguf_file=request.gguf_file)
        lm = in_select_dtype(lm, request.dtype, device, show)
    selector = checked.entry.cls(checked.options)
    show.print(selector.resolved_options(lm), highlight=False, markup=False)
    work_dir = work_dir_of(checked.output)  # shared by the ranks: written from rank 0, every rank resumes from it
    if not request.resume and rank == 0:
        clear_earlier_run(work_dir)
    sampler = rollout_sampler(engine, model, lm)
    try:
        with StepProgress(request.strategy, show, rank) as on_step:
            context = SelectionContext(seed=request.seed, data_dir=request.data_dir, device=device,
                                       model_id=model_id(lm), work_dir=str(work_dir), resume=request.resume,
                                       on_step=on_step, sampler=sampler)
            scores = selected_scores(selector, lm, tokenizer, context, request.strategy, checked.entry)
    finally:
        if sampler is not None:
            sampler.close()
    if rank == 0:
        check_result(scores, checked.entry, lm)
        write_scores(scores, request, checked.output, lm, world_size, show)


def selected_scores(selector, lm, tokenizer, context: SelectionContext, name: str, entry: StrategyEntry):
    try:
        return selector.select(lm, tokenizer, context)
    except SystemExit as exit_:  # a strategy must not end kvrl (quietly, with exit 0) in the middle of a select
        raise KvrlError(f"strategy {name!r} ({entry.origin}) called exit({exit_.code!r}) in select; "
                        "nothing was written") from None


class StepProgress:
    """`on_step` for a strategy's select: on a terminal a progress bar; elsewhere (a log file, a pipe) one plain line
    per step, flushed; on ranks > 0 nothing."""

    def __init__(self, name: str, show: Console, rank: int) -> None:
        self.name, self.show = name, show
        self.plain = rank == 0 and not show.is_terminal
        self.progress = Progress(TextColumn(name, markup=False), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[metrics]}", markup=False), TimeElapsedColumn(), console=show,
                                 disable=rank > 0 or self.plain)

    def __enter__(self):
        self.progress.__enter__()
        self.bar = self.progress.add_task(self.name, total=None, metrics="")
        return self.on_step

    def __exit__(self, *exc_info) -> None:
        self.progress.__exit__(*exc_info)

    def on_step(self, step: int, total: int, metrics) -> None:
        shown = metrics if isinstance(metrics, dict) else {"loss": metrics}
        if self.plain:
            self.show.print(step_line(self.name, step, total, shown), highlight=False, markup=False, soft_wrap=True)
            self.show.file.flush()
            return
        text = " ".join(f"{k}={v:.3g}" for k, v in shown.items() if isinstance(v, float) and k in SHOWN_METRICS)
        self.progress.update(self.bar, completed=step, total=total, metrics=text)


def write_scores(scores: HeadScores, request: SelectRequest, output: Path, lm, world_size: int, show: Console) -> None:
    """The scores file with its provenance, and a training strategy's plots beside its log."""
    named = model_spec(request.model)
    weights = weights_identity(str(Path(named) / request.gguf_file) if request.gguf_file else named)
    scores.extra = {**scores.extra, "weights": weights, "code": code_identity(),
                    "dtype": str(lm.dtype).removeprefix("torch.")}
    if output.suffix == ".tsv":
        scores.to_tsv(output, overwrite=request.overwrite)
    else:
        scores.save(output, overwrite=request.overwrite)
    processes = f", {world_size} processes" if world_size > 1 else ""
    show.print(f"wrote {output}: {scores.shape[0]} layers x {scores.shape[1]} KV heads, strategy {request.strategy}, "
               f"{scores.wall_time_s or 0:.2f} s{processes}", highlight=False, markup=False)
    log = work_dir_of(output) / "train_log.jsonl"
    if log.is_file():
        curves = training_curves(log, log.with_name("training.png"))
        heatmap = gate_heatmap(scores, log.with_name("gates.png"))
        show.print(f"training log {log}, plots {curves} and {heatmap}", highlight=False, markup=False)
