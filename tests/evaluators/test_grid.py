import json

import pytest
import torch

from kvpress_rl import HeadScores, KvrlError
from kvpress_rl.evaluators.grid import (
    Cell,
    GridSpec,
    check_training_strategies,
    grid_cells,
    parse_heads,
    read_grid,
    sample_context,
    summarize,
    write_grid,
)
from kvpress_rl.evaluators.plots import gate_heatmap, gate_heatmaps, training_curves
from kvpress_rl.plugins import discover_strategies


def cell(strategy, sparsity, seed, accuracy):
    return Cell("embedded", strategy, sparsity, seed, accuracy, int(accuracy * 10), 10, 1 - sparsity / 2, 50.0)


def test_grid_file_round_trip(tmp_path):
    cells = [cell("full", 0.0, 0, 1.0), cell("random", 0.5, 1, 0.6)]
    write_grid(tmp_path / "grid.csv", cells)
    assert read_grid(tmp_path / "grid.csv") == cells


def test_summary_averages_seeds_and_compares_with_full():
    rows = summarize([cell("full", 0.0, 0, 0.9), cell("random", 0.6, 0, 0.5), cell("random", 0.6, 1, 0.7), cell("rlkv", 0.6, 0, 0.9)])
    by_name = {(r["strategy"], r["sparsity"]): r for r in rows}
    assert rows[0]["strategy"] == "full"
    assert by_name[("random", 0.6)]["accuracy"] == pytest.approx(0.6) and by_name[("random", 0.6)]["seeds"] == 2
    assert by_name[("random", 0.6)]["change"] == pytest.approx(-0.3)
    assert by_name[("rlkv", 0.6)]["kv_saved"] == pytest.approx(0.3)


def test_grid_rows_keep_their_definition(tmp_path):
    made = cell("random", 0.5, 0, 0.5)
    made.definition = '{"limit": 4, "model": "embedded, with a comma"}'
    write_grid(tmp_path / "grid.csv", [made])
    assert read_grid(tmp_path / "grid.csv") == [made]


def test_old_grid_files_without_classification_columns_still_read(tmp_path):
    (tmp_path / "grid.csv").write_text("task,strategy,sparsity,seed,accuracy,correct,total,kv_fraction,decode_tokens_per_s\n"
                                       "embedded,full,0.0,0,1.0,10,10,1.0,50.0\n")
    (only,) = read_grid(tmp_path / "grid.csv")
    assert only.accuracy == 1.0 and only.overlength == 0 and only.repetition_stops == 0


def test_sample_context_reads_both_argument_layouts():
    assert sample_context({"arguments": [["prompt", {"until": []}]]}) == "prompt"
    assert sample_context({"arguments": {"gen_args_0": {"arg_0": "prompt", "arg_1": {}}}}) == "prompt"


def chosen(*names):
    found = discover_strategies()
    return [(name, found[name]) for name in names]


def test_heads_option_forms():
    assert parse_heads("h.safetensors", chosen("rlkv", "random", "snapkv")) == {"rlkv": "h.safetensors"}
    assert parse_heads("rlkv=a,duo=b", chosen("rlkv", "duo")) == {"rlkv": "a", "duo": "b"}
    with pytest.raises(KvrlError, match="exactly one head strategy"):
        parse_heads("h.safetensors", chosen("rlkv", "duo"))
    with pytest.raises(KvrlError, match="does not list"):
        parse_heads("duo=b", chosen("rlkv"))


def test_a_training_strategy_needs_its_scores_from_select():
    check_training_strategies(chosen("retrieval", "random", "snapkv"), {})  # these score without training
    check_training_strategies(chosen("rlkv"), {"rlkv": "heads.safetensors"})
    for name in ("rlkv", "duo"):
        with pytest.raises(KvrlError, match=f"kvrl select --strategy {name} --output heads-{name}.safetensors"):
            check_training_strategies(chosen("random", name), {})


def test_the_grid_draws_every_seed_only_for_seeded_strategies():
    spec = GridSpec(chosen("random", "retrieval", "streaming"), [0.5], [0, 1, 2])
    cells = [(name, seed) for name, _, seed, _, _ in grid_cells(spec)]
    assert cells == [("full", 0), ("random", 0), ("random", 1), ("random", 2), ("retrieval", 0), ("streaming", 0)]


def test_full_head_budgets_are_an_axis_of_head_strategies_only():
    spec = GridSpec(chosen("retrieval", "snapkv"), [0.6, 0.8], [0], full_policy="rkv", full_budgets=["all", "0.5"])
    cells = [(name, sparsity, full_heads) for name, sparsity, _, _, full_heads in grid_cells(spec)]
    assert cells == [("full", 0.0, ""), ("retrieval", 0.6, ""), ("retrieval", 0.8, ""), ("retrieval", 0.6, "rkv:0.5"),
                     ("retrieval", 0.8, "rkv:0.5"), ("snapkv", 0.6, ""), ("snapkv", 0.8, "")]
    hybrid = Cell("embedded", "retrieval", 0.6, 0, 0.9, 9, 10, 0.3, 50.0, full_heads="rkv:0.5", kv_measured=0.25)
    assert hybrid.label == "retrieval+rkv:0.5" and hybrid.key[-1] == "rkv:0.5"
    rows = summarize([cell("full", 0.0, 0, 1.0), hybrid])
    assert [(r["strategy"], r["kv_measured"]) for r in rows] == [("full", None), ("retrieval+rkv:0.5", 0.25)]


def test_plots_are_written(tmp_path):
    heatmap = gate_heatmap(HeadScores(torch.rand(6, 3), strategy="rlkv"), tmp_path / "gates.png")
    panels = [(f"seed {i}", HeadScores(torch.rand(6, 3), strategy="rlkv")) for i in range(3)]
    side_by_side = gate_heatmaps(panels, tmp_path / "seeds.png", kept_at=0.8)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "mean_reward": 0.9, "mean_alpha": 1 - i / 10}) + "\n" for i in range(1, 6)))
    curves = training_curves(log, tmp_path / "curves.png")
    for path in (heatmap, side_by_side, curves):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
