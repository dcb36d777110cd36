"""`kvrl report DIR --by FIELD`: a grid's accuracy by a field of the problems' documents (e.g. the embedded tasks'
`hops`), from the samples of its cells: a PNG with one panel per task and sparsity, and a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import FULL, cell_samples
from kvpress_rl.evaluators.paired import sample_solved
from kvpress_rl.evaluators.plots import _pyplot, _save
from kvpress_rl.evaluators.report import finished_cells, label_axes
from kvpress_rl.io import write_atomic

Breakdown = dict[tuple[str, str, float], dict[object, tuple[int, int]]]  # (task, label, sparsity) -> value -> counts


def accuracy_by(directory: Path, field: str) -> Breakdown:
    """`{(task, label, sparsity): {value: (solved, problems)}}`, problems grouped by their document's `field`
    (`hops` for the embedded tasks), the seeds of a strategy pooled."""
    table: dict[tuple[str, str, float], dict[object, list[int]]] = {}
    for cell in finished_cells(directory):
        path = cell_samples(directory, cell)
        if not path.is_file():
            raise KvrlError(f"the samples of cell {cell.label} at {cell.sparsity:g} (seed {cell.seed}) are missing: "
                            f"{path}")
        counts = table.setdefault((cell.task, cell.label, cell.sparsity), {})
        for row in map(json.loads, path.read_text().splitlines()):
            if field not in row["doc"]:
                raise KvrlError(f"task {cell.task!r} has no field {field!r} in its documents; its fields: "
                                f"{', '.join(sorted(row['doc']))}")
            value = counts.setdefault(row["doc"][field], [0, 0])
            value[0] += int(sample_solved(row))
            value[1] += 1
    return {key: {v: (c[0], c[1]) for v, c in sorted(counts.items())} for key, counts in table.items()}


def breakdown_markdown(table: Breakdown, field: str) -> str:
    """The note (problems per column) and one row per cell: its accuracy (%) at each value of `field`."""
    values = sorted({v for counts in table.values() for v in counts})
    lines = [f"| task | strategy | sparsity | {' | '.join(str(v) for v in values)} |",
             "|---|---|---|" + "---|" * len(values)]
    for (task, label, sparsity), counts in sorted(table.items(), key=lambda item: (item[0][0], item[0][2], item[0][1])):
        cells = [f"{100 * counts[v][0] / counts[v][1]:.0f}" if v in counts else "" for v in values]
        lines.append(f"| {task} | {label} | {sparsity:g} | {' | '.join(cells)} |")
    sizes = {v: max(c[v][1] for c in table.values() if v in c) for v in values}
    note = (f"Accuracy (%) by the problems' `{field}`; problems per column (one seed): "
            + ", ".join(f"{v}: {n}" for v, n in sizes.items()))
    return note + "\n\n" + "\n".join(lines) + "\n"


def breakdown_figure(table: Breakdown, field: str):
    """One panel per task and compressed sparsity: each strategy's accuracy by `field`, the full cache dashed."""
    plt = _pyplot()
    panels = (sorted({(task, sparsity) for task, _, sparsity in table if sparsity > 0})
              or sorted({(t, s) for t, _, s in table}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False, sharey=True)
    strategies = sorted({label for _, label, _ in table} - {FULL})
    colors = {label: f"C{i}" for i, label in enumerate(strategies)}  # one colour per strategy across the panels
    for ax, (task, sparsity) in zip(axes.flat, panels):
        for (t, label, s), counts in sorted(table.items()):
            if t == task and (s == sparsity or label == FULL):
                xs = list(counts)
                style = dict(color="black", linestyle="--") if label == FULL else dict(color=colors[label])
                ax.plot(xs, [100 * counts[x][0] / counts[x][1] for x in xs], marker="o", label=label, **style)
        label_axes(ax, f"{task}, sparsity {sparsity:g}", field)
    return fig


def write_breakdown(directory: Path, field: str) -> tuple[Path, Path]:
    """`DIR/by_FIELD.png` and `DIR/by_FIELD.md`: accuracy of every cell by a document field (e.g. the embedded
    tasks' `hops`), one panel per task and sparsity."""
    table = accuracy_by(directory, field)
    png = _save(breakdown_figure(table, field), directory / f"by_{field}.png")
    text = (f"# kvrl report by {field}: {directory}\n\n![accuracy by {field}](by_{field}.png)\n\n"
            f"{breakdown_markdown(table, field)}")
    return png, write_atomic(directory / f"by_{field}.md", lambda tmp: tmp.write_text(text), overwrite=True)
