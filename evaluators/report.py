"""`kvrl report DIR`: accuracy against sparsity per task (PNG) and a Markdown table, from a grid.

With a paper CSV (the layout of shared/reference/rlkv_paper_results.csv: model, benchmark,
method, sparsity, accuracy, full_accuracy in percent) the paper's points for one model are drawn
beside ours, dashed, on the task they correspond to.

A strategy run with more than one seed at a sparsity (`random`) is drawn as its mean with a shaded
band from the lowest to the highest seed's accuracy; the table gives `mean ± std (n seeds)`, the
sample standard deviation over the seeds.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import FULL, Cell, read_grid, summarize
from kvpress_rl.evaluators.plots import _pyplot, _save
from kvpress_rl.io import write_atomic

# our task name (prefix) -> the paper's benchmark; our strategy -> the paper's method
PAPER_BENCHMARKS = {"gsm8k": "GSM8K", "aime24": "AIME24", "mbpp": "MBPP", "math500": "Math500", "minerva_math500": "Math500"}
PAPER_METHODS = {"rlkv": "RLKV", "h2o": "H2O", "rkv": "R-KV", "duo": "DuoAttention", "kvzip": "KVZip"}


@dataclass(frozen=True)
class PaperPoint:
    method: str
    sparsity: float
    accuracy: float  # fraction, like ours
    full_accuracy: float


def paper_benchmark(task: str) -> str | None:
    for prefix in sorted(PAPER_BENCHMARKS, key=len, reverse=True):
        if task == prefix or task.startswith(prefix + "_"):
            return PAPER_BENCHMARKS[prefix]
    return None


def read_paper(path: Path, model: str) -> dict[str, list[PaperPoint]]:
    """The paper's points for `model`, by benchmark."""
    if not path.is_file():
        raise KvrlError(f"paper results not found: {path}")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    needed = {"model", "benchmark", "method", "sparsity", "accuracy", "full_accuracy"}
    if not rows or not needed <= set(rows[0]):
        raise KvrlError(f"{path}: expected the columns {', '.join(sorted(needed))}")
    models = sorted({r["model"] for r in rows})
    if model not in models:
        raise KvrlError(f"{path} has no model {model!r}; it has: {', '.join(models)}")
    points: dict[str, list[PaperPoint]] = {}
    for r in rows:
        if r["model"] == model:
            points.setdefault(r["benchmark"], []).append(
                PaperPoint(r["method"], float(r["sparsity"]), float(r["accuracy"]) / 100, float(r["full_accuracy"]) / 100))
    return points


def paper_curves(points: list[PaperPoint]) -> dict[str, list[PaperPoint]]:
    curves: dict[str, list[PaperPoint]] = {}
    for point in sorted(points, key=lambda p: p.sparsity):
        curves.setdefault(point.method, []).append(point)
    return curves


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | strategy | sparsity | seeds | accuracy (%) | change vs full | KV saved | decode tok/s | overlength | repetitive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {100 * r['accuracy_std']:.1f} ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
        lines.append(f"| {r['task']} | {r['strategy']} | {r['sparsity']:g} | {r['seeds']} | {100 * r['accuracy']:.1f}{spread} | "
                     f"{100 * r['change']:+.1f} | {100 * r['kv_saved']:.0f}% | {r['decode_tokens_per_s']:.1f} | {r['overlength']} | {r['repetitive']} |")
    return "\n".join(lines) + "\n"


SEED_BAND_CAPTION = ("Strategies run with several seeds: the line is the mean over the seeds, the shaded band spans the lowest "
                     "to the highest seed's accuracy; the table gives mean ± sample standard deviation (n seeds).")


def seed_ranges(cells: list[Cell]) -> dict[tuple[str, str, float], tuple[float, float, int]]:
    """(task, strategy, sparsity) -> (lowest, highest accuracy over the seeds, number of seeds)."""
    accuracies: dict[tuple[str, str, float], list[float]] = {}
    for c in cells:
        accuracies.setdefault((c.task, c.label, c.sparsity), []).append(c.accuracy)
    return {key: (min(values), max(values), len(values)) for key, values in accuracies.items()}


def accuracy_figure(cells: list[Cell], points: dict[str, list[PaperPoint]] | None = None, paper_model: str | None = None):
    """Accuracy against sparsity, one panel per task and one line per strategy (the mean over seeds; a
    band from the lowest to the highest seed where a sparsity has more than one), the full cache as a
    dotted line, the paper's points dashed. Returns the matplotlib figure."""
    points = points or {}
    rows = summarize(cells)
    ranges = seed_ranges(cells)
    tasks = sorted({r["task"] for r in rows})
    plt = _pyplot()
    columns = min(3, len(tasks))
    rows_of_plots = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows_of_plots, columns, figsize=(5.5 * columns, 4.2 * rows_of_plots), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == task]
        full = next((r["accuracy"] for r in mine if r["strategy"] == FULL), None)
        colors = {}
        for strategy in sorted({r["strategy"] for r in mine} - {FULL}):
            line = sorted((r for r in mine if r["strategy"] == strategy), key=lambda r: r["sparsity"])
            xs = [0.0, *(r["sparsity"] for r in line)] if full is not None else [r["sparsity"] for r in line]
            ys = [full, *(r["accuracy"] for r in line)] if full is not None else [r["accuracy"] for r in line]
            color = ax.plot(xs, [100 * y for y in ys], marker="o", label=strategy)[0].get_color()
            colors[PAPER_METHODS.get(strategy, strategy)] = color
            spread = [ranges[(task, strategy, r["sparsity"])] for r in line]
            seeds = max(n for _, _, n in spread)
            if seeds > 1:  # the full cache (x = 0) and single-seed points pinch the band to the line
                pinned = [full] if full is not None else []
                lows, highs = pinned + [low for low, _, _ in spread], pinned + [high for _, high, _ in spread]
                ax.fill_between(xs, [100 * y for y in lows], [100 * y for y in highs], color=color, alpha=0.2, linewidth=0,
                                label=f"{strategy}: lowest to highest of {seeds} seeds")
        for method, curve in paper_curves(points.get(paper_benchmark(task) or "", [])).items():
            ax.plot([0.0, *(p.sparsity for p in curve)], [100 * curve[0].full_accuracy, *(100 * p.accuracy for p in curve)],
                    linestyle="--", marker="x", color=colors.get(method), alpha=0.8, label=f"paper {paper_model}: {method}")
        if full is not None:
            ax.axhline(100 * full, color="grey", linewidth=0.8, linestyle=":", label="full cache")
        label_axes(ax, task, "sparsity (fraction of KV heads compressed)")
    return fig


def label_axes(ax, task: str, xlabel: str) -> None:
    ax.set_title(task)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)


def write_report(directory: Path, paper: Path | None = None, paper_model: str | None = None) -> tuple[Path, Path]:
    """`DIR/report.png` and `DIR/report.md` from `DIR/grid.csv`."""
    cells = read_grid(directory / "grid.csv")
    if not cells:
        raise KvrlError(f"no finished cells in {directory / 'grid.csv'}; run `kvrl eval --output {directory}` first")
    if paper is not None and not paper_model:
        raise KvrlError("--paper needs --paper-model (one of the CSV's models)")
    points = read_paper(paper, paper_model) if paper is not None else {}
    png = _save(accuracy_figure(cells, points, paper_model), directory / "report.png")
    rows = summarize(cells)
    caption = f"{SEED_BAND_CAPTION}\n\n" if any(r["seeds"] > 1 for r in rows) else ""
    text = f"# kvrl report: {directory}\n\n![accuracy against sparsity](report.png)\n\n{caption}{markdown_table(rows)}"
    markdown = write_atomic(directory / "report.md", lambda tmp: tmp.write_text(text), overwrite=True)
    return png, markdown


@dataclass(frozen=True)
class FrontierPoint:
    task: str
    family: str  # the line it is drawn on: a strategy, or a hybrid `strategy+policy:budget`
    sparsity: float
    memory: float  # KV memory as a share of the full cache: measured when the cell recorded it, else the plan's
    accuracy: float
    measured: bool
    pareto: bool = False


def frontier_points(cells: list[Cell]) -> list[FrontierPoint]:
    """Every (task, strategy family, sparsity) of a grid as accuracy against KV memory, the Pareto front marked:
    a point is on the front when no other point of its task keeps at least its accuracy with less memory, or
    more accuracy with no more memory."""
    rows = summarize(cells)
    points = []
    for r in rows:
        measured = r["kv_measured"] is not None
        memory = r["kv_measured"] if measured else 1.0 - r["kv_saved"]
        points.append(FrontierPoint(r["task"], r["strategy"], r["sparsity"], memory, r["accuracy"], measured))
    marked = []
    for p in points:
        rivals = [q for q in points if q.task == p.task and q is not p]
        dominated = any(q.memory <= p.memory and q.accuracy >= p.accuracy and (q.memory < p.memory or q.accuracy > p.accuracy)
                        for q in rivals)
        marked.append(FrontierPoint(**{**p.__dict__, "pareto": not dominated}))
    return marked


def frontier_figure(points: list[FrontierPoint]):
    """Accuracy against KV memory, one panel per task, one line per strategy family, the Pareto front circled
    and joined."""
    tasks = sorted({p.task for p in points})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        mine = [p for p in points if p.task == task]
        for family in sorted({p.family for p in mine}):
            line = sorted((p for p in mine if p.family == family), key=lambda p: p.memory)
            style = dict(marker="*", markersize=12, linestyle="none") if family == FULL else dict(marker="o")
            ax.plot([100 * p.memory for p in line], [100 * p.accuracy for p in line], label=family, **style)
        front = sorted((p for p in mine if p.pareto), key=lambda p: p.memory)
        ax.plot([100 * p.memory for p in front], [100 * p.accuracy for p in front], color="black", linewidth=1.2, linestyle="--",
                marker="o", markerfacecolor="none", markersize=11, label="Pareto front")
        label_axes(ax, task, "KV memory (% of the full cache, measured)")
    return fig


def frontier_table(points: list[FrontierPoint]) -> str:
    lines = ["| task | strategy | sparsity | KV memory (% of full) | accuracy (%) | Pareto |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.task, p.memory, -p.accuracy)):
        memory = f"{100 * p.memory:.1f}" + ("" if p.measured else " (plan)")
        lines.append(f"| {p.task} | {p.family} | {p.sparsity:g} | {memory} | {100 * p.accuracy:.1f} | {'yes' if p.pareto else ''} |")
    return "\n".join(lines) + "\n"


def write_frontier(directory: Path) -> tuple[Path, Path]:
    """`DIR/frontier.png` and `DIR/frontier.md` from `DIR/grid.csv`: accuracy against measured KV memory."""
    cells = read_grid(directory / "grid.csv")
    if not cells:
        raise KvrlError(f"no finished cells in {directory / 'grid.csv'}; run `kvrl eval --output {directory}` first")
    points = frontier_points(cells)
    png = _save(frontier_figure(points), directory / "frontier.png")
    note = ("KV memory: keys and values the caches held at the end of each generation over what full caches would hold for the "
            "same sequences (measured; `(plan)`: a grid from before kvrl measured it, the plan's share at the mean length).")
    text = f"# kvrl frontier: {directory}\n\n![accuracy against KV memory](frontier.png)\n\n{note}\n\n{frontier_table(points)}"
    return png, write_atomic(directory / "frontier.md", lambda tmp: tmp.write_text(text), overwrite=True)


def cell_samples(directory: Path, cell: Cell) -> Path:
    """Where `kvrl eval` wrote a cell's per-problem samples."""
    full_heads = f"+{cell.full_heads.replace(':', '-')}" if cell.full_heads else ""
    return directory / "samples" / cell.task / f"{cell.strategy}{full_heads}-s{cell.sparsity:g}-seed{cell.seed}.jsonl"


def accuracy_by(directory: Path, field: str) -> dict[tuple[str, str, float], dict[object, tuple[int, int]]]:
    """`{(task, label, sparsity): {value: (solved, problems)}}`, problems grouped by their document's `field`
    (`hops` for the embedded tasks), the seeds of a strategy pooled."""
    cells = read_grid(directory / "grid.csv")
    if not cells:
        raise KvrlError(f"no finished cells in {directory / 'grid.csv'}; run `kvrl eval --output {directory}` first")
    table: dict[tuple[str, str, float], dict[object, list[int]]] = {}
    for cell in cells:
        path = cell_samples(directory, cell)
        if not path.is_file():
            raise KvrlError(f"the samples of cell {cell.label} at {cell.sparsity:g} (seed {cell.seed}) are missing: {path}")
        counts = table.setdefault((cell.task, cell.label, cell.sparsity), {})
        for row in map(json.loads, path.read_text().splitlines()):
            if field not in row["doc"]:
                raise KvrlError(f"task {cell.task!r} has no field {field!r} in its documents; its fields: {', '.join(sorted(row['doc']))}")
            value = counts.setdefault(row["doc"][field], [0, 0])
            value[0] += int(next(v for k, v in row.items() if k in ("acc", "exact_match", "pass_at_1")) > 0)
            value[1] += 1
    return {key: {v: (c[0], c[1]) for v, c in sorted(counts.items())} for key, counts in table.items()}


def write_breakdown(directory: Path, field: str) -> tuple[Path, Path]:
    """`DIR/by_FIELD.png` and `DIR/by_FIELD.md`: accuracy of every cell by a document field (e.g. the embedded
    tasks' `hops`), one panel per task and sparsity."""
    table = accuracy_by(directory, field)
    values = sorted({v for counts in table.values() for v in counts})
    lines = [f"| task | strategy | sparsity | {' | '.join(str(v) for v in values)} |", "|---|---|---|" + "---|" * len(values)]
    for (task, label, sparsity), counts in sorted(table.items(), key=lambda item: (item[0][0], item[0][2], item[0][1])):
        cells = [f"{100 * counts[v][0] / counts[v][1]:.0f}" if v in counts else "" for v in values]
        lines.append(f"| {task} | {label} | {sparsity:g} | {' | '.join(cells)} |")
    sizes = {v: max(c[v][1] for c in table.values() if v in c) for v in values}
    note = f"Accuracy (%) by the problems' `{field}`; problems per column (one seed): " + ", ".join(f"{v}: {n}" for v, n in sizes.items())
    plt = _pyplot()
    panels = sorted({(task, sparsity) for task, _, sparsity in table if sparsity > 0}) or sorted({(t, s) for t, _, s in table})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False, sharey=True)
    colors = {label: f"C{i}" for i, label in enumerate(sorted({label for _, label, _ in table} - {FULL}))}  # one per strategy
    for ax, (task, sparsity) in zip(axes.flat, panels):
        for (t, label, s), counts in sorted(table.items()):
            if t == task and (s == sparsity or label == FULL):
                xs = list(counts)
                style = dict(color="black", linestyle="--") if label == FULL else dict(color=colors[label])
                ax.plot(xs, [100 * counts[x][0] / counts[x][1] for x in xs], marker="o", label=label, **style)
        label_axes(ax, f"{task}, sparsity {sparsity:g}", field)
    png = _save(fig, directory / f"by_{field}.png")
    text = f"# kvrl report by {field}: {directory}\n\n![accuracy by {field}](by_{field}.png)\n\n{note}\n\n" + "\n".join(lines) + "\n"
    return png, write_atomic(directory / f"by_{field}.md", lambda tmp: tmp.write_text(text), overwrite=True)
