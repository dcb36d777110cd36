"""`kvrl report DIR`: accuracy against sparsity per task (PNG) and a Markdown table, from a grid.

With a paper CSV (the layout of shared/reference/rlkv_paper_results.csv: model, benchmark,
method, sparsity, accuracy, full_accuracy in percent) the paper's points for one model are drawn
beside ours, dashed, on the task they correspond to.

A strategy run with more than one seed at a sparsity (`random`) is drawn as its mean with a shaded
band from the lowest to the highest seed's accuracy; the table gives `mean ± std (n seeds)`, the
sample standard deviation over the seeds. The same grid against KV memory: `frontier.py`; by a field of
the problems: `breakdown.py`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import FULL, Cell, read_grid, summarize
from kvpress_rl.evaluators.plots import _pyplot, _save
from kvpress_rl.io import write_atomic

# our task name (prefix) -> the paper's benchmark; our strategy -> the paper's method
PAPER_BENCHMARKS = {"gsm8k": "GSM8K", "aime24": "AIME24", "mbpp": "MBPP", "math500": "Math500",
                    "minerva_math500": "Math500"}
PAPER_METHODS = {"rlkv": "RLKV", "h2o": "H2O", "rkv": "R-KV", "duo": "DuoAttention", "kvzip": "KVZip"}


@dataclass(frozen=True, kw_only=True)
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
                PaperPoint(method=r["method"], sparsity=float(r["sparsity"]), accuracy=float(r["accuracy"]) / 100,
                           full_accuracy=float(r["full_accuracy"]) / 100))
    return points


def paper_curves(points: list[PaperPoint]) -> dict[str, list[PaperPoint]]:
    curves: dict[str, list[PaperPoint]] = {}
    for point in sorted(points, key=lambda p: p.sparsity):
        curves.setdefault(point.method, []).append(point)
    return curves


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | strategy | sparsity | seeds | accuracy (%) | change vs full | KV saved | decode tok/s | "
             "overlength | repetitive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {100 * r['accuracy_std']:.1f} ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
        lines.append(f"| {r['task']} | {r['strategy']} | {r['sparsity']:g} | {r['seeds']} | "
                     f"{100 * r['accuracy']:.1f}{spread} | {100 * r['change']:+.1f} | {100 * r['kv_saved']:.0f}% | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['overlength']} | {r['repetitive']} |")
    return "\n".join(lines) + "\n"


SEED_BAND_CAPTION = ("Strategies run with several seeds: the line is the mean over the seeds, the shaded band spans "
                     "the lowest to the highest seed's accuracy; the table gives mean ± sample standard deviation "
                     "(n seeds).")


def seed_ranges(cells: list[Cell]) -> dict[tuple[str, str, float], tuple[float, float, int]]:
    """(task, strategy, sparsity) -> (lowest, highest accuracy over the seeds, number of seeds)."""
    accuracies: dict[tuple[str, str, float], list[float]] = {}
    for c in cells:
        accuracies.setdefault((c.task, c.label, c.sparsity), []).append(c.accuracy)
    return {key: (min(values), max(values), len(values)) for key, values in accuracies.items()}


def accuracy_figure(cells: list[Cell], points: dict[str, list[PaperPoint]] | None = None,
                    paper_model: str | None = None):
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
            spread = [ranges[(task, strategy, r["sparsity"])] for r in line]
            colors[PAPER_METHODS.get(strategy, strategy)] = draw_strategy(ax, strategy, line, spread, full)
        for method, curve in paper_curves(points.get(paper_benchmark(task) or "", [])).items():
            ax.plot([0.0, *(p.sparsity for p in curve)],
                    [100 * curve[0].full_accuracy, *(100 * p.accuracy for p in curve)],
                    linestyle="--", marker="x", color=colors.get(method), alpha=0.8,
                    label=f"paper {paper_model}: {method}")
        if full is not None:
            ax.axhline(100 * full, color="grey", linewidth=0.8, linestyle=":", label="full cache")
        label_axes(ax, task, "sparsity (fraction of KV heads compressed)")
    return fig


def draw_strategy(ax, strategy: str, line: list[dict], spread: list[tuple[float, float, int]],
                  full: float | None) -> str:
    """One strategy's mean accuracy by sparsity (from the full cache at 0 when there is one), with the band of its
    seeds where it ran several; returns the line's colour."""
    xs = [0.0, *(r["sparsity"] for r in line)] if full is not None else [r["sparsity"] for r in line]
    ys = [full, *(r["accuracy"] for r in line)] if full is not None else [r["accuracy"] for r in line]
    color = ax.plot(xs, [100 * y for y in ys], marker="o", label=strategy)[0].get_color()
    seeds = max(n for _, _, n in spread)
    if seeds > 1:  # the full cache (x = 0) and single-seed points pinch the band to the line
        pinned = [full] if full is not None else []
        lows, highs = pinned + [low for low, _, _ in spread], pinned + [high for _, high, _ in spread]
        ax.fill_between(xs, [100 * y for y in lows], [100 * y for y in highs], color=color, alpha=0.2, linewidth=0,
                        label=f"{strategy}: lowest to highest of {seeds} seeds")
    return color


def label_axes(ax, task: str, xlabel: str) -> None:
    ax.set_title(task)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)


def finished_cells(directory: Path) -> list[Cell]:
    """The cells of `DIR/grid.csv`; a grid with none is refused."""
    cells = read_grid(directory / "grid.csv")
    if not cells:
        raise KvrlError(f"no finished cells in {directory / 'grid.csv'}; run `kvrl eval --output {directory}` first")
    return cells


def write_report(directory: Path, paper: Path | None = None, paper_model: str | None = None) -> tuple[Path, Path]:
    """`DIR/report.png` and `DIR/report.md` from `DIR/grid.csv`."""
    cells = finished_cells(directory)
    if paper is not None and not paper_model:
        raise KvrlError("--paper needs --paper-model (one of the CSV's models)")
    points = read_paper(paper, paper_model) if paper is not None else {}
    png = _save(accuracy_figure(cells, points, paper_model), directory / "report.png")
    rows = summarize(cells)
    caption = f"{SEED_BAND_CAPTION}\n\n" if any(r["seeds"] > 1 for r in rows) else ""
    text = (f"# kvrl report: {directory}\n\n![accuracy against sparsity](report.png)\n\n{caption}"
            f"{markdown_table(rows)}")
    markdown = write_atomic(directory / "report.md", lambda tmp: tmp.write_text(text), overwrite=True)
    return png, markdown
