"""A grid's cells and `grid.csv`: written and read back unchanged, old files read, damaged ones refused in one line,
and summarised per strategy and sparsity."""

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.cells import Cell, read_grid, summarize, write_grid

HEADER = "task,strategy,sparsity,seed,accuracy,correct,total,kv_fraction,decode_tokens_per_s\n"


def cell(strategy, sparsity, seed, accuracy):
    return Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=seed, accuracy=accuracy,
                correct=int(accuracy * 10), total=10, kv_fraction=1 - sparsity / 2, decode_tokens_per_s=50.0)


def test_grid_file_round_trip(tmp_path):
    cells = [cell("full", 0.0, 0, 1.0), cell("random", 0.5, 1, 0.6)]
    write_grid(tmp_path / "grid.csv", cells)
    assert read_grid(tmp_path / "grid.csv") == cells


def test_summary_averages_seeds_and_compares_with_full():
    rows = summarize([cell("full", 0.0, 0, 0.9), cell("random", 0.6, 0, 0.5), cell("random", 0.6, 1, 0.7),
                      cell("rlkv", 0.6, 0, 0.9)])
    by_name = {(r["strategy"], r["sparsity"]): r for r in rows}
    assert rows[0]["strategy"] == "full"
    assert by_name[("random", 0.6)]["accuracy"] == pytest.approx(0.6) and by_name[("random", 0.6)]["seeds"] == 2
    assert by_name[("random", 0.6)]["change"] == pytest.approx(-0.3)
    assert by_name[("rlkv", 0.6)]["kv_saved"] == pytest.approx(0.3)


def test_a_hybrid_cell_is_named_and_summarised_with_its_full_heads():
    hybrid = Cell(task="embedded", strategy="retrieval", sparsity=0.6, seed=0, accuracy=0.9, correct=9, total=10,
                  kv_fraction=0.3, decode_tokens_per_s=50.0, full_heads="rkv:0.5", kv_measured=0.25)
    assert hybrid.label == "retrieval+rkv:0.5" and hybrid.key.full_heads == "rkv:0.5"
    rows = summarize([cell("full", 0.0, 0, 1.0), hybrid])
    assert [(r["strategy"], r["kv_measured"]) for r in rows] == [("full", None), ("retrieval+rkv:0.5", 0.25)]


def test_grid_rows_keep_their_definition(tmp_path):
    made = cell("random", 0.5, 0, 0.5)
    made.definition = '{"limit": 4, "model": "embedded, with a comma"}'
    write_grid(tmp_path / "grid.csv", [made])
    assert read_grid(tmp_path / "grid.csv") == [made]


def test_old_grid_files_without_classification_columns_still_read(tmp_path):
    (tmp_path / "grid.csv").write_text(HEADER + "embedded,full,0.0,0,1.0,10,10,1.0,50.0\n")
    (only,) = read_grid(tmp_path / "grid.csv")
    assert only.accuracy == 1.0 and only.overlength == 0 and only.repetition_stops == 0



@pytest.mark.parametrize("text, why", [
    (HEADER + "embedded,full,0.0,0,1.0,10", "line 2 has"),
    (HEADER + "embedded,full,zero,0,1.0,10,10,1.0,5\n", "line 2"),
    ("task,strat", "header misses"),
    ("", "empty"),
    ("\x00\xff\xfe garbage", "damaged"),
])
def test_a_damaged_grid_is_one_line(tmp_path, text, why):
    (tmp_path / "grid.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(KvrlError, match=why) as refused:
        read_grid(tmp_path / "grid.csv")
    assert "\n" not in str(refused.value) and "will not overwrite" in str(refused.value)
