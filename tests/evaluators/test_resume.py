"""Nothing stale, nothing lost: the grid resumes only cells made with today's settings."""

import pytest
import torch

from kvpress_rl import HeadScores, KvrlError
from kvpress_rl.evaluators.cells import read_grid
from kvpress_rl.evaluators.grid_spec import GridSpec
from kvpress_rl.evaluators.resume import plan_resume
from kvpress_rl.evaluators.strategy_scores import selection_key
from kvpress_rl.plugins import discover_strategies
from tests.helpers import finish_grid


@pytest.fixture(scope="module")
def entries():
    return discover_strategies()


def grid_spec(entries, **changes):
    settings = dict(strategies=[("random", entries["random"]), ("streaming", entries["streaming"])],
                    sparsities=[0.2, 0.4], seeds=[0], limit=4, tasks=["embedded"], model="embedded")
    settings.update(changes)
    return GridSpec(**settings)


@pytest.mark.parametrize("change, named, redone", [
    (dict(limit=2, max_new_tokens=8), "--limit 4 -> 2", 5),  # full + 2 strategies x 2 sparsities
    (dict(model="/models/other"), "--model embedded -> /models/other", 5),
    (dict(dtype="bfloat16"), "--dtype float32 -> bfloat16", 5),
    (dict(compressed_policy="snapkv"), "--compressed-policy streaming -> snapkv", 2),  # head strategies only (random)
    (dict(plan_rule="round"), "--plan-rule official -> round", 2),
    (dict(decoding_simulation=50), "--decoding-simulation None -> 50", 4),  # every cell under a plan
])
def test_cells_made_with_other_settings_are_not_resumed(entries, tmp_path, change, named, redone):
    finish_grid(grid_spec(entries), tmp_path)
    assert plan_resume(grid_spec(entries), tmp_path)[1] == []  # same settings: nothing to run
    with pytest.raises(KvrlError, match="--recompute") as refused:
        plan_resume(grid_spec(entries, **change), tmp_path)
    assert named in str(refused.value) and "\n" not in str(refused.value)
    kept, todo = plan_resume(grid_spec(entries, **change), tmp_path, recompute=True)
    assert len(kept) == 5 - redone and len(todo) == redone


def test_a_changed_heads_file_or_package_version_is_not_resumed(entries, tmp_path, monkeypatch):
    heads = tmp_path / "heads.safetensors"
    HeadScores(torch.rand(30, 3), strategy="rlkv").save(heads)
    spec = grid_spec(entries, strategies=[("rlkv", entries["rlkv"])], heads={"rlkv": str(heads)})
    out = tmp_path / "out"
    finish_grid(spec, out)
    HeadScores(torch.rand(30, 3), strategy="rlkv").save(heads, overwrite=True)  # same name, new content
    with pytest.raises(KvrlError, match="--heads file:"):
        plan_resume(spec, out)
    import kvpress_rl

    monkeypatch.setattr(kvpress_rl, "__version__", "9.9")
    with pytest.raises(KvrlError, match="kvrl version"):
        plan_resume(grid_spec(entries), out)


def test_cells_of_other_strategies_are_checked_against_the_run_settings(entries, tmp_path):
    finish_grid(grid_spec(entries), tmp_path)
    # a later run of another strategy only: the random rows stay when the task settings match, else refused
    streaming_only = [("streaming", entries["streaming"])]
    assert len(plan_resume(grid_spec(entries, strategies=streaming_only), tmp_path)[0]) == 5
    with pytest.raises(KvrlError, match="--max-tokens None -> 8.*and 4 more"):  # full and streaming, and 2 random rows
        plan_resume(grid_spec(entries, strategies=streaming_only, max_new_tokens=8), tmp_path)
    kept, todo = plan_resume(grid_spec(entries, strategies=streaming_only, max_new_tokens=8), tmp_path, recompute=True)
    assert kept == [] and len(todo) == 3  # the stale random rows are dropped, not mixed into the new table


def test_selected_heads_are_cached_per_model(entries):
    one = selection_key(grid_spec(entries), "random", entries["random"], 0)
    assert one == selection_key(grid_spec(entries), "random", entries["random"], 0)
    assert one != selection_key(grid_spec(entries, model="/models/same-shape"), "random", entries["random"], 0)
    assert one != selection_key(grid_spec(entries), "random", entries["random"], 1)


def test_old_rows_without_a_definition_are_refused(entries, tmp_path):
    (tmp_path / "grid.csv").write_text("task,strategy,sparsity,seed,accuracy,correct,total,kv_fraction,"
                                       "decode_tokens_per_s\nembedded,full,0.0,0,1.0,10,10,1.0,50.0\n")
    with pytest.raises(KvrlError, match="older kvrl that did not record its settings.*--recompute"):
        plan_resume(grid_spec(entries), tmp_path)
    assert len(read_grid(tmp_path / "grid.csv")) == 1  # still readable (kvrl report)
