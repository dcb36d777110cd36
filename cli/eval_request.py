"""What `kvrl eval` (and the cells of `kvrl tune`) is asked to run: `EvalRequest`, the options as given (every rank
of a data-parallel run gets it as JSON), and `eval_inputs`, which checks it all and builds the grid's `GridSpec`
before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.cli.options import check_full_heads_pair, check_training_strategies, parse_heads
from kvpress_rl.cli.output import strategies_with_warnings
from kvpress_rl.engines.vllm.engine import check_vllm, model_folder
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.grid_spec import GridSpec
from kvpress_rl.evaluators.strategy_scores import load_heads
from kvpress_rl.evaluators.tasks import resolve_tasks
from kvpress_rl.identity import weights_identity
from kvpress_rl.models import (
    _DTYPES,
    DEFAULT_MODEL,
    auto_dtype,
    available_device,
    check_device,
    check_seed,
    looks_like_path,
    model_spec,
)
from kvpress_rl.plan import check_sparsity
from kvpress_rl.plugins import get_strategy
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS, compressed_head_policy, full_head_policy
from kvpress_rl.profiles import EMBEDDED_PROFILE


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """One `kvrl eval`, its options as given: lists are the comma-separated words of the command line."""

    tasks: str | None
    strategies: str
    sparsities: str
    seeds: str
    model: str | None
    heads: str | None
    limit: int
    batch_size: int
    max_tokens: int | None
    data_dir: str | None
    compressed_policy: str
    full_policy: str | None
    full_budgets: str | None
    plan_rule: str
    decoding_simulation: int | None
    allow_code_execution: bool
    chat_template: bool | None
    device: str | None
    dtype: str
    engine: str
    output: str
    recompute: bool


def split_list(value: str, kind, flag: str) -> list:
    try:
        return [kind(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise KvrlError(f"{flag}: {value!r} is not a comma-separated list of {kind.__name__}") from None


def check_engine(spec: GridSpec) -> None:
    """What the vLLM engine runs (head plans whose compressed heads keep sink + recent tokens), refused before
    loading."""
    check_vllm()
    model_folder(spec.model)
    token = [name for name, entry in spec.strategies if entry.cls.kind != "head"]
    if token or spec.compressed_policy != "streaming" or spec.full_policy:
        what = (f"token strategies ({', '.join(token)})" if token
                else "--compressed-policy other than streaming or --full-policy")
        raise KvrlError(f"--engine vllm runs head strategies whose compressed heads keep {SINK_TOKENS} sink + "
                        f"{WINDOW_TOKENS} recent tokens; not {what}")
    if spec.decoding_simulation:
        raise KvrlError("--engine vllm has no decoding simulation; pass --decoding-simulation 0 "
                        "or --engine transformers")


def full_budget_axis(full_policy: str | None, full_budgets: str | None) -> list[str]:
    """The `--full-budget` axis of a hybrid plan, each budget checked against `--full-policy`."""
    check_full_heads_pair(full_policy, full_budgets)
    budgets = split_list(full_budgets, str, "--full-budget") if full_budgets else []
    for budget in budgets:
        if budget != "all":
            full_head_policy(full_policy, budget)  # a bad policy or budget: refused before loading anything
    return budgets


def model_identity(spec: str) -> str:
    """The model as recorded in every cell: a local path resolved (it must exist), else the `--model` value."""
    if spec == DEFAULT_MODEL or spec.startswith("random:"):
        return spec
    path = Path(spec).expanduser()
    if not (looks_like_path(spec) or path.exists()):
        return spec  # a hub id
    if not path.exists():
        raise KvrlError(f"model path does not exist: {spec}")
    return str(path.resolve())


def eval_dtype(dtype: str, spec: str, device: str) -> str:
    """`--dtype`, with `auto` resolved: bfloat16 on a GPU; on the CPU float32, or the dtype the model's profile
    evaluates in (the embedded model: bfloat16, where its accuracy holds)."""
    if dtype != "auto":
        return dtype
    return auto_dtype(device, EMBEDDED_PROFILE.eval_dtype if spec == DEFAULT_MODEL else None)


def eval_inputs(request: EvalRequest, *, quiet: bool = False, validation: bool = False) -> tuple[GridSpec, str]:
    """`(GridSpec, device)`: every input checked before any model loads (and before any process is launched);
    `quiet`: a rank of a data-parallel run (the launching process showed the plugin warnings); `validation`: the
    tasks' validation split (tasks without one refused)."""
    found = strategies_with_warnings(quiet)
    chosen = [(name, get_strategy(name, found)) for name in split_list(request.strategies, str, "--strategy")]
    levels = [check_sparsity(s) for s in split_list(request.sparsities, float, "--sparsity")]
    seeds = [check_seed(s, "--seeds") for s in split_list(request.seeds, int, "--seeds")] or [0]
    head_files = parse_heads(request.heads, chosen)
    check_training_strategies(chosen, head_files)
    compressed_head_policy(request.compressed_policy)  # refuse an unknown policy before loading anything
    budgets = full_budget_axis(request.full_policy, request.full_budgets)
    if request.limit < 0 or request.batch_size < 1 or (request.max_tokens is not None and request.max_tokens < 1):
        raise KvrlError("--limit must be >= 0, --batch-size and --max-tokens positive")
    if request.dtype != "auto" and request.dtype not in _DTYPES:
        raise KvrlError(f"unknown dtype {request.dtype!r}; accepted: auto, {', '.join(_DTYPES)}")
    device = available_device(check_device(request.device) if request.device else "cuda")
    spec = model_spec(request.model)
    identity = model_identity(spec)
    default_task = EMBEDDED_PROFILE.default_task if spec == DEFAULT_MODEL else "gsm8k_r1"  # before the model loads
    grid = GridSpec(strategies=chosen, sparsities=levels, seeds=seeds, limit=request.limit or None,
                    batch_size=request.batch_size, max_new_tokens=request.max_tokens, heads=head_files,
                    tasks=split_list(request.tasks, str, "--tasks") if request.tasks else [default_task],
                    data_dir=request.data_dir, compressed_policy=request.compressed_policy, plan_rule=request.plan_rule,
                    allow_code_execution=request.allow_code_execution, chat_template=request.chat_template,
                    decoding_simulation=request.decoding_simulation, model=identity, weights=weights_identity(identity),
                    dtype=eval_dtype(request.dtype, spec, device), full_policy=request.full_policy,
                    full_budgets=budgets, engine=request.engine, split="validation" if validation else "test")
    if request.engine != "transformers":
        check_engine(grid)
    load_heads(grid)  # every --heads file exists and loads; its shape is checked once the model is loaded
    resolve_tasks(grid)  # bad task names, missing files, code execution: refused before the model loads
    return grid, device
