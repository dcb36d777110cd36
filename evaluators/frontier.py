"""`kvrl report DIR --frontier`: a grid's accuracy against the KV memory its cells measured (PNG and a Markdown
table), the Pareto front marked."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kvpress_rl.evaluators.cells import FULL, Cell, summarize
from kvpress_rl.evaluators.plots import _pyplot, _save
from kvpress_rl.evaluators.report import finished_cells, label_axes
from kvpress_rl.io import write_atomic

MEMORY_NOTE = ("KV memory: keys and values the caches held at the end of each generation over what full caches "
               "would hold for the same sequences (measured; `(plan)`: a grid from before kvrl measured it, the "
               "plan's share at the mean length).")


@dataclass(frozen=True, kw_only=True)
class FrontierPoint:
    task: str
    family: str  # the line it is drawn on: a strategy, or a hybrid `strategy+policy:budget`
    sparsity: float
    memory: float  # KV memory as a share of the full cache: measured when the cell recorded it, else the plan's
    accuracy: float
    measured: bool
    pareto: bool = False


def dominates(q: FrontierPoint, p: FrontierPoint) -> bool:
    """`q` keeps at least `p`'s accuracy with no more memory, and is better in one of the two."""
    return q.memory <= p.memory and q.accuracy >= p.accuracy and (q.memory < p.memory or q.accuracy > p.accuracy)


def frontier_points(cells: list[Cell]) -> list[FrontierPoint]:
    """Every (task, strategy family, sparsity) of a grid as accuracy against KV memory, the Pareto front marked:
    a point is on the front when no other point of its task keeps at least its accuracy with less memory, or
    more accuracy with no more memory."""
    points = []
    for r in summarize(cells):
        measured = r["kv_measured"] is not None
        points.append(FrontierPoint(task=r["task"], family=r["strategy"], sparsity=r["sparsity"],
                                    memory=r["kv_measured"] if measured else 1.0 - r["kv_saved"],
                                    accuracy=r["accuracy"], measured=measured))
    return [replace(p, pareto=not any(dominates(q, p) for q in points if q.task == p.task and q is not p))
            for p in points]


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
        ax.plot([100 * p.memory for p in front], [100 * p.accuracy for p in front], color="black", linewidth=1.2,
                linestyle="--", marker="o", markerfacecolor="none", markersize=11, label="Pareto front")
        label_axes(ax, task, "KV memory (% of the full cache, measured)")
    return fig


def frontier_table(points: list[FrontierPoint]) -> str:
    lines = ["| task | strategy | sparsity | KV memory (% of full) | accuracy (%) | Pareto |",
             "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.task, p.memory, -p.accuracy)):
        memory = f"{100 * p.memory:.1f}" + ("" if p.measured else " (plan)")
        lines.append(f"| {p.task} | {p.family} | {p.sparsity:g} | {memory} | {100 * p.accuracy:.1f} | "
                     f"{'yes' if p.pareto else ''} |")
    return "\n".join(lines) + "\n"


def write_frontier(directory: Path) -> tuple[Path, Path]:
    """`DIR/frontier.png` and `DIR/frontier.md` from `DIR/grid.csv`: accuracy against measured KV memory."""
    points = frontier_points(finished_cells(directory))
    png = _save(frontier_figure(points), directory / "frontier.png")
    text = (f"# kvrl frontier: {directory}\n\n![accuracy against KV memory](frontier.png)\n\n{MEMORY_NOTE}\n\n"
            f"{frontier_table(points)}")
    return png, write_atomic(directory / "frontier.md", lambda tmp: tmp.write_text(text), overwrite=True)
