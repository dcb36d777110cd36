"""The results tables of the README and the docs, read and checked against the committed files they come from.

Read: README.md, docs/*.md and benchmarks/README.md (`CHECKED`). `tests/test_readme_results.py` runs `problems` on
every results table; `tests/results_refresh.py` rewrites the numbers after a source file is re-measured.

**Results tables.** A Markdown table is a results table when more than half of its non-empty body cells
outside the first column start with a number (accuracies, KV memory, speeds, bytes, seconds). Reference
tables (the strategies, the CLI, the tasks, the layers, the method's defaults) do not, and need nothing.
Every results table carries an HTML comment that ends on the line just before it, of one of two kinds
(`python -m tests.results_refresh check` lists what is wrong with any of them).

**1. `source:`** the table is recomputed, cell by cell, from committed files::

    <!-- source: benchmarks/results/grid_embedded_count_500.csv benchmarks/results/grid_embedded_count_100.csv
         task=embedded_count rows=strategy cols=accuracy%@sparsity row:KV=rlkv/kv_measured% -->

- The files, from the repository root, in order: a cell comes from the first file that holds its row.
  A `kvrl eval` grid (a CSV with `grid.csv`'s columns) is read with kvrl's own `read_grid` and `summarize`,
  as `kvrl eval`'s summary and `kvrl report` read it: one record per (task, strategy, sparsity), seeds
  averaged, with the fields `accuracy`, `kv_fraction` (the plan's KV memory over the full cache's),
  `kv_measured` (what the caches held), `decode_tokens_per_s`, `correct`, `total`, `overlength`,
  `repetitive`, `seeds`, and `pareto` (on `kvrl report --frontier`'s front); a hybrid plan's strategy reads
  `rlkv+rkv:0.5`, the full cache's `full` (sparsity 0). Any other CSV: one record per line, its own
  columns. A `kvrl report --by hops` file (`by_hops*.md`): one record per (task, strategy, sparsity) with
  the fields `hops:A-B`, the accuracy (%) over the walks of A to B steps (counts recovered from the
  per-length percentages, exact below 100 problems a length).
- `task=T`: only the records of task T.
- `rows=F1,F2,...`: the first columns name the record, column i holding field Fi. A number is read as a
  number ("1,024" is 1024); a word field is the cell's first word ("full cache" is `full`, "random
  (3 seeds)" is `random`). `row:WORD=VALUE` maps a first word to a value, `row:WORD=VALUE/FIELD` also
  makes that row show FIELD (the KV memory row of a strategy x sparsity table).
- `cols=C1,C2,...`: what each other column shows, in order; one entry serves every column. `FIELD`: that
  field of the row's record. `FIELD@sparsity`: that field of the record at the sparsity the column's header
  names (`s = 0.6`); the `full` record serves every sparsity. `FIELD%`: a fraction, shown in percent.

A cell agrees when each number it shows is the field's value at the precision it is written with (99.0
for 0.98999, 44% for 0.4353; at an exact half either way). A value may be followed by the per-seed values
in seed order ("5.0 (6 / 4 / 5)"); "13 min 36 s" reads as 816 s; a Boolean field shows "yes" or
nothing. Cells without a digit ("", "not run (time)") are not checked, nor the labels of the first column.

**2. `run:`** figures one run of a benchmark printed and no committed file holds (timings, speeds, peak
memory)::

    <!-- run: `.venv/bin/python benchmarks/rlkv_memory.py` on the 2-core Intel Xeon development CPU, 2026-12-01 -->

The comment names the command in backquotes, then `on` and the machine; a `benchmarks/` or `experiments/`
script it names must exist.
"""

from __future__ import annotations

import csv
import functools
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from kvpress_rl.evaluators.cells import GRID_REQUIRED, read_grid, summarize
from kvpress_rl.evaluators.frontier import frontier_points

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "benchmarks/README.md"]

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
DURATION = re.compile(r"(\d+) min (\d+(?:\.\d+)?) s\b")
SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
RUN = re.compile(r"^run:\s*`(?P<command>[^`]+)`\s+on\s+(?P<machine>\S.*)$", re.DOTALL)


class SpecError(Exception):
    """A source comment that cannot be read, or a file it names that does not hold what it says."""


# --- tables -------------------------------------------------------------------------------------------


@dataclass
class Table:
    path: str  # relative to the repository root
    line: int  # 1-based line of the header row
    rows: list[list[str]]  # the header first, the separator left out
    lines: list[int]  # 1-based line of each row
    comment: str | None  # the text of the HTML comment that ends on the line just before the table
    comment_line: int = 0

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_results(self) -> bool:
        cells = [c for row in self.rows[1:] for c in row[1:] if c.strip()]
        numeric = [c for c in cells if re.match(r"[*~<>+-]*\s*\d", c)]
        return bool(cells) and len(numeric) > len(cells) / 2

    @property
    def kind(self) -> str | None:
        if self.comment is None:
            return None
        head = self.comment.split(":", 1)[0].strip()
        return head if head in ("source", "run") else None


def split_row(line: str) -> list[str]:
    text = line.strip()
    text = text[1:] if text.startswith("|") else text
    text = text[:-1] if text.endswith("|") and not text.endswith("\\|") else text
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", text)]


def join_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def comment_above(lines: list[str], index: int) -> tuple[str | None, int]:
    """The HTML comment that ends on line `index - 1` (0-based), and its first line (1-based)."""
    end = index - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return None, 0
    start = end
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    if start < 0:
        return None, 0
    text = "\n".join(lines[start:end + 1])
    text = text[text.index("<!--") + 4:text.rindex("-->")]
    return " ".join(text.split()), start + 1


def read_tables(path: str) -> list[Table]:
    lines = (ROOT / path).read_text().splitlines()
    tables, i, fenced = [], 0, False
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and lines[i].lstrip().startswith("|") and i + 1 < len(lines) and SEPARATOR.match(lines[i + 1]):
            comment, comment_line = comment_above(lines, i)
            rows, numbers = [split_row(lines[i])], [i + 1]
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(split_row(lines[j]))
                numbers.append(j + 1)
                j += 1
            tables.append(Table(path, i + 1, rows, numbers, comment, comment_line))
            i = j
            continue
        i += 1
    return tables


def all_tables() -> list[Table]:
    return [t for path in CHECKED for t in read_tables(path)]


# --- records --------------------------------------------------------------------------------------------


def as_value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


@functools.cache
def records(path: str) -> tuple[dict, ...]:
    """The records of one source file (see the module's docstring); a record's `_seeds` holds per-seed values."""
    file = ROOT / path
    if not file.is_file():
        raise SpecError(f"{path} does not exist (sources are committed files, named from the repository root)")
    if file.suffix == ".md":
        return tuple(hops_records(file))
    with file.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    if set(GRID_REQUIRED) <= set(header):
        return tuple(grid_records(file))
    with file.open(newline="") as handle:
        return tuple({k: as_value(v) for k, v in row.items()} for row in csv.DictReader(handle))


def grid_records(file: Path) -> list[dict]:
    """A `kvrl eval` grid through kvrl's own reader and summary (the mean over seeds) and `kvrl report --frontier`'s
    front."""
    cells = read_grid(file)
    front = {(p.task, p.family, round(p.sparsity, 6)): p.pareto for p in frontier_points(cells)}
    out = []
    for row in summarize(cells):
        key = (row["task"], row["strategy"], round(row["sparsity"], 6))
        members = sorted((c for c in cells if (c.task, c.label, round(c.sparsity, 6)) == key), key=lambda c: c.seed)
        per_seed = {
            "accuracy": [c.accuracy for c in members], "kv_fraction": [c.kv_fraction for c in members],
            "kv_measured": [c.kv_measured if c.kv_measured >= 0 else math.nan for c in members],
            "correct": [float(c.correct) for c in members],
            "decode_tokens_per_s": [c.decode_tokens_per_s for c in members],
        }
        out.append({
            "task": row["task"], "strategy": row["strategy"], "sparsity": row["sparsity"], "seeds": float(row["seeds"]),
            "accuracy": row["accuracy"], "kv_fraction": 1 - row["kv_saved"],
            "kv_measured": math.nan if row["kv_measured"] is None else row["kv_measured"],
            "decode_tokens_per_s": row["decode_tokens_per_s"], "correct": statistics.mean(per_seed["correct"]),
            "total": statistics.mean(c.total for c in members), "overlength": float(row["overlength"]),
            "repetitive": float(row["repetitive"]), "pareto": front[key],
            "_seeds": per_seed if len(members) > 1 else {},
        })
    return out


def hops_records(file: Path) -> list[dict]:
    """`kvrl report --by hops`'s table: per (task, strategy, sparsity), the accuracy (%) at each walk length."""
    text = file.read_text()
    counts_line = re.search(r"problems per column[^:]*:\s*(.+)", text)
    if not counts_line:
        raise SpecError(f"{file.relative_to(ROOT)}: no 'problems per column' line (is it a `kvrl report --by` file?)")
    counts = {int(a): int(b) for a, b in re.findall(r"(\d+):\s*(\d+)", counts_line.group(1))}
    if max(counts.values()) >= 100:
        raise SpecError(f"{file.relative_to(ROOT)}: 100 or more problems a length; rounded percentages no longer "
                        "give the counts")
    table = next(t for t in read_tables(str(file.relative_to(ROOT))))
    header = table.rows[0]
    out = []
    for row in table.rows[1:]:
        record = dict(zip(header[:3], row[:3]))
        percents = {int(h): float(v) for h, v in zip(header[3:], row[3:]) if v}
        out.append({"task": record["task"], "strategy": record["strategy"], "sparsity": float(record["sparsity"]),
                    "_hops": {h: (round(p * counts[h] / 100), counts[h]) for h, p in percents.items()}})
    return out


def field_value(record: dict, name: str, path: str):
    hops = re.fullmatch(r"hops:(\d+)-(\d+)", name)
    if hops and "_hops" in record:
        low, high = int(hops.group(1)), int(hops.group(2))
        picked = [v for h, v in record["_hops"].items() if low <= h <= high]
        return 100 * sum(c for c, _ in picked) / sum(n for _, n in picked) if picked else math.nan
    if name not in record:
        fields = ", ".join(k for k in record if not k.startswith("_"))
        raise SpecError(f"{path} has no field {name!r} (its fields: {fields})")
    return record[name]


# --- the source comment -----------------------------------------------------------------------------------


@dataclass
class Column:
    field: str
    percent: bool = False
    at_sparsity: bool = False

    @classmethod
    def parse(cls, text: str) -> Column:
        at = text.endswith("@sparsity")
        text = text.removesuffix("@sparsity")
        return cls(text.removesuffix("%"), text.endswith("%"), at)


@dataclass
class Source:
    files: list[str]
    task: str | None = None
    rows: list[str] = field(default_factory=list)
    cols: list[Column] = field(default_factory=list)
    aliases: dict[str, tuple[str, Column | None]] = field(default_factory=dict)

    @classmethod
    def parse(cls, comment: str) -> Source:
        words = comment.split(":", 1)[1].split()
        source = cls(files=[w for w in words if "=" not in w])
        for word in (w for w in words if "=" in w):
            key, value = word.split("=", 1)
            if key == "task":
                source.task = value
            elif key == "rows":
                source.rows = value.split(",")
            elif key == "cols":
                source.cols = [Column.parse(c) for c in value.split(",")]
            elif key.startswith("row:"):
                target, _, shown = value.partition("/")
                source.aliases[key[4:]] = (target, Column.parse(shown) if shown else None)
            else:
                raise SpecError(f"unknown key {key!r} (keys: task=, rows=, cols=, row:WORD=)")
        if not source.files or not source.rows or not source.cols:
            raise SpecError("a source comment needs files, rows= and cols=")
        return source


def first_word(cell: str) -> str:
    text = cell.replace("**", "").replace("`", "").strip()
    return re.split(r"[\s,;(]+", text, maxsplit=1)[0] if text else ""


def key_value(cell: str):
    text = cell.replace("**", "").replace("`", "").strip()
    number = re.match(NUMBER, text)
    if number and not text[number.end():number.end() + 1].isalpha():
        return float(number.group().replace(",", ""))
    return first_word(cell)


def matches(have, want) -> bool:
    if isinstance(want, float):
        return isinstance(have, float) and abs(have - want) < 1e-9
    return str(have).lower() == str(want).lower()


def header_sparsity(header: str) -> float:
    numbers = NUMBER.findall(header.replace("**", ""))
    if len(numbers) != 1:
        raise SpecError(f"column {header!r}: its header should name one sparsity (s = 0.6)")
    return float(numbers[0])


@dataclass
class Cell:
    line: int
    row: int  # index in table.rows
    col: int
    label: str
    header: str
    text: str
    expected: list[float] | bool | None = None  # the value, then per-seed values; a Boolean field's value
    what: str = ""  # the field and the record, for messages
    error: str | None = None


def first_file_with(source: Source, want: dict) -> tuple[str, list[dict]] | None:
    """The first of the source's files holding records that match `want`, and those records."""
    for path in source.files:
        hits = [rec for rec in records(path) if (source.task is None or rec.get("task") == source.task)
                and all(matches(rec.get(k), v) for k, v in want.items())]
        if hits:
            return path, hits
    return None


def cells_of(table: Table) -> list[Cell]:
    """Every checked cell of a `source:` table with what its files say."""
    source = Source.parse(table.comment)
    header = table.rows[0]
    n_keys = len(source.rows)
    width = len(header) - n_keys
    cols = source.cols * width if len(source.cols) == 1 else source.cols
    if len(cols) != width:
        raise SpecError(f"cols= names {len(source.cols)} columns, the table has {width} after its {n_keys} key "
                        "column(s)")
    out = []
    for r, row in enumerate(table.rows[1:], start=1):
        if len(row) != len(header):
            raise SpecError(f"line {table.lines[r]} has {len(row)} cells, the header {len(header)}")
        key = {name: key_value(row[i]) for i, name in enumerate(source.rows)}
        shown = None
        word = first_word(row[0])
        if word in source.aliases:
            target, shown = source.aliases[word]
            key[source.rows[0]] = float(target) if NUMBER.fullmatch(target) else target
        for j, column in enumerate(cols):
            cell = Cell(table.lines[r], r, n_keys + j, row[0], header[n_keys + j], row[n_keys + j])
            spec = Column(shown.field, shown.percent, column.at_sparsity) if shown else column
            want = dict(key)
            if spec.at_sparsity and str(key.get("strategy", "")).lower() != "full":
                want["sparsity"] = header_sparsity(cell.header)
            described = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in want.items())
            cell.what = f"{spec.field}{' in %' if spec.percent else ''} of {described}"
            has_digit = bool(re.search(r"\d", cell.text))
            found = first_file_with(source, want)
            if found is None:
                if has_digit:
                    cell.error = f"no record with {described} in {', '.join(source.files)}"
                    out.append(cell)
                continue
            path, hits = found
            values = {repr(field_value(h, spec.field, path)) for h in hits}
            if len(values) > 1:
                cell.error = (f"{len(hits)} records of {path} match {described}, with different {spec.field}: "
                              "give more rows= fields")
                out.append(cell)
                continue
            value = field_value(hits[0], spec.field, path)
            cell.what += f" in {path}"
            if isinstance(value, bool):
                cell.expected = value
            elif isinstance(value, float):
                scale = 100.0 if spec.percent else 1.0
                per_seed = hits[0].get("_seeds", {}).get(spec.field, []) if len(hits) == 1 else []
                cell.expected = [scale * value, *(scale * v for v in per_seed)]
                if not has_digit:
                    continue
            else:
                cell.error = f"{spec.field} of {described} in {path} is {value!r}, not a number"
            out.append(cell)
    return out


def shown_numbers(text: str) -> list[tuple[str, float]]:
    """The numbers a cell shows, as written and as values; "13 min 36 s" is one number, 816."""
    text = text.replace("**", "")
    text = DURATION.sub(lambda m: f"{int(m.group(1)) * 60 + float(m.group(2)):g}", text)
    return [(n, float(n.replace(",", ""))) for n in NUMBER.findall(text)]


def agrees(written: str, value: float) -> bool:
    if math.isnan(value):
        return False
    decimals = len(written.split(".")[1]) if "." in written else 0
    return abs(float(written.replace(",", "")) - value) <= 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(value))


def at_precision(written: str, value: float) -> str:
    decimals = len(written.split(".")[1]) if "." in written else 0
    return "nan" if math.isnan(value) else f"{value:.{decimals}f}"


def mismatch(cell: Cell) -> str | None:
    """Why a cell disagrees with its files, or None."""
    if cell.error:
        return cell.error
    if isinstance(cell.expected, bool):
        shown = cell.text.replace("*", "").strip().lower()
        want = "yes" if cell.expected else ""
        return None if shown == want else f"shows {cell.text!r}, expected {want!r} ({cell.what})"
    numbers = shown_numbers(cell.text)
    value, *seeds = cell.expected
    candidates = [[value], [value, *seeds]] if seeds else [[value]]
    for want in candidates:
        if len(numbers) == len(want) and all(agrees(w, v) for (w, _), v in zip(numbers, want)):
            return None
    want = next((c for c in candidates if len(c) == len(numbers)), candidates[-1])
    if len(numbers) == len(want):
        expected = " / ".join(at_precision(w, v) for (w, _), v in zip(numbers, want))
    else:
        expected = " / ".join(f"{v:.4g}" for v in want)
    seeds_note = " (the mean, then each seed)" if len(want) > 1 else ""
    return f"shows {cell.text!r}, expected {expected}{seeds_note}: {cell.what}"


def problems(table: Table) -> list[str]:
    """What is wrong with a table, one message each; [] when it is right."""
    if table.kind is None:
        if table.is_results:
            return [f"{table.where}: a results table without a source: put "
                    "`<!-- source: FILE.csv rows=... cols=... -->` (numbers from a committed file) or "
                    "`<!-- run: `COMMAND` on MACHINE -->` (figures of one run) on the line just before it "
                    "(see tests/results_tables.py)"]
        return []
    if table.kind == "run":
        run = RUN.match(table.comment)
        if not run:
            return [f"{table.path}:{table.comment_line}: a run comment names the command in backquotes, then `on` "
                    "and the machine: `<!-- run: `bash benchmarks/x.sh` on the 2-core development CPU -->`; "
                    f"found {table.comment!r}"]
        named = re.findall(r"(?:benchmarks|experiments)/[\w./-]+\.(?:py|sh)", run.group("command"))
        missing = [p for p in named if not (ROOT / p).is_file()]
        return [f"{table.path}:{table.comment_line}: the run comment names {p}, which does not exist" for p in missing]
    try:
        cells = cells_of(table)
    except SpecError as err:
        return [f"{table.path}:{table.comment_line}: source comment: {err}"]
    out = []
    for cell in cells:
        why = mismatch(cell)
        if why:
            out.append(f"{table.path}:{cell.line}: row {cell.label!r}, column {cell.header!r}: {why}")
    return out
