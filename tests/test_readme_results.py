"""Every number in a results table of the README and the docs comes from a committed file.

The convention (`<!-- source: ... -->` and `<!-- run: ... -->` comments above the tables) and its reader are in
`tests/results_tables.py`; `tests/results_refresh.py` rewrites the numbers after a source file is re-measured
(`python -m tests.test_readme_results update`, `render`, `check` run it too).
"""

from __future__ import annotations

import re
import sys

import pytest

from tests import results_tables
from tests.results_refresh import main, rewrite
from tests.results_tables import CHECKED, ROOT, Table, all_tables, cells_of, problems, records

CHECKED_TABLES = [t for t in all_tables() if t.is_results or t.kind]


@pytest.mark.parametrize("table", CHECKED_TABLES, ids=[t.where for t in CHECKED_TABLES])
def test_results_table_matches_its_source(table):
    found = problems(table)
    assert not found, "\n".join(found)


def test_every_source_comment_sits_on_a_table():
    """A `source:` or `run:` comment with text between it and its table checks nothing: refused."""
    attached = {(t.path, t.comment_line) for t in all_tables() if t.kind}
    loose = []
    for path in CHECKED:
        for number, line in enumerate((ROOT / path).read_text().splitlines(), start=1):
            if re.match(r"\s*<!--\s*(source|run):", line) and (path, number) not in attached:
                loose.append(f"{path}:{number}: {line.strip()[:80]}")
    assert not loose, "comments that do not end on the line just before a table:\n" + "\n".join(loose)


def test_the_convention_reads_a_grid_and_catches_a_wrong_number(tmp_path, monkeypatch):
    """The checker itself, on a small grid: the mean over seeds, per-seed values, the full row, percent, precision."""
    grid = tmp_path / "grid.csv"
    header = "task,strategy,sparsity,seed,accuracy,correct,total,kv_fraction,decode_tokens_per_s"
    rows = ["t,full,0.0,0,0.99,99,100,1.0,10", "t,rlkv,0.6,0,0.975,39,40,0.5764,10",
            "t,random,0.6,0,0.06,6,100,0.58,10", "t,random,0.6,1,0.04,4,100,0.57,10",
            "t,random,0.6,2,0.05,5,100,0.56,10"]
    grid.write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.setattr(results_tables, "ROOT", tmp_path)
    records.cache_clear()
    try:
        comment = "source: grid.csv rows=strategy cols=accuracy%@sparsity row:KV=rlkv/kv_fraction%"
        good = [["strategy", "s = 0.6"], ["full cache", "99.0"], ["rlkv", "**97.5**"],
                ["random, 3 seeds", "5.0 (6 / 4 / 5)"], ["KV memory", "58%"]]
        assert problems(Table("x.md", 1, good, [1, 3, 4, 5, 6], comment)) == []
        bad = [["strategy", "s = 0.6"], ["rlkv", "97.4"], ["random", "5.0 (6 / 5 / 5)"], ["duo", "50"]]
        found = problems(Table("x.md", 1, bad, [1, 3, 4, 5], comment))
        assert len(found) == 3
        assert "x.md:3: row 'rlkv', column 's = 0.6': shows '97.4', expected 97.5" in found[0]
        assert "expected 5.0 / 6 / 4 / 5" in found[1] and "no record with strategy=duo, sparsity=0.6" in found[2]
        fixed = [rewrite(c) for c in cells_of(Table("x.md", 1, bad[:3], [1, 3, 4], comment))]
        assert fixed == ["97.5", "5.0 (6 / 4 / 5)"]
        unsourced = problems(Table("x.md", 1, [["a", "b"], ["x", "1"]], [1, 3], None))
        assert unsourced[0].startswith("x.md:1: a results table without a source")
    finally:
        records.cache_clear()


if __name__ == "__main__":  # the command docs/results.md names; the tool is tests/results_refresh.py
    sys.exit(main(sys.argv[1:]))
