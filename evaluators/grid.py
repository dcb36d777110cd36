"""The evaluation grid: strategy x sparsity (x seed) on a task, full cache included once.

Each finished cell is appended to `grid.csv` in the output directory (and its answers to
`samples/`), so an interrupted grid resumes from the cells already done.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvpress_rl.embedded.evaluate import evaluate
from kvpress_rl.embedded.task import Difficulty, problems
from kvpress_rl.errors import KvrlError
from kvpress_rl.io import write_atomic
from kvpress_rl.models import ModelShape
from kvpress_rl.plugins import StrategyEntry
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import SelectionContext

TASKS = ("embedded",)
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


def check_task(name: str) -> str:
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KvrlError(f"unknown task {name!r}; available: {', '.join(TASKS)}{hint}")
    return name


@dataclass
class GridSpec:
    strategies: list[tuple[str, StrategyEntry]]
    sparsities: list[float]
    seeds: list[int]
    limit: int = 100
    batch_size: int = 16
    max_new_tokens: int = 96
    heads: dict[str, str] = field(default_factory=dict)  # strategy name -> scores file
    task: str = "embedded"
    data_dir: str | None = None
    compressed_policy: str = "streaming"  # token policy of the compressed heads of head strategies (hybrid plans)


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
            scores.save(cached, overwrite=True)
    scores.check_shape(ModelShape.from_config(model.config))
    return scores


def run_grid(model, tokenizer, spec: GridSpec, out: Path, on_cell: Callable[[Cell], None] | None = None,
             on_samples: Callable[[int], None] | None = None) -> list[Cell]:
    """Evaluate every cell not already in `out/grid.csv`; returns all cells."""

    items = problems("test", spec.limit, Difficulty())
    grid_path = out / "grid.csv"
    cells = read_grid(grid_path)
    done = {c.key for c in cells}
    shape = ModelShape.from_config(model.config)
    todo: list[tuple[str, float, int, Any]] = [(FULL, 0.0, 0, None)]
    for name, entry in spec.strategies:
        strategy_seeds = spec.seeds if name == "random" else spec.seeds[:1]
        for seed in strategy_seeds:
            for sparsity in spec.sparsities:
                todo.append((name, sparsity, seed, entry))
    for name, sparsity, seed, entry in todo:
        key = (spec.task, name, round(sparsity, 6), seed)
        if key in done:
            continue
        plan = None
        if entry is not None:
            from kvpress_rl.executor.policies import BUDGET_BASE, make_policy

            selector = entry.cls()
            policy = make_policy(spec.compressed_policy, fixed_budget=BUDGET_BASE)  # 80 tokens, as 16 + 64
            plan = selector.plan(scores_for(entry, name, spec, model, tokenizer, seed, out), sparsity, policy)
        result = evaluate(model, tokenizer, items, plan=plan, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, on_batch=on_samples)
        mean_len = round(statistics.mean(p + o for p, o in zip(result.prompt_lengths, result.output_lengths)))
        kv_fraction = 1.0 if plan is None else plan.kv_bytes(mean_len, head_dim=shape.head_dim) / plan.full_kv_bytes(mean_len, head_dim=shape.head_dim)
        cell = Cell(spec.task, name, sparsity, seed, result.accuracy, result.correct, result.total, kv_fraction, result.tokens_per_second)
        samples = [{"seed": p.seed, "answer": p.answer, "output": o} for p, o in zip(items, result.outputs)]
        write_atomic(out / "samples" / f"{spec.task}-{name}-s{sparsity:g}-seed{seed}.json", lambda tmp: tmp.write_text(json.dumps(samples, indent=1)), overwrite=True)
        cells.append(cell)
        write_grid(grid_path, cells)
        if on_cell:
            on_cell(cell)
    return cells


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
        })
    return rows
