"""Running the evaluation grid: task x strategy x sparsity (x seed), full cache included once per task.

Every cell is one lm-eval run (`simple_evaluate`) of the `kvrl` model under the cell's plan, passed to the model for
that cell only (`KvrlLM.cell_settings`). Each finished cell is appended to `grid.csv` in the output directory
(`kvpress_rl.evaluators.cells`), its lm-eval results JSON to `results/` and its samples to `samples/`, so an
interrupted grid resumes from the cells done under today's settings (`kvpress_rl.evaluators.resume`). One
`kvrl eval` at a time writes an output folder (`kvpress_rl.evaluators.output_lock`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpress_rl.distributed import is_main_process
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import GRID_FILE, Cell, cell_stem, read_grid, write_grid
from kvpress_rl.evaluators.chat_template import (
    cell_uses_chat_template,
    check_chat_template,
    tokenizer_has_chat_template,
)
from kvpress_rl.evaluators.grid_spec import CellSetting, GridSpec
from kvpress_rl.evaluators.resume import plan_resume
from kvpress_rl.evaluators.samples import classify_samples, first_metric, task_token_limit
from kvpress_rl.evaluators.strategy_scores import check_head_shapes, scores_for
from kvpress_rl.evaluators.tasks import TaskConfig, resolve_tasks, task_manager
from kvpress_rl.io import write_atomic
from kvpress_rl.models import ModelShape
from kvpress_rl.plan import CompressionPlan, build_plan
from kvpress_rl.policies import full_head_policy


def run_grid(lm, spec: GridSpec, out: Path, on_cell: Callable[[Cell], None] | None = None,
             recompute: bool = False) -> list[Cell]:
    """Evaluate every cell not already in `out/grid.csv` (under today's definition) with lm-eval; returns all cells.

    `lm` is a `KvrlLM`. Per cell: lm-eval's results JSON in `results/`, the samples (with each answer's
    classification) in `samples/`.
    """
    configs = resolve_tasks(spec)
    check_head_shapes(spec, lm.model)  # before any cell: a wrong --heads file costs no full-cache run
    check_chat_template(spec, configs, tokenizer_has_chat_template(lm.tokenizer))  # likewise a missing template
    grid_path = out / GRID_FILE
    cells, pending = plan_resume(spec, out, recompute, configs)
    if recompute and is_main_process() and len(cells) != len(read_grid(grid_path)):
        write_grid(grid_path, cells)  # the stale rows go now, whether or not this run redoes them
    for todo in pending:
        cell = run_cell(lm, spec, todo.config, todo.setting, cell_plan(lm, spec, todo.setting, out), out)
        if cell is None:  # not the main process of a data-parallel run
            continue
        cell.definition = json.dumps(todo.definition, sort_keys=True, default=str)
        cells.append(cell)
        write_grid(grid_path, cells)
        if on_cell:
            on_cell(cell)
    return cells


def cell_plan(lm, spec: GridSpec, setting: CellSetting, out: Path) -> CompressionPlan | None:
    """The plan a cell runs under (None: the full cache), from the strategy's scores (`scores_for`)."""
    entry = setting.entry
    if entry is None:
        return None
    scores = scores_for(spec, out, name=setting.strategy, entry=entry, seed=setting.seed, model=lm.model,
                        tokenizer=lm.tokenizer)
    full_policy = full_head_policy(*setting.full_heads.split(":")) if setting.full_heads else None
    return build_plan(entry.cls(), scores, setting.sparsity, spec.compressed_policy, spec.plan_rule, full_policy)


def run_cell(lm, spec: GridSpec, config: TaskConfig, setting: CellSetting, plan: CompressionPlan | None,
             out: Path) -> Cell | None:
    """One cell: lm-eval on task `config` with the model under `plan`; None on a process that does not report."""
    from lm_eval import simple_evaluate

    chat = cell_uses_chat_template(spec, config, lm.tokenizer)
    check_answer_limit(spec, config, lm.max_length)
    # --max-tokens replaces the task's answer limit, and the *_r1 tasks' cap on the total length with it
    gen_kwargs = {"max_gen_toks": spec.max_new_tokens, "max_total_tokens": None} if spec.max_new_tokens else None
    seed = setting.seed
    with lm.cell_settings(plan=plan, decoding_simulation=spec.decoding_simulation) as stats:
        results = simple_evaluate(model=lm, tasks=[config.spec], task_manager=task_manager(), limit=spec.limit,
                                  log_samples=True, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                  gen_kwargs=gen_kwargs, confirm_run_unsafe_code=spec.allow_code_execution,
                                  bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  verbosity="ERROR")
    if results is None:
        return None
    metrics = results["results"][config.name]
    metric = config.metric or first_metric(metrics)
    samples = [s for s in results.pop("samples")[config.name] if s.get("filter", "none") == metric.split(",")[-1]]
    token_limit = spec.max_new_tokens or task_token_limit(results, config.name, lm.max_gen_toks)
    kinds, lengths = classify_samples(lm, samples, metric.split(",")[0], token_limit)
    stem = cell_stem(task=config.name, strategy=setting.strategy, full_heads=setting.full_heads,
                     sparsity=setting.sparsity, seed=setting.seed)
    write_cell_files(out, stem, results, samples, kinds)
    return Cell(task=config.name, strategy=setting.strategy, sparsity=setting.sparsity, seed=seed,
                accuracy=float(metrics[metric]), correct=kinds.count("correct"), total=len(samples),
                kv_fraction=kv_fraction(plan, lengths, lm.model), decode_tokens_per_s=stats.tokens_per_second,
                overlength=kinds.count("overlength"), repetitive=kinds.count("repetitive"),
                incorrect=kinds.count("incorrect"), repetition_stops=int(stats.repetition_stops),
                full_heads=setting.full_heads, kv_measured=stats.kv_measured_fraction)


def write_cell_files(out: Path, stem: str, results: dict, samples: list[dict], kinds: list[str]) -> None:
    """lm-eval's results JSON in `out/results/`, the samples with each answer's classification in `out/samples/`."""
    from lm_eval.utils import handle_non_serializable

    results_text = json.dumps(results, indent=2, default=handle_non_serializable)
    samples_text = "".join(json.dumps({**s, "classification": k}, default=handle_non_serializable) + "\n"
                           for s, k in zip(samples, kinds))
    write_atomic(out / "results" / f"{stem}.json", lambda tmp: tmp.write_text(results_text), overwrite=True)
    write_atomic(out / "samples" / f"{stem}.jsonl", lambda tmp: tmp.write_text(samples_text), overwrite=True)


def kv_fraction(plan: CompressionPlan | None, lengths: list[int], model: Any) -> float:
    """KV memory of the plan / the full cache's, at the cell's mean sequence length."""
    if plan is None:
        return 1.0
    head_dim = ModelShape.from_config(model.config).head_dim
    mean_length = max(1, round(statistics.mean(lengths))) if lengths else 1
    return plan.kv_bytes(mean_length, head_dim=head_dim) / plan.full_kv_bytes(mean_length, head_dim=head_dim)


def check_answer_limit(spec: GridSpec, config: TaskConfig, max_length: int) -> None:
    """An answer limit that leaves the prompt no room in the model: one line (lm-eval would stop on an assertion)."""
    generation = (config.spec.get("generation_kwargs") or {}) if isinstance(config.spec, dict) else {}
    limit = spec.max_new_tokens or generation.get("max_gen_toks")  # a task named only: its YAML's, checked by lm-eval
    if limit and limit >= max_length:
        if spec.max_new_tokens:
            what = f"--max-tokens {limit}:"
        else:
            what = f"task {config.name!r} answers in up to {limit} new tokens, but"
        raise KvrlError(f"{what} model {spec.model} reads at most {max_length} tokens (prompt and answer); "
                        f"pass --max-tokens below {max_length}")
