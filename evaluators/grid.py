"""The evaluation grid: task x strategy x sparsity (x seed), full cache included once per task.

Every cell is one lm-eval run (`simple_evaluate`) of the `kvrl` model under the cell's plan.
Each finished cell is appended to `grid.csv` in the output directory, its lm-eval results JSON
to `results/` and its samples to `samples/`, so an interrupted grid resumes from the cells done.

A cell is resumed only when it was made with the same settings: every row records its `definition`
(model and an identity of its weights, dtype, task data, limit, token limit, chat template, the code's
identity: version, git commit and uncommitted changes (`kvpress_rl.identity`), and, for strategy cells,
the strategy's version, heads, token policy, plan rule and decoding simulation). A row
whose definition differs, or an old row without one, is refused with one line unless the user
asks to recompute it. One `kvrl eval` at a time writes an output folder (`lock_output`).
"""

from __future__ import annotations

import csv
import fcntl
import functools
import hashlib
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvpress_rl.distributed import is_main_process
from kvpress_rl.embedded.task import EMBEDDED_TASK
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.scoring import classify
from kvpress_rl.evaluators.tasks import EMBEDDED_TASKS, TaskConfig, data_dir_from, resolve_task
from kvpress_rl.hub import is_hub_ref
from kvpress_rl.identity import code_identity, file_digest
from kvpress_rl.io import write_atomic
from kvpress_rl.models import ModelShape, model_id
from kvpress_rl.plan import build_plan
from kvpress_rl.plugins import StrategyEntry
from kvpress_rl.policies import full_head_policy
from kvpress_rl.scores import SCORES_FILE, HeadScores
from kvpress_rl.selector import SelectionContext

FULL = "full"


@dataclass
class Cell:
    task: str
    strategy: str
    sparsity: float
    seed: int
    accuracy: float
    correct: int
    total: int
    kv_fraction: float  # KV memory of the plan / full cache, at the mean sequence length
    decode_tokens_per_s: float
    overlength: int = 0  # wrong answers that hit the token limit
    repetitive: int = 0  # wrong answers caught by the repetition rule
    incorrect: int = 0  # other wrong answers
    repetition_stops: int = 0  # generations the repetition early stop ended
    definition: str = ""  # JSON of the settings that made the cell (`cell_definition`); "" in grids from before it was recorded
    full_heads: str = ""  # a hybrid plan: "POLICY:BUDGET" the full heads keep (`--full-policy`, `--full-budget`); "" = everything
    kv_measured: float = -1.0  # KV bytes the caches held at the end of each generation / the full cache's (-1: not measured)

    @property
    def key(self) -> tuple[str, str, float, int, str]:
        return (self.task, self.strategy, round(self.sparsity, 6), self.seed, self.full_heads)

    @property
    def label(self) -> str:
        """The strategy as tables and plots name it: `rlkv`, or `rlkv+rkv:0.5` for a hybrid plan."""
        return f"{self.strategy}+{self.full_heads}" if self.full_heads else self.strategy


GRID_REQUIRED = ("task", "strategy", "sparsity", "seed", "accuracy", "correct", "total", "kv_fraction", "decode_tokens_per_s")


def read_grid(path: Path) -> list[Cell]:
    """The cells of a `grid.csv`; a damaged file (cut short, edited by hand) is a one-line `KvrlError`."""
    if not path.exists():
        return []
    kinds = {f.name: f.type for f in fields(Cell)}

    def damaged(why: str) -> KvrlError:
        return KvrlError(f"{path} is damaged ({why}); repair it, or move it away and run again (kvrl will not overwrite it)")

    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in GRID_REQUIRED if c not in header]
            unknown = [c for c in header if c not in kinds]
            if not header:
                raise damaged("the file is empty")
            if missing or unknown:
                raise damaged("header " + "; ".join(part for part in (
                    f"misses {', '.join(missing)}" if missing else "", f"has unknown {', '.join(unknown)}" if unknown else "") if part))
            cells = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise damaged(f"line {reader.line_num} has {len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())} "
                                  f"fields, the header {len(header)}")
                try:
                    cells.append(Cell(**{k: (float(v) if kinds[k] in ("float", float) else int(v) if kinds[k] in ("int", int) else v)
                                         for k, v in row.items()}))
                except ValueError as err:
                    raise damaged(f"line {reader.line_num}: {err}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise damaged(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    return cells


def write_grid(path: Path, cells: list[Cell]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Cell)])
            writer.writeheader()
            writer.writerows(asdict(c) for c in cells)

    write_atomic(path, write, overwrite=True)


def parse_heads(value: str | None, strategies: list[tuple[str, StrategyEntry]]) -> dict[str, str]:
    """`--heads FILE` (one head strategy that is not a seeded draw) or `--heads NAME=FILE,NAME=FILE`."""
    if not value:
        return {}
    if "=" not in value:
        learned = [name for name, entry in strategies if entry.cls.kind == "head" and not entry.cls.averaged_over_seeds]
        if len(learned) != 1:
            raise KvrlError(f"--heads FILE needs exactly one head strategy besides random, got {learned or 'none'}; use --heads NAME=FILE,...")
        return {learned[0]: value}
    pairs = dict(part.split("=", 1) for part in value.split(",") if part)
    unknown = sorted(set(pairs) - {name for name, _ in strategies})
    if unknown:
        raise KvrlError(f"--heads names {', '.join(unknown)}, which --strategy does not list")
    return pairs


def check_training_strategies(strategies: list[tuple[str, StrategyEntry]], heads: dict[str, str]) -> None:
    """A strategy whose `select` is a training run needs its scores from `kvrl select`: evaluation does not train."""
    for name, entry in strategies:
        if entry.cls.trains and name not in heads:
            raise KvrlError(f"strategy {name!r} trains its scores (minutes to hours, with progress and checkpoints in `kvrl select`): "
                            f"run `kvrl select --strategy {name} --output heads-{name}.safetensors` first, then pass "
                            f"--heads {name}=heads-{name}.safetensors")


@dataclass
class GridSpec:
    strategies: list[tuple[str, StrategyEntry]]
    sparsities: list[float]
    seeds: list[int]
    limit: int | None = 100
    batch_size: int = 16
    max_new_tokens: int | None = None  # overrides the task's own limit (max_gen_toks)
    heads: dict[str, str] = field(default_factory=dict)  # strategy name -> scores file
    tasks: list[str] = field(default_factory=lambda: [EMBEDDED_TASK])
    data_dir: str | None = None
    compressed_policy: str = "streaming"  # token policy of the compressed heads of head strategies (hybrid plans)
    plan_rule: str = "official"  # how head strategies turn scores into a plan (`kvpress_rl.plan.PLAN_RULES`)
    allow_code_execution: bool = False
    chat_template: bool | None = None  # the user's flag, over each task's preference; None: the task's, else the tokenizer's
    decoding_simulation: int | None = None  # prompt tokens fed one at a time before generating; None: each task's default
    model: str = "embedded"  # the model as the user named it (the --model value, a path resolved), recorded in every cell
    weights: str = ""  # what identifies its weights (`kvpress_rl.identity.weights_identity`), recorded in every cell
    dtype: str = "float32"  # the dtype the model runs in (resolved from `auto`)
    full_policy: str | None = None  # a hybrid plan: token policy of the full heads of head strategies
    full_budgets: list[str] = field(default_factory=list)  # what they keep, one grid axis ("all": everything, "0.5", "512")
    engine: str = "transformers"  # what generates: the executor in this process, or "vllm" (kvpress_rl.engines.vllm)
    split: str = "test"  # the tasks' problems: test, or validation (`kvrl tune` chooses there)


def heads_identity(heads: str) -> str:
    """What identifies a `--heads` value in a cell's definition: the content hash of the scores file (a folder's
    `head_scores.safetensors`), or the `hf://` reference itself (pin a revision with `@REV` to make it exact)."""
    if is_hub_ref(heads):
        return str(heads)
    path = Path(heads)
    return f"file:{file_digest(path / SCORES_FILE if path.is_dir() else path)}"


def short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_heads(spec: GridSpec) -> dict[str, HeadScores]:
    """Every `--heads` file loaded (exists, readable) before the model loads."""
    return {name: HeadScores.load(path) for name, path in spec.heads.items()}


def check_head_shapes(spec: GridSpec, model) -> None:
    """`--heads` files made for another model shape: refused after the model loads, before any cell runs."""
    shape = ModelShape.from_config(model.config)
    for name, scores in check_heads(spec).items():
        try:
            scores.check_shape(shape)
        except KvrlError as err:
            raise KvrlError(f"heads of {name!r} do not fit this model: {err}") from None


def selection_key(spec: GridSpec, name: str, entry: StrategyEntry, seed: int) -> str:
    """What a `select` run inside the grid depends on: its cached scores are kept per key (so per model)."""
    data_dir = data_dir_from(spec.data_dir)
    return short_hash({"model": spec.model, "weights": spec.weights, "dtype": spec.dtype, "strategy": name,
                       "strategy_version": entry.cls.version, "seed": seed, "data_dir": str(data_dir.resolve()) if data_dir else None,
                       "kvrl": code_identity()})


def scores_path(entry: StrategyEntry, name: str, spec: GridSpec, seed: int, out: Path) -> str:
    """Where a strategy's scores come from: its `--heads`, else the file a grid in `out` caches its `select` in."""
    if name in spec.heads:
        return spec.heads[name]
    return str(out / "heads" / f"{name}-seed{seed}-{selection_key(spec, name, entry, seed)}.safetensors")


def scores_for(entry: StrategyEntry, name: str, spec: GridSpec, model, tokenizer, seed: int, out: Path) -> HeadScores:
    """The strategy's scores: from `--heads`, from an earlier run in `out` on the same model, or by running `select`
    (strategies that do not train)."""
    if name in spec.heads:
        scores = HeadScores.load(spec.heads[name])
    else:
        cached = Path(scores_path(entry, name, spec, seed, out))
        if cached.is_file():
            scores = HeadScores.load(cached)
        else:
            scores = entry.cls().select(model, tokenizer, SelectionContext(seed=seed, data_dir=spec.data_dir, model_id=model_id(model)))
            if is_main_process():
                scores.save(cached, overwrite=True)
    try:
        scores.check_shape(ModelShape.from_config(model.config))
    except KvrlError as err:
        raise KvrlError(f"heads of {name!r} do not fit this model: {err}") from None
    return scores


def task_data(config: TaskConfig, spec: GridSpec) -> Any:
    """What identifies a task's data: the content hash of its local files, else the data folder (or none: built in / hub)."""
    if config.name in EMBEDDED_TASKS:
        return "built in"  # generated by the package (its version is recorded)
    files = []
    if isinstance(config.spec, dict):
        data_files = (config.spec.get("dataset_kwargs") or {}).get("data_files") or {}
        files = sorted(data_files.values()) if isinstance(data_files, dict) else [data_files] if isinstance(data_files, str) else list(data_files)
    if files:
        return {Path(f).name if len(files) == 1 else str(f): file_digest(f) for f in files if Path(f).is_file()}
    data_dir = data_dir_from(spec.data_dir)
    return str(data_dir.resolve()) if data_dir and config.reads_hub is False else None


def cell_definition(spec: GridSpec, config: TaskConfig, name: str, entry: StrategyEntry | None, seed: int,
                    full_heads: str = "") -> dict[str, Any]:
    """The settings a cell's result depends on; a finished cell is reused only under the same definition."""
    definition: dict[str, Any] = {
        "kvrl": code_identity(), "model": spec.model, "weights": spec.weights, "dtype": spec.dtype, "task": config.name,
        "data": task_data(config, spec),
        "limit": spec.limit, "max_tokens": spec.max_new_tokens,
        "chat_template": chat_template_setting(spec, config),
    }
    if spec.engine != "transformers":  # cells of another engine are other cells (transformers cells keep their old keys)
        definition["engine"] = spec.engine
    if spec.split != "test":
        definition["split"] = spec.split
    if entry is not None:
        definition.update(strategy_version=entry.cls.version, decoding_simulation=spec.decoding_simulation)
        if entry.cls.kind == "head":
            heads = heads_identity(spec.heads[name]) if name in spec.heads else f"select:{selection_key(spec, name, entry, seed)}"
            definition.update(heads=heads, compressed_policy=spec.compressed_policy, plan_rule=spec.plan_rule)
            if full_heads:
                definition.update(full_heads=full_heads)
    return definition


FLAG_OF = {"kvrl": "kvrl version", "model": "--model", "weights": "model weights", "dtype": "--dtype", "data": "task data (--data-dir)", "limit": "--limit",
           "max_tokens": "--max-tokens", "chat_template": "--chat-template", "strategy_version": "strategy version",
           "decoding_simulation": "--decoding-simulation", "heads": "--heads", "compressed_policy": "--compressed-policy",
           "plan_rule": "--plan-rule", "engine": "--engine", "split": "split"}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else str(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return ", ".join(f"{FLAG_OF.get(k, k)} {show(old.get(k))} -> {show(new.get(k))}" for k in changed[:4]) + (
        f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def plan_resume(spec: GridSpec, out: Path, recompute: bool = False, configs: list[TaskConfig] | None = None) -> tuple[list[Cell], list[tuple]]:
    """`(cells kept, cells to run)`: a finished cell is kept only when its definition is today's.

    A row made with other settings (or an old row that recorded none) is refused with one line,
    unless `recompute`: then every such row is dropped and the cells this run covers run again.
    Rows of cells outside this run are kept when their task-level settings (model, data, limits,
    version) match this run's, since they are compared against its full-cache cell.
    """
    configs = configs if configs is not None else resolve_tasks(spec)
    grid_path = out / "grid.csv"
    cells = read_grid(grid_path)
    wanted: dict[tuple, tuple[TaskConfig, str, float, int, StrategyEntry | None, dict]] = {}
    common: dict[str, dict] = {}
    for config in configs:
        common[config.name] = cell_definition(spec, config, FULL, None, 0)
        for name, sparsity, seed, entry, full_heads in grid_cells(spec):
            wanted[(config.name, name, round(sparsity, 6), seed, full_heads)] = (
                config, name, sparsity, seed, entry, full_heads, cell_definition(spec, config, name, entry, seed, full_heads))
    kept, stale = [], []
    for cell in cells:
        if cell.key in wanted:
            expected = wanted[cell.key][-1]
        elif cell.task in common:
            expected = common[cell.task]
        else:
            kept.append(cell)  # another task: nothing of this run is compared with it
            continue
        try:
            recorded = json.loads(cell.definition) if cell.definition else None
        except json.JSONDecodeError:
            recorded = {"definition": "unreadable"}
        if cell.key not in wanted and recorded is not None:
            recorded = {k: recorded.get(k) for k in expected}  # only the task-level settings matter for cells outside this run
        if recorded == expected:
            kept.append(cell)
        else:
            stale.append((cell, recorded, expected))
    if stale and not recompute:
        cell, recorded, expected = stale[0]
        what = "was made by an older kvrl that did not record its settings" if recorded is None else \
            f"was made with other settings ({describe_change(recorded, expected)})"
        others = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise KvrlError(f"{grid_path}: cell {cell.task} {cell.strategy} s={cell.sparsity:g} seed={cell.seed} {what}{others}; "
                        f"pass --recompute to redo what differs, or use a new --output")
    done = {c.key for c in kept}
    todo = [item[:-1] for key, item in wanted.items() if key not in done]
    return kept, todo


OUTPUT_LOCK = ".kvrl-eval.lock"
LOCK_HELD_ENV = "KVRL_EVAL_LOCK_HELD"  # set by a launching process that holds the lock for its ranks


def check_output(out: Path) -> None:
    """The output folder exists (created) and takes files: refused with one line before the model loads."""
    if out.exists() and not out.is_dir():
        raise KvrlError(f"--output {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kvrl-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise KvrlError(f"--output {out} is not writable: {err.strerror or err}") from None


def lock_output(out: Path):
    """Hold `out/.kvrl-eval.lock` (flock) for this process's lifetime, or refuse a second writer with one line.

    Returns the open lock file (keep it referenced; closing it releases the lock).
    """
    check_output(out)
    handle = (out / OUTPUT_LOCK).open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise KvrlError(f"{out} is being written by another `kvrl eval`{f' (pid {holder})' if holder else ''}; "
                        "wait for it to finish or pass another --output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def full_heads_axis(spec: GridSpec, entry: StrategyEntry) -> list[str]:
    """The hybrid axis of a strategy: "POLICY:BUDGET" per `--full-budget` for head strategies ("" = full heads keep everything)."""
    if entry.cls.kind != "head" or not spec.full_policy:
        return [""]
    return ["" if budget == "all" else f"{spec.full_policy}:{budget}" for budget in spec.full_budgets]


def grid_cells(spec: GridSpec) -> list[tuple[str, float, int, StrategyEntry | None, str]]:
    """Full cache once, then strategy x seed (every seed for strategies `averaged_over_seeds`) x full-head budget x sparsity."""
    todo: list[tuple[str, float, int, StrategyEntry | None, str]] = [(FULL, 0.0, 0, None, "")]
    for name, entry in spec.strategies:
        for seed in spec.seeds if entry.cls.averaged_over_seeds else spec.seeds[:1]:
            for full_heads in full_heads_axis(spec, entry):
                todo.extend((name, sparsity, seed, entry, full_heads) for sparsity in spec.sparsities)
    return todo


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task index (slow to build: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_tasks(spec: GridSpec) -> list[TaskConfig]:
    """Every task's config, checked (names, data files, code execution) before any model work."""
    manager = task_manager()
    data_dir = data_dir_from(spec.data_dir)
    configs = [resolve_task(name, data_dir, manager, embedded_tokens=spec.max_new_tokens, split=spec.split) for name in spec.tasks]
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    for config in configs:
        if offline and config.reads_hub:
            raise KvrlError(f"task {config.name!r} reads its data from the Hugging Face hub, which is offline here; "
                            "pass --data-dir (a folder laid out like shared/data)")
        if config.unsafe_code and not spec.allow_code_execution:
            raise KvrlError(f"task {config.name!r} runs model-written code; pass --allow-code-execution to allow it")
    return configs


# --- the chat template: the user's flag, else the task's preference, else whether the tokenizer has one ---
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")  # beside tokenizer_config.json


def chat_template_setting(spec: GridSpec, config: TaskConfig) -> bool | None:
    """What a cell asks for: `--chat-template`/`--no-chat-template` if given, else the task's preference.

    None: the tokenizer's own (on when it has one), which the model recorded beside it fixes."""
    return spec.chat_template if spec.chat_template is not None else config.chat_template


def tokenizer_has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def folder_has_chat_template(model: str) -> bool | None:
    """Whether the tokenizer in model folder `model` has a chat template, read from its files before the model loads.

    None when it cannot be told from files here (a hub id, `embedded`, a `.gguf`, no tokenizer_config.json):
    the loaded tokenizer answers then. Any template file counts as one, so a folder is never refused wrongly."""
    folder = Path(model)
    tokenizer_config = folder / "tokenizer_config.json"
    if not folder.is_absolute() or not tokenizer_config.is_file():  # a folder is recorded resolved; `embedded` is a name
        return None
    if any((folder / name).exists() for name in TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return None


def check_chat_template(spec: GridSpec, configs: list[TaskConfig], has_template: bool | None) -> None:
    """A chat template asked for (by the user, or by a task with no flag given) on a tokenizer without one: one line.

    `has_template` None: not known yet (checked again once the tokenizer loads)."""
    if has_template is not False:
        return
    if spec.chat_template:
        raise KvrlError(f"--chat-template: the tokenizer of model {spec.model} has no chat template; "
                        "pass --no-chat-template (plain prompts) or a model whose tokenizer has one")
    for config in configs:
        if chat_template_setting(spec, config):
            raise KvrlError(f"task {config.name!r} uses the chat template by default, but the tokenizer of model {spec.model} "
                            "has none; pass --no-chat-template to run it on plain prompts")


def check_chat_template_before_loading(spec: GridSpec) -> None:
    """`check_chat_template` on what the model folder's files say, before the model (and its tokenizer) loads."""
    check_chat_template(spec, resolve_tasks(spec), folder_has_chat_template(spec.model))


def run_grid(lm, spec: GridSpec, out: Path, on_cell: Callable[[Cell], None] | None = None, recompute: bool = False) -> list[Cell]:
    """Evaluate every cell not already in `out/grid.csv` (under today's definition) with lm-eval; returns all cells.

    `lm` is a `KvrlLM`; its plan is set per cell. Per cell: lm-eval's results JSON in
    `results/`, the samples (with each answer's classification) in `samples/`.
    """
    configs = resolve_tasks(spec)
    check_head_shapes(spec, lm.model)  # before any cell: a wrong --heads file costs no full-cache run
    check_chat_template(spec, configs, tokenizer_has_chat_template(lm.tokenizer))  # likewise a template the tokenizer lacks
    grid_path = out / "grid.csv"
    cells, todo = plan_resume(spec, out, recompute, configs)
    if recompute and is_main_process() and len(cells) != len(read_grid(grid_path)):
        write_grid(grid_path, cells)  # the stale rows go now, whether or not this run redoes them
    for config, name, sparsity, seed, entry, full_heads in todo:
        plan = None
        if entry is not None:
            scores = scores_for(entry, name, spec, lm.model, lm.tokenizer, seed, out)
            full_policy = full_head_policy(*full_heads.split(":")) if full_heads else None
            plan = build_plan(entry.cls(), scores, sparsity, spec.compressed_policy, spec.plan_rule, full_policy)
        cell = run_cell(lm, config, spec, plan, (name, sparsity, seed, full_heads), out)
        if cell is None:  # not the main process of a data-parallel run
            continue
        cell.definition = json.dumps(cell_definition(spec, config, name, entry, seed, full_heads), sort_keys=True, default=str)
        cells.append(cell)
        write_grid(grid_path, cells)
        if on_cell:
            on_cell(cell)
    return cells


def run_cell(lm, config: TaskConfig, spec: GridSpec, plan, key: tuple[str, float, int, str], out: Path) -> Cell | None:
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    name, sparsity, seed, full_heads = key
    lm.plan = plan
    if spec.decoding_simulation is not None:
        lm.decoding_simulation = spec.decoding_simulation
    before = (lm.stats.generated_tokens, lm.stats.seconds, lm.stats.repetition_stops, lm.stats.kv_bytes_held, lm.stats.kv_bytes_full)
    has_template = tokenizer_has_chat_template(lm.tokenizer)
    check_chat_template(spec, [config], has_template)
    setting = chat_template_setting(spec, config)
    chat = has_template if setting is None else setting
    # --max-tokens replaces the task's answer limit, and the *_r1 tasks' cap on the total length with it
    gen_kwargs = {"max_gen_toks": spec.max_new_tokens, "max_total_tokens": None} if spec.max_new_tokens else None
    check_answer_limit(spec, config, lm.max_length)
    results = simple_evaluate(model=lm, tasks=[config.spec], task_manager=task_manager(), limit=spec.limit, log_samples=True,
                              apply_chat_template=chat, fewshot_as_multiturn=chat, gen_kwargs=gen_kwargs, confirm_run_unsafe_code=spec.allow_code_execution,
                              bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, verbosity="ERROR")
    if results is None:
        return None
    metrics = results["results"][config.name]
    metric = config.metric or first_metric(metrics)
    samples = [s for s in results.pop("samples")[config.name] if s.get("filter", "none") == metric.split(",")[-1]]
    token_limit = spec.max_new_tokens or task_token_limit(results, config.name, lm.max_gen_toks)
    kinds, lengths = classify_samples(lm, samples, metric.split(",")[0], token_limit)
    stem = f"{config.name}/{name}{'+' + full_heads.replace(':', '-') if full_heads else ''}-s{sparsity:g}-seed{seed}"
    write_atomic(out / "results" / f"{stem}.json",
                 lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable)), overwrite=True)
    write_atomic(out / "samples" / f"{stem}.jsonl", lambda tmp: tmp.write_text(
        "".join(json.dumps({**s, "classification": k}, default=handle_non_serializable) + "\n" for s, k in zip(samples, kinds))),
        overwrite=True)
    shape = ModelShape.from_config(lm.model.config)
    mean_len = max(1, round(statistics.mean(lengths))) if lengths else 1
    kv_fraction = 1.0 if plan is None else plan.kv_bytes(mean_len, head_dim=shape.head_dim) / plan.full_kv_bytes(mean_len, head_dim=shape.head_dim)
    now = (lm.stats.generated_tokens, lm.stats.seconds, lm.stats.repetition_stops, lm.stats.kv_bytes_held, lm.stats.kv_bytes_full)
    tokens, seconds, stops, held, full = (after - then for after, then in zip(now, before))
    return Cell(config.name, name, sparsity, seed, float(metrics[metric]), kinds.count("correct"), len(samples), kv_fraction,
                tokens / seconds if seconds else 0.0, kinds.count("overlength"), kinds.count("repetitive"), kinds.count("incorrect"), int(stops),
                full_heads=full_heads, kv_measured=held / full if full else -1.0)


def check_answer_limit(spec: GridSpec, config: TaskConfig, max_length: int) -> None:
    """An answer limit that leaves the prompt no room in the model: one line (lm-eval would stop on an assertion)."""
    generation = (config.spec.get("generation_kwargs") or {}) if isinstance(config.spec, dict) else {}
    limit = spec.max_new_tokens or generation.get("max_gen_toks")  # an lm-eval task named only: its YAML's, checked by lm-eval
    if limit and limit >= max_length:
        what = f"--max-tokens {limit}:" if spec.max_new_tokens else f"task {config.name!r} answers in up to {limit} new tokens, but"
        raise KvrlError(f"{what} model {spec.model} reads at most {max_length} tokens (prompt and answer); pass --max-tokens below {max_length}")


def first_metric(metrics: dict[str, Any]) -> str:
    """lm-eval's first accuracy-like key (`exact_match,strict-match`, `pass_at_1,none`, ...)."""
    keys = [k for k in metrics if "," in k and "_stderr" not in k]
    if not keys:
        raise KvrlError(f"lm-eval reported no metric: {sorted(metrics)}")
    return keys[0]


def task_token_limit(results: dict, task: str, default: int) -> int:
    generation = results.get("configs", {}).get(task, {}).get("generation_kwargs", {}) or {}
    return int(generation.get("max_gen_toks", default))


def sample_context(sample: dict) -> str:
    """The prompt lm-eval sent (its `arguments` are `[[context, gen_kwargs]]` or `{"gen_args_0": {"arg_0": ...}}`)."""
    arguments = sample.get("arguments")
    if isinstance(arguments, dict):
        arguments = [list(a.values()) if isinstance(a, dict) else a for a in arguments.values()]
    return str(arguments[0][0]) if arguments and arguments[0] else ""


def sample_response(sample: dict) -> str:
    """The answer lm-eval recorded for a sample (its `resps` are `[[text]]` or `[text]`)."""
    return sample["resps"][0][0] if sample["resps"] and isinstance(sample["resps"][0], list) else str(sample["resps"][0])


def sample_length(lm, sample: dict, answer_ids: list[int] | None = None) -> int:
    """A sample's total length in tokens: the prompt lm-eval sent and the answer."""
    if answer_ids is None:
        answer_ids = lm.tok_encode(sample_response(sample), add_special_tokens=False)
    return len(lm.tok_encode(sample_context(sample))) + len(answer_ids)


def classify_samples(lm, samples: list[dict], metric: str, token_limit: int) -> tuple[list[str], list[int]]:
    """Each sample's classification, and its total length (prompt + answer tokens)."""
    kinds, lengths = [], []
    for sample in samples:
        answer_ids = lm.tok_encode(sample_response(sample), add_special_tokens=False)
        kinds.append(classify(bool(sample.get(metric, 0)), answer_ids, token_limit))
        lengths.append(sample_length(lm, sample, answer_ids))
    return kinds, lengths


def summarize(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (task, strategy, sparsity): accuracy averaged over seeds, change against full."""
    full = {c.task: c.accuracy for c in cells if c.strategy == FULL}
    groups: dict[tuple[str, str, float], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.label, c.sparsity), []).append(c)
    rows = []
    for (task, strategy, sparsity), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != FULL, kv[0][1], kv[0][2])):
        accuracy = statistics.mean(m.accuracy for m in members)
        rows.append({
            "task": task, "strategy": strategy, "sparsity": sparsity, "seeds": len(members), "accuracy": accuracy,
            "accuracy_std": statistics.stdev(m.accuracy for m in members) if len(members) > 1 else 0.0,
            "change": accuracy - full.get(task, accuracy), "kv_saved": 1 - statistics.mean(m.kv_fraction for m in members),
            "decode_tokens_per_s": statistics.mean(m.decode_tokens_per_s for m in members),
            "overlength": sum(m.overlength for m in members), "repetitive": sum(m.repetitive for m in members),
            "kv_measured": statistics.mean(m.kv_measured for m in members) if all(m.kv_measured >= 0 for m in members) else None,
        })
    return rows
