"""`kvrl report DIR --by FIELD`: accuracy by a field of the problems, the seeds of a strategy pooled, a missing
field or samples file named."""

import json

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.breakdown import accuracy_by, write_breakdown
from kvpress_rl.evaluators.cells import Cell, cell_samples, write_grid


def cell(strategy, sparsity, seed, accuracy):
    return Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=seed, accuracy=accuracy,
                correct=round(accuracy * 30), total=30, kv_fraction=1 - sparsity / 2, decode_tokens_per_s=50.0)


def test_accuracy_by_a_document_field_pools_seeds_and_names_what_is_missing(tmp_path):
    cells = [cell("full", 0.0, 0, 0.75), cell("random", 0.6, 0, 0.25), cell("random", 0.6, 1, 0.5)]
    write_grid(tmp_path / "grid.csv", cells)
    solved = {("full", 0): [1, 1, 1, 0], ("random", 0): [1, 0, 0, 0], ("random", 1): [1, 1, 0, 0]}
    hops = [5, 5, 12, 12]
    for c in cells:
        path = cell_samples(tmp_path, c)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"doc_id": i, "doc": {"hops": h}, "acc": float(ok)}) + "\n"
                                for i, (h, ok) in enumerate(zip(hops, solved[(c.strategy, c.seed)]))))
    table = accuracy_by(tmp_path, "hops")
    assert table[("embedded", "full", 0.0)] == {5: (2, 2), 12: (1, 2)}
    assert table[("embedded", "random", 0.6)] == {5: (3, 4), 12: (0, 4)}  # two seeds pooled
    png, markdown = write_breakdown(tmp_path, "hops")
    assert png.stat().st_size > 0 and "| embedded | random | 0.6 | 75 | 0 |" in markdown.read_text()
    with pytest.raises(KvrlError, match="no field 'links'.*its fields: hops"):
        accuracy_by(tmp_path, "links")
    cell_samples(tmp_path, cells[1]).unlink()
    with pytest.raises(KvrlError, match="samples of cell random at 0.6 \\(seed 0\\) are missing"):
        accuracy_by(tmp_path, "hops")
