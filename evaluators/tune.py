"""The highest near-lossless sparsity of a strategy on a task, chosen on validation problems (`kvrl tune`).

RLKV's headline is one number per model and task: the largest share of KV heads that can be compressed while
accuracy stays within a margin of the full cache (the official sweep's `LOSSLESS_DROP`: 2.0 points). `kvrl tune`
finds it from `kvrl eval` cells on a task's validation split:

1. the full cache and a coarse ladder of sparsities (`coarse_ladder`: 0.1, 0.2, ..., 0.9);
2. a setting *holds* when its accuracy drop from the full cache is within the margin, observed, or with its paired
   upper confidence bound over the same problems (`drop_upper_bound`, Newcombe's hybrid score interval for paired
   proportions);
3. the ladder is refined by halving the gap between the last setting that holds (every lower one holding too)
   and the next that fails, down to a resolution (`refinements`: 0.05, then 0.025);
4. a ladder where a failing setting lies below one that holds is flagged non-monotonic: accuracy on such a task
   is not a function of sparsity one can read off, so the choice is the largest sparsity below which *every*
   tested one holds (`safe_sparsity`), never the largest that happened to pass.

The chosen sparsity is the safe one under the confidence bound; it is then measured once on the test split,
reported and never used to choose.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import FULL, GRID_FILE, Cell, cell_samples, read_grid
from kvpress_rl.evaluators.grid import run_grid
from kvpress_rl.evaluators.grid_spec import CellSetting, GridSpec
from kvpress_rl.evaluators.paired import drop_upper_bound, least_bound, paired_counts
from kvpress_rl.evaluators.resume import cell_definition
from kvpress_rl.evaluators.samples import sample_length
from kvpress_rl.evaluators.strategy_scores import scores_for, scores_path
from kvpress_rl.evaluators.tasks import resolve_tasks
from kvpress_rl.models import DEFAULT_MODEL, ModelShape
from kvpress_rl.plan import build_plan
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS

LOSSLESS_DROP = 2.0  # points of accuracy: the official sweep's near-lossless margin
COARSE_STEP = 0.1
RESOLUTION = 0.025
KEPT_TOKENS = SINK_TOKENS + WINDOW_TOKENS  # what a compressed head keeps, for the ideal throughput gain


# --- the ladder and the choice ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LadderPoint:
    sparsity: float
    accuracy: float  # fraction; for a strategy averaged over seeds, the mean
    drop: float  # full-cache accuracy minus this one (fraction)
    drop_bound: float  # its upper confidence bound
    holds: bool  # drop within the margin
    holds_bound: bool  # bound within the margin


@dataclass(frozen=True)
class Choice:
    """What the ladder of one strategy on one task says."""

    task: str
    strategy: str
    full_accuracy: float
    problems: int
    points: list[LadderPoint]  # by sparsity
    margin: float  # points
    confidence: float

    def largest(self, rule: str) -> float:
        """The largest tested sparsity that holds under `rule` ("observed" or "bound"); 0.0: none does."""
        return max((p.sparsity for p in self.points if self.holds(p, rule)), default=0.0)

    def safe(self, rule: str) -> float:
        """The largest sparsity below which (and at which) every tested one holds under `rule`."""
        return safe_sparsity(self.points, lambda p: self.holds(p, rule))

    @staticmethod
    def holds(point: LadderPoint, rule: str) -> bool:
        return point.holds if rule == "observed" else point.holds_bound

    @property
    def monotonic(self) -> bool:
        """No setting that fails (observed) below one that holds."""
        return self.safe("observed") == self.largest("observed")

    @property
    def chosen(self) -> float:
        """The choice: the safe sparsity under the confidence bound (0.0: no compression holds)."""
        return self.safe("bound")

    def as_dict(self) -> dict:
        return {"task": self.task, "strategy": self.strategy, "full_accuracy": self.full_accuracy,
                "problems": self.problems, "margin_points": self.margin, "confidence": self.confidence,
                "largest_observed": self.largest("observed"), "largest_bound": self.largest("bound"),
                "safe_observed": self.safe("observed"), "safe_bound": self.safe("bound"),
                "monotonic": self.monotonic, "chosen": self.chosen, "ladder": [asdict(p) for p in self.points]}


def safe_sparsity(points: list[LadderPoint], holds: Callable[[LadderPoint], bool]) -> float:
    safe = 0.0
    for point in sorted(points, key=lambda p: p.sparsity):
        if not holds(point):
            break
        safe = point.sparsity
    return safe


def coarse_ladder(step: float = COARSE_STEP) -> list[float]:
    """step, 2 step, ... below 1 (every head compressed is not a plan worth choosing)."""
    if not 0.0 < step < 1.0:
        raise KvrlError(f"--step must lie strictly between 0 and 1, not {step:g}")
    return [round(k * step, 6) for k in range(1, math.ceil(1 / step - 1e-9)) if k * step < 1 - 1e-9]


def refinements(choice: Choice, resolution: float = RESOLUTION) -> list[float]:
    """Sparsities to test next: for each rule, the midpoint between its safe sparsity and the next tested one
    (which fails), while that gap is wider than `resolution`; snapped to the resolution's grid. The bound's rule
    is not refined when its problems are too few for any setting to hold (`least_bound`)."""
    tested = sorted(p.sparsity for p in choice.points)
    wanted = set()
    rules = ["observed"] + (["bound"] if 100 * least_bound(choice.problems, choice.confidence) <= choice.margin else [])
    for rule in rules:
        safe = choice.safe(rule)
        above = [s for s in tested if s > safe + 1e-9]
        if not above or above[0] - safe <= resolution + 1e-9:
            continue
        middle = round(round((safe + above[0]) / 2 / resolution) * resolution, 6)
        if safe + 1e-9 < middle < above[0] - 1e-9 and middle not in tested:
            wanted.add(middle)
    return sorted(wanted)


def outcomes(directory: Path, cell: Cell) -> dict[object, bool]:
    """Per problem (lm-eval's doc_id), whether the cell's answer was correct."""
    path = cell_samples(directory, cell)
    if not path.is_file():
        raise KvrlError(f"{path} is missing: the samples of cell {cell.task} {cell.strategy} s={cell.sparsity:g}; "
                        "rerun with --recompute")
    with path.open() as handle:
        return {row["doc_id"]: row.get("classification") == "correct" for row in map(json.loads, handle)}


def choose(directory: Path, cells: Iterable[Cell], task: str, strategy: str, margin: float = LOSSLESS_DROP,
           confidence: float = 0.95) -> Choice:
    """The ladder of `strategy` on `task` from the cells of a validation grid in `directory`."""
    cells = [c for c in cells if c.task == task and not c.full_heads]
    full = [c for c in cells if c.strategy == FULL]
    if not full:
        raise KvrlError(f"no full-cache cell for task {task!r} in {directory}")
    full_outcomes = outcomes(directory, full[0])
    by_sparsity: dict[float, list[Cell]] = {}
    for cell in cells:
        if cell.strategy == strategy:
            by_sparsity.setdefault(round(cell.sparsity, 6), []).append(cell)
    points = []
    for sparsity, members in sorted(by_sparsity.items()):
        counts = paired_counts(full_outcomes, [outcomes(directory, c) for c in members])
        bound = drop_upper_bound(counts, confidence)
        points.append(LadderPoint(sparsity, statistics.mean(c.accuracy for c in members), counts.drop, bound,
                                  100 * counts.drop <= margin + 1e-9, 100 * bound <= margin + 1e-9))
    return Choice(task, strategy, full[0].accuracy, len(full_outcomes), points, margin, confidence)


# --- what the user does next --------------------------------------------------------------------------------
def ideal_gain(sparsity: float, length: float, kept: int = KEPT_TOKENS) -> float:
    """The ideal throughput gain of a plan at sequence length `length`: 1 / ((1 - s) + s * 80 / L)."""
    return 1.0 / ((1 - sparsity) + sparsity * min(kept, length) / length)


@dataclass
class Outcome:
    """A choice with what it means: its test-split measurement, memory, throughput and how to serve it."""

    choice: Choice
    heads: str = ""  # the scores file the plan is built from
    test_full: float | None = None
    test_accuracy: float | None = None
    test_problems: int = 0
    mean_length: float = 0.0  # tokens (prompt + answer) of the task's sequences, measured on validation
    kv_bytes_full: int = 0  # per sequence at that length
    kv_bytes_plan: int = 0
    serve_command: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float:
        return ideal_gain(self.choice.chosen, self.mean_length) if self.mean_length else 1.0

    def as_dict(self) -> dict:
        return {**self.choice.as_dict(), "heads": self.heads, "test_full_accuracy": self.test_full,
                "test_accuracy": self.test_accuracy, "test_problems": self.test_problems,
                "mean_sequence_tokens": self.mean_length, "kv_bytes_full": self.kv_bytes_full,
                "kv_bytes_plan": self.kv_bytes_plan, "ideal_throughput_gain": self.gain,
                "serve_command": self.serve_command, "notes": self.notes}


# --- running the ladders ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneSettings:
    margin: float = LOSSLESS_DROP  # points
    confidence: float = 0.95
    step: float = COARSE_STEP
    resolution: float = RESOLUTION


def validation_ladders(lm, spec: GridSpec, out: Path, settings: TuneSettings,
                       on_cell: Callable[[Cell], None] | None = None, recompute: bool = False) -> list[Choice]:
    """Every strategy's ladder on every task's validation split in `out/validation` (a `kvrl eval` output folder:
    resumable, `kvrl report` draws it): the coarse ladder, then refinements until each gap is at the resolution."""
    folder = out / "validation"
    spec = replace(spec, split="validation", sparsities=coarse_ladder(settings.step))
    run_grid(lm, spec, folder, on_cell=on_cell, recompute=recompute)
    while True:
        cells = current_cells(spec, read_grid(folder / GRID_FILE))
        choices = {(task, name): choose(folder, cells, task, name, settings.margin, settings.confidence)
                   for task in spec.tasks for name, _ in spec.strategies}
        pending = []
        for task in spec.tasks:
            for name, entry in spec.strategies:
                extra = refinements(choices[(task, name)], settings.resolution)
                if extra:
                    pending.append(replace(spec, tasks=[task], strategies=[(name, entry)], sparsities=extra))
        if not pending:
            return list(choices.values())
        for part in pending:
            run_grid(lm, part, folder, on_cell=on_cell, recompute=recompute)


def current_cells(spec: GridSpec, cells: list[Cell]) -> list[Cell]:
    """The cells made under today's settings: a ladder never mixes in a cell of other heads or another model."""
    configs = {config.name: config for config in resolve_tasks(spec)}
    entries = dict(spec.strategies)
    kept = []
    for cell in cells:
        if cell.task not in configs or (cell.strategy != FULL and cell.strategy not in entries):
            continue
        setting = CellSetting(strategy=cell.strategy, sparsity=cell.sparsity, seed=cell.seed,
                              entry=entries.get(cell.strategy), full_heads=cell.full_heads)
        expected = json.dumps(cell_definition(spec, configs[cell.task], setting), sort_keys=True, default=str)
        if cell.definition and json.loads(cell.definition) == json.loads(expected):
            kept.append(cell)
    return kept


def test_measurements(lm, spec: GridSpec, out: Path, choices: list[Choice],
                      on_cell: Callable[[Cell], None] | None = None, recompute: bool = False) -> list[Outcome]:
    """Each choice measured once on the test split (`out/test`), with its memory, ideal gain and serve command.

    Nothing here feeds back into a choice: the test cells are run after every choice is final."""
    entries = dict(spec.strategies)
    validation = out / "validation"
    validation_cells = current_cells(replace(spec, split="validation"), read_grid(validation / GRID_FILE))
    full_cells = {c.task: c for c in validation_cells if c.strategy == FULL}
    lengths = {task: mean_sequence_length(lm, validation, cell) for task, cell in full_cells.items()}
    results: list[Outcome] = []
    for choice in choices:
        entry = entries[choice.strategy]
        heads = scores_path(spec, validation, name=choice.strategy, entry=entry, seed=spec.seeds[0])
        outcome = Outcome(choice, heads=heads)
        if choice.chosen:
            part = replace(spec, split="test", tasks=[choice.task], strategies=[(choice.strategy, entry)],
                           sparsities=[choice.chosen])
            measure_on_test(outcome, current_cells(part, run_grid(lm, part, out / "test", on_cell=on_cell,
                                                                  recompute=recompute)))
        else:
            outcome.notes.append(f"no tested sparsity holds within {choice.margin:g} points at "
                                 f"{100 * choice.confidence:g}% confidence on {choice.problems} problems: keep the "
                                 "full cache, or tune on more problems (--limit)")
        if not choice.monotonic:
            outcome.notes.append(f"non-monotonic ladder: s = {choice.largest('observed'):g} holds but a lower sparsity "
                                 "fails; the choice is the largest sparsity below which every tested one holds")
        describe_memory(lm, spec, validation, outcome, lengths[choice.task])
        results.append(outcome)
    return results


def measure_on_test(outcome: Outcome, cells: list[Cell]) -> None:
    """The chosen setting's test accuracy (averaged over seeds) and the full cache's, from the test grid's cells."""
    choice = outcome.choice
    measured = [c for c in cells if c.task == choice.task and c.strategy == choice.strategy
                and abs(c.sparsity - choice.chosen) < 1e-9]
    outcome.test_full = next(c.accuracy for c in cells if c.task == choice.task and c.strategy == FULL)
    outcome.test_accuracy = statistics.mean(c.accuracy for c in measured)
    outcome.test_problems = measured[0].total


def mean_sequence_length(lm, directory: Path, cell: Cell) -> float:
    """Tokens (prompt and answer) of a cell's sequences, averaged."""
    with cell_samples(directory, cell).open() as handle:
        lengths = [sample_length(lm, json.loads(line)) for line in handle]
    return statistics.mean(lengths) if lengths else 0.0


def describe_memory(lm, spec: GridSpec, validation: Path, outcome: Outcome, mean_length: float) -> None:
    """The chosen plan's KV bytes per sequence at the task's measured length (validation, full cache), and
    `kvrl serve`."""
    choice = outcome.choice
    outcome.mean_length = mean_length
    entry = dict(spec.strategies)[choice.strategy]
    scores = scores_for(replace(spec, split="validation"), validation, name=choice.strategy, entry=entry,
                        seed=spec.seeds[0], model=lm.model, tokenizer=lm.tokenizer)
    plan = build_plan(entry.cls(), scores, choice.chosen, spec.compressed_policy, spec.plan_rule)
    length = max(1, round(mean_length))
    head_dim = ModelShape.from_config(lm.model.config).head_dim
    outcome.kv_bytes_full = plan.full_kv_bytes(length, head_dim=head_dim)
    outcome.kv_bytes_plan = plan.kv_bytes(length, head_dim=head_dim)
    if choice.chosen:
        model = "" if spec.model == DEFAULT_MODEL else f" --model {shlex.quote(spec.model)}"
        outcome.serve_command = f"kvrl serve --heads {shlex.quote(outcome.heads)} --sparsity {choice.chosen:g}{model}"
