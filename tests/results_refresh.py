"""Refreshing the numbers of the results tables (`tests/results_tables.py`) after a source file is re-measured.

Run from the repository root::

    .venv/bin/python -m tests.results_refresh update            # every checked file, in place
    .venv/bin/python -m tests.results_refresh render FILE.csv [FILE.csv ...] [--task T] [--cols accuracy%@sparsity]
    .venv/bin/python -m tests.results_refresh render --frontier FILE.csv
    .venv/bin/python -m tests.results_refresh check                       # the test's messages, without pytest

`update` rewrites each checked number from its files at the precision it is written with, keeps the
layout, and lists what changed and what it could not rewrite (rows, columns and the prose around a table
stay as they are: read them again). `render` prints a new strategy x sparsity table in this convention;
`render --frontier` the frontier table of docs/results.md (every point, by measured memory).
"""

from __future__ import annotations

import math
import sys

from tests.results_tables import (
    CHECKED,
    DURATION,
    NUMBER,
    ROOT,
    Cell,
    Column,
    SpecError,
    all_tables,
    at_precision,
    cells_of,
    field_value,
    join_row,
    mismatch,
    problems,
    read_tables,
    records,
)


def rewrite(cell: Cell) -> str | None:
    """The cell with its numbers recomputed at their precision, or None when its shape does not fit the record."""
    if isinstance(cell.expected, bool) and not cell.error:
        return "yes" if cell.expected else ""
    if cell.error or not isinstance(cell.expected, list) or DURATION.search(cell.text):
        return None
    value, *seeds = cell.expected
    matches_ = list(NUMBER.finditer(cell.text))
    want = [value, *seeds] if seeds and len(matches_) == 1 + len(seeds) else [value]
    if len(matches_) != len(want) or any(math.isnan(v) for v in want):
        return None
    text = cell.text
    for m, v in reversed(list(zip(matches_, want))):
        new = at_precision(m.group(), v)
        if "," in m.group():
            new = f"{float(new):,.{len(new.split('.')[1]) if '.' in new else 0}f}"
        text = text[:m.start()] + new + text[m.end():]
    return text


def update(paths: list[str]) -> int:
    unresolved = 0
    for path in paths:
        lines = (ROOT / path).read_text().splitlines(keepends=True)
        changed = False
        for table in read_tables(path):
            if table.kind != "source":
                continue
            try:
                cells = cells_of(table)
            except SpecError as err:
                print(f"{path}:{table.comment_line}: cannot read its source comment: {err}")
                unresolved += 1
                continue
            for cell in cells:
                if mismatch(cell) is None:
                    continue
                new = rewrite(cell)
                if new is None:
                    print(f"{path}:{cell.line}: row {cell.label!r}, column {cell.header!r}: by hand: {mismatch(cell)}")
                    unresolved += 1
                    continue
                row = table.rows[cell.row]
                print(f"{path}:{cell.line}: row {cell.label!r}, column {cell.header!r}: {cell.text} -> {new}")
                row[cell.col] = new
                lines[cell.line - 1] = join_row(row) + "\n"
                changed = True
        if changed:
            (ROOT / path).write_text("".join(lines))
    return 1 if unresolved else 0


def render_frontier(path: str) -> str:
    """docs/results.md's frontier table of a grid: every point by measured KV memory, the Pareto front marked."""
    recs = sorted(records(path), key=lambda r: (r["task"], r["kv_measured"], -r["accuracy"]))
    tasks = sorted({r["task"] for r in recs})
    lines = [f"<!-- source: {path} task={tasks[0]} rows=strategy,sparsity",
             "     cols=kv_measured%,accuracy%,pareto -->",
             "| strategy | sparsity | KV memory (% of full, measured) | accuracy (%) | Pareto |",
             "|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['strategy']} | {r['sparsity']:g} | {100 * r['kv_measured']:.1f} | "
                     f"{100 * r['accuracy']:.1f} | {'yes' if r['pareto'] else ''} |")
    if len(tasks) > 1:
        lines.insert(0, "(one task a table: the file holds " + ", ".join(tasks) + ")")
    return "\n".join(lines)


def render(files: list[str], task: str | None, cols: str) -> str:
    """A strategy x sparsity table of grid files in this convention (full cache first, then each strategy)."""
    column = Column.parse(cols)
    recs = [r for path in files for r in records(path) if task is None or r["task"] == task]
    tasks = sorted({r["task"] for r in recs})
    if len(tasks) > 1:
        raise SystemExit(f"the files hold tasks {', '.join(tasks)}: pass --task")
    sparsities = sorted({r["sparsity"] for r in recs if r["strategy"] != "full"})
    strategies = list(dict.fromkeys(r["strategy"] for r in recs))
    scale = 100.0 if column.percent else 1.0
    lines = [f"<!-- source: {' '.join(files)}" + (f" task={task}" if task else "") + f" rows=strategy cols={cols} -->",
             "| strategy | " + " | ".join(f"s = {s:g}" for s in sparsities) + " |",
             "| --- | " + " | ".join("---" for _ in sparsities) + " |"]
    for strategy in strategies:
        cells = []
        for s in sparsities:
            hit = next((r for r in recs if r["strategy"] == strategy
                        and (strategy == "full" or abs(r["sparsity"] - s) < 1e-9)), None)
            if hit is None:
                cells.append("")
                continue
            value = scale * field_value(hit, column.field, "")
            seeds = hit.get("_seeds", {}).get(column.field, [])
            cells.append(f"{value:.1f}" + (" (" + " / ".join(f"{scale * v:.0f}" for v in seeds) + ")" if seeds else ""))
        label = "full cache" if strategy == "full" else strategy
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["update"]:
        return update(argv[1:] or CHECKED)
    if argv[:1] == ["render"] and len(argv) > 1:
        files, task, cols, rest = [], None, "accuracy%@sparsity", argv[1:]
        if rest[0] == "--frontier":
            print(render_frontier(rest[1]))
            return 0
        while rest:
            word = rest.pop(0)
            if word == "--task":
                task = rest.pop(0)
            elif word == "--cols":
                cols = rest.pop(0)
            else:
                files.append(word)
        print(render(files, task, cols))
        return 0
    if argv[:1] == ["check"] or not argv:
        found = [p for t in all_tables() for p in problems(t)]
        print("\n".join(found) or "every results table agrees with its source")
        return 1 if found else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
