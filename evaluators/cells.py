"""Finished cells of the evaluation grid and their file, `grid.csv`: one row per cell, read, written and summarised."""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from kvpress_rl.errors import KvrlError
from kvpress_rl.io import write_atomic

FULL = "full"
GRID_FILE = "grid.csv"
GRID_REQUIRED = ("task", "strategy", "sparsity", "seed", "accuracy", "correct", "total", "kv_fraction",
                 "decode_tokens_per_s")


@dataclass(frozen=True, kw_only=True)
class CellKey:
    """What names a cell in a grid: two rows with one key are the same cell."""

    task: str
    strategy: str
    sparsity: float  # rounded to 6 places: 0.6 and 0.6000000001 are one cell
    seed: int
    full_heads: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", round(self.sparsity, 6))


@dataclass(kw_only=True)
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
    # JSON of the settings that made the cell (`resume.cell_definition`); "" in grids from before it was recorded
    definition: str = ""
    # a hybrid plan: "POLICY:BUDGET" the full heads keep (`--full-policy`, `--full-budget`); "" = everything
    full_heads: str = ""
    # KV bytes the caches held at the end of each generation / the full cache's (-1: not measured)
    kv_measured: float = -1.0

    @property
    def key(self) -> CellKey:
        return CellKey(task=self.task, strategy=self.strategy, sparsity=self.sparsity, seed=self.seed,
                       full_heads=self.full_heads)

    @property
    def label(self) -> str:
        """The strategy as tables and plots name it: `rlkv`, or `rlkv+rkv:0.5` for a hybrid plan."""
        return f"{self.strategy}+{self.full_heads}" if self.full_heads else self.strategy


COLUMN_TYPES = {f.name: f.type for f in fields(Cell)}  # as text: this module's annotations are not evaluated


def cell_stem(*, task: str, strategy: str, full_heads: str | None, sparsity: float, seed: int) -> str:
    """The name of a cell's results and samples files (`TASK/STRATEGY[+POLICY-BUDGET]-sS-seedN`)."""
    hybrid = "+" + full_heads.replace(":", "-") if full_heads else ""
    return f"{task}/{strategy}{hybrid}-s{sparsity:g}-seed{seed}"


def cell_samples(directory: Path, cell: Cell) -> Path:
    """Where `kvrl eval` wrote a finished cell's per-problem samples."""
    stem = cell_stem(task=cell.task, strategy=cell.strategy, full_heads=cell.full_heads, sparsity=cell.sparsity,
                     seed=cell.seed)
    return directory / "samples" / f"{stem}.jsonl"


def read_grid(path: Path) -> list[Cell]:
    """The cells of a `grid.csv`; a damaged file (cut short, edited by hand) is a one-line `KvrlError`."""
    if not path.exists():
        return []
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            check_header(path, reader.fieldnames or [])
            return [row_cell(path, reader, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise damaged(path, str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def damaged(path: Path, why: str) -> KvrlError:
    return KvrlError(f"{path} is damaged ({why}); repair it, or move it away and run again "
                     "(kvrl will not overwrite it)")


def check_header(path: Path, header: list[str]) -> None:
    if not header:
        raise damaged(path, "the file is empty")
    missing = [c for c in GRID_REQUIRED if c not in header]
    unknown = [c for c in header if c not in COLUMN_TYPES]
    if missing or unknown:
        problems = [f"misses {', '.join(missing)}" if missing else "",
                    f"has unknown {', '.join(unknown)}" if unknown else ""]
        raise damaged(path, "header " + "; ".join(part for part in problems if part))


def row_cell(path: Path, reader: csv.DictReader, row: dict) -> Cell:
    """One row as a `Cell`: a row with too few or too many fields, or a value of the wrong kind, is damage."""
    if None in row or any(v is None for v in row.values()):
        fields_read = len(reader.fieldnames) + len(row.get(None) or []) - sum(v is None for v in row.values())
        raise damaged(path, f"line {reader.line_num} has {fields_read} fields, the header {len(reader.fieldnames)}")
    try:
        return Cell(**{name: column_value(name, text) for name, text in row.items()})
    except ValueError as err:
        raise damaged(path, f"line {reader.line_num}: {err}") from None


def column_value(name: str, text: str) -> Any:
    kind = COLUMN_TYPES[name]
    return float(text) if kind in ("float", float) else int(text) if kind in ("int", int) else text


def write_grid(path: Path, cells: list[Cell]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Cell)])
            writer.writeheader()
            writer.writerows(asdict(c) for c in cells)

    write_atomic(path, write, overwrite=True)


def summarize(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per (task, strategy, sparsity): accuracy averaged over seeds, change against full."""
    full = {c.task: c.accuracy for c in cells if c.strategy == FULL}
    groups: dict[tuple[str, str, float], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.label, c.sparsity), []).append(c)

    def order(item: tuple[tuple[str, str, float], list[Cell]]) -> tuple:
        task, strategy, sparsity = item[0]
        return task, strategy != FULL, strategy, sparsity

    rows = []
    for (task, strategy, sparsity), members in sorted(groups.items(), key=order):
        accuracy = statistics.mean(m.accuracy for m in members)
        measured = all(m.kv_measured >= 0 for m in members)
        rows.append({
            "task": task, "strategy": strategy, "sparsity": sparsity, "seeds": len(members), "accuracy": accuracy,
            "accuracy_std": statistics.stdev(m.accuracy for m in members) if len(members) > 1 else 0.0,
            "change": accuracy - full.get(task, accuracy),
            "kv_saved": 1 - statistics.mean(m.kv_fraction for m in members),
            "decode_tokens_per_s": statistics.mean(m.decode_tokens_per_s for m in members),
            "overlength": sum(m.overlength for m in members), "repetitive": sum(m.repetitive for m in members),
            "kv_measured": statistics.mean(m.kv_measured for m in members) if measured else None,
        })
    return rows
