"""The evaluation grid: task x strategy x sparsity (x seed), full cache included once per task.

Every cell is one lm-eval run (`simple_evaluate`) of the `kvrl` model under the cell's plan.
Each finished cell is appended to `grid.csv` in the output directory, its lm-eval results JSON
to `results/` and its samples to `samples/`, so an interrupted grid resumes from the cells done.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.scoring import classify
from kvpress_rl.evaluators.tasks import EMBEDDED, TaskConfig, data_dir_from, resolve_task
from kvpress_rl.executor.policies import BUDGET_BASE, make_policy
from kvpress_rl.io import write_atomic
from kvpress_rl.models import ModelShape
from kvpress_rl.plugins import StrategyEntry
from kvpress_rl.scores import HeadScores
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

    @property
    def key(self) -> tuple[str, str, float, int]:
        return (self.task, self.strategy, round(self.sparsity, 6), self.seed)


def read_grid(path: Path) -> list[Cell]:
    if not path.is_file():
        return []
    kinds = {f.name: f.type for f in fields(Cell)}
    with path.open() as handle:
        return [Cell(**{k: (float(v) if kinds[k] in ("float", float) else int(v) if kinds[k] in ("int", int) else v) for k, v in row.items()})
                for row in csv.DictReader(handle)]


def write_grid(path: Path, cells: list[Cell]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Cell)])
            writer.writeheader()
            writer.writerows(asdict(c) for c in cells)

    write_atomic(path, write, overwrite=True)


def parse_heads(value: str | None, strategies: list[str]) -> dict[str, str]:
    """`--heads FILE` (one learned head strategy) or `--heads NAME=FILE,NAME=FILE`."""
    if not value:
        return {}
    if "=" not in value:
        learned = [s for s in strategies if s not in ("random", "streaming", "snapkv", "h2o", "rkv")]
        if len(learned) != 1:
            raise KvrlError(f"--heads FILE needs exactly one head strategy besides random, got {learned or 'none'}; use --heads NAME=FILE,...")
        return {learned[0]: value}
    pairs = dict(part.split("=", 1) for part in value.split(",") if part)
    unknown = sorted(set(pairs) - set(strategies))
    if unknown:
        raise KvrlError(f"--heads names {', '.join(unknown)}, which --strategy does not list")
    return pairs


@dataclass
class GridSpec:
    strategies: list[tuple[str, StrategyEntry]]
    sparsities: list[float]
    seeds: list[int]
    limit: int | None = 100
    batch_size: int = 16
    max_new_tokens: int | None = None  # overrides the task's own limit (max_gen_toks)
    heads: dict[str, str] = field(default_factory=dict)  # strategy name -> scores file
    tasks: list[str] = field(default_factory=lambda: [EMBEDDED])
    data_dir: str | None = None
    compressed_policy: str = "streaming"  # token policy of the compressed heads of head strategies (hybrid plans)
    allow_code_execution: bool = False
    chat_template: bool | None = None  # None: when the tokenizer has one


def scores_for(entry: StrategyEntry, name: str, spec: GridSpec, model, tokenizer, seed: int, out: Path) -> HeadScores:
    """The strategy's scores: from `--heads`, from an earlier run in `out`, or by running `select`."""
    if name in spec.heads:
        scores = HeadScores.load(spec.heads[name])
    else:
        cached = out / "heads" / f"{name}-seed{seed}.safetensors"
        if cached.is_file():
            scores = HeadScores.load(cached)
        else:
            scores = entry.cls().select(model, tokenizer, SelectionContext(seed=seed, data_dir=spec.data_dir))
            if is_main_process():
                scores.save(cached, overwrite=True)
    try:
        scores.check_shape(ModelShape.from_config(model.config))
    except KvrlError as err:
        raise KvrlError(f"heads of {name!r} do not fit this model: {err}") from None
    return scores


def is_main_process() -> bool:
    from kvpress_rl.strategies.rlkv.learner import world

    return world()[0] == 0


def grid_cells(spec: GridSpec) -> list[tuple[str, float, int, StrategyEntry | None]]:
    """Full cache once, then strategy x seed (random only) x sparsity."""
    todo: list[tuple[str, float, int, StrategyEntry | None]] = [(FULL, 0.0, 0, None)]
    for name, entry in spec.strategies:
        for seed in spec.seeds if name == "random" else spec.seeds[:1]:
            todo.extend((name, sparsity, seed, entry) for sparsity in spec.sparsities)
    return todo


def resolve_tasks(spec: GridSpec) -> list[TaskConfig]:
    """Every task's config, checked (names, data files, code execution) before any model work."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    data_dir = data_dir_from(spec.data_dir)
    configs = [resolve_task(name, data_dir, manager, embedded_tokens=spec.max_new_tokens or 96) for name in spec.tasks]
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    for config in configs:
        if offline and config.reads_hub:
            raise KvrlError(f"task {config.name!r} reads its data from the Hugging Face hub, which is offline here; "
                            "pass --data-dir (a folder laid out like shared/data)")
        if config.unsafe_code and not spec.allow_code_execution:
            raise KvrlError(f"task {config.name!r} runs model-written code; pass --allow-code-execution to allow it")
    return configs


def run_grid(lm, spec: GridSpec, out: Path, on_cell: Callable[[Cell], None] | None = None) -> list[Cell]:
    """Evaluate every cell not already in `out/grid.csv` with lm-eval; returns all cells.

    `lm` is a `KvrlLM`; its plan is set per cell. Per cell: lm-eval's results JSON in
    `results/`, the samples (with each answer's classification) in `samples/`.
    """
    configs = resolve_tasks(spec)
    grid_path = out / "grid.csv"
    cells = read_grid(grid_path)
    done = {c.key for c in cells}
    for config in configs:
        for name, sparsity, seed, entry in grid_cells(spec):
            if (config.name, name, round(sparsity, 6), seed) in done:
                continue
            plan = None
            if entry is not None:
                selector = entry.cls()
                policy = make_policy(spec.compressed_policy, fixed_budget=BUDGET_BASE)  # 80 tokens, as 16 + 64
                plan = selector.plan(scores_for(entry, name, spec, lm.model, lm.tokenizer, seed, out), sparsity, policy)
            cell = run_cell(lm, config, spec, plan, (name, sparsity, seed), out)
            if cell is None:  # not the main process of a data-parallel run
                continue
            cells.append(cell)
            write_grid(grid_path, cells)
            if on_cell:
                on_cell(cell)
    return cells


def run_cell(lm, config: TaskConfig, spec: GridSpec, plan, key: tuple[str, float, int], out: Path) -> Cell | None:
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    name, sparsity, seed = key
    lm.plan = plan
    before = (lm.stats.generated_tokens, lm.stats.seconds, lm.stats.repetition_stops)
    chat = config.chat_template if config.chat_template is not None else (
        spec.chat_template if spec.chat_template is not None else bool(getattr(lm.tokenizer, "chat_template", None)))
    gen_kwargs = {"max_gen_toks": spec.max_new_tokens} if spec.max_new_tokens else None
    results = simple_evaluate(model=lm, tasks=[config.spec], limit=spec.limit, log_samples=True, apply_chat_template=chat,
                              fewshot_as_multiturn=chat, gen_kwargs=gen_kwargs, confirm_run_unsafe_code=spec.allow_code_execution,
                              bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, verbosity="ERROR")
    if results is None:
        return None
    metrics = results["results"][config.name]
    metric = config.metric or first_metric(metrics)
    samples = [s for s in results.pop("samples")[config.name] if s.get("filter", "none") == metric.split(",")[-1]]
    token_limit = spec.max_new_tokens or task_token_limit(results, config.name, lm.max_gen_toks)
    kinds, lengths = classify_samples(lm, samples, metric.split(",")[0], token_limit)
    stem = f"{config.name}/{name}-s{sparsity:g}-seed{seed}"
    write_atomic(out / "results" / f"{stem}.json",
                 lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable)), overwrite=True)
    write_atomic(out / "samples" / f"{stem}.jsonl", lambda tmp: tmp.write_text(
        "".join(json.dumps({**s, "classification": k}, default=handle_non_serializable) + "\n" for s, k in zip(samples, kinds))),
        overwrite=True)
    shape = ModelShape.from_config(lm.model.config)
    mean_len = max(1, round(statistics.mean(lengths))) if lengths else 1
    kv_fraction = 1.0 if plan is None else plan.kv_bytes(mean_len, head_dim=shape.head_dim) / plan.full_kv_bytes(mean_len, head_dim=shape.head_dim)
    tokens, seconds, stops = (now - then for now, then in zip((lm.stats.generated_tokens, lm.stats.seconds, lm.stats.repetition_stops), before))
    return Cell(config.name, name, sparsity, seed, float(metrics[metric]), kinds.count("correct"), len(samples), kv_fraction,
                tokens / seconds if seconds else 0.0, kinds.count("overlength"), kinds.count("repetitive"), kinds.count("incorrect"), int(stops))


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


def classify_samples(lm, samples: list[dict], metric: str, token_limit: int) -> tuple[list[str], list[int]]:
    """Each sample's classification, and its total length (prompt + answer tokens)."""
    kinds, lengths = [], []
    for sample in samples:
        response = sample["resps"][0][0] if sample["resps"] and isinstance(sample["resps"][0], list) else str(sample["resps"][0])
        answer_ids = lm.tok_encode(response, add_special_tokens=False)
        context = sample_context(sample)
        kinds.append(classify(bool(sample.get(metric, 0)), answer_ids, token_limit))
        lengths.append(len(lm.tok_encode(context)) + len(answer_ids))
    return kinds, lengths


def summarize(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (task, strategy, sparsity): accuracy averaged over seeds, change against full."""
    full = {c.task: c.accuracy for c in cells if c.strategy == FULL}
    groups: dict[tuple[str, str, float], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.strategy, c.sparsity), []).append(c)
    rows = []
    for (task, strategy, sparsity), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != FULL, kv[0][1], kv[0][2])):
        accuracy = statistics.mean(m.accuracy for m in members)
        rows.append({
            "task": task, "strategy": strategy, "sparsity": sparsity, "seeds": len(members), "accuracy": accuracy,
            "accuracy_std": statistics.stdev(m.accuracy for m in members) if len(members) > 1 else 0.0,
            "change": accuracy - full.get(task, accuracy), "kv_saved": 1 - statistics.mean(m.kv_fraction for m in members),
            "decode_tokens_per_s": statistics.mean(m.decode_tokens_per_s for m in members),
            "overlength": sum(m.overlength for m in members), "repetitive": sum(m.repetitive for m in members),
        })
    return rows
