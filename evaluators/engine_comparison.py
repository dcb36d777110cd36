"""Two `kvrl eval` outputs of the same grid, one per engine (`kvrl report engines`): the accuracy of each cell in
both, how many answers are the same text, and the problems whose answers differ, with the first character where
they part."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.errors import KvrlError

Answers = dict[int, tuple[str, bool]]  # doc_id -> (the filtered answer, correct)


@dataclass(frozen=True, kw_only=True)
class CellAgreement:
    """One cell run by both engines, on the problems both ran."""

    task: str
    cell: str
    first_accuracy: float  # percent
    second_accuracy: float
    identical: int
    problems: int
    differing: tuple[str, ...]  # `DOC_ID (char N)` of each problem whose answers differ


def engine_answers(folder: Path) -> dict[tuple[str, str], Answers]:
    """`{(task, cell): {doc_id: (answer, correct)}}` from a grid's classified samples."""
    paths = sorted((folder / "samples").glob("*/*.jsonl"))
    if not paths:
        raise KvrlError(f"no samples in {folder / 'samples'}; name the --output folder of a `kvrl eval`")
    found = {}
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        found[(path.parent.name, path.stem)] = {row["doc_id"]: (row["filtered_resps"][0],
                                                                row["classification"] == "correct") for row in rows}
    return found


def first_difference(a: str, b: str) -> int:
    """The index of the first character where two answers part (the shorter one's length if one starts the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cell_agreement(task: str, cell: str, first: Answers, second: Answers) -> CellAgreement:
    common = sorted(set(first) & set(second))
    if not common:
        raise KvrlError(f"cell {cell} of task {task} ran on different problems in the two outputs")
    differing = tuple(f"{i} (char {first_difference(first[i][0], second[i][0])})"
                      for i in common if first[i][0] != second[i][0])
    first_accuracy, second_accuracy = (100 * sum(side[i][1] for i in common) / len(common) for side in (first, second))
    return CellAgreement(task=task, cell=cell, first_accuracy=first_accuracy, second_accuracy=second_accuracy,
                         identical=len(common) - len(differing), problems=len(common), differing=differing)


def compare_engines(first: Path, second: Path) -> list[CellAgreement]:
    """Every cell the two outputs share, by task and cell."""
    first_answers, second_answers = engine_answers(first), engine_answers(second)
    shared = sorted(set(first_answers) & set(second_answers))
    if not shared:
        raise KvrlError(f"{first} and {second} share no cell; run the same grid with each --engine")
    return [cell_agreement(task, cell, first_answers[(task, cell)], second_answers[(task, cell)])
            for task, cell in shared]


def agreement_table(first_name: str, second_name: str, rows: list[CellAgreement]) -> str:
    lines = [f"| task | cell | accuracy {first_name} | accuracy {second_name} | identical answers | "
             "differing problems |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row.task} | {row.cell} | {row.first_accuracy:.1f} | {row.second_accuracy:.1f} | "
                     f"{row.identical} / {row.problems} | {', '.join(row.differing) or '-'} |")
    return "\n".join(lines)
