"""Head patterns as shared artifacts: the folder `kvrl export` writes (scores, config.json, model card, plots)."""

import json
import os
import re

import pytest
import torch
import yaml

import kvpress_rl
from kvpress_rl import HeadScores, KvrlError
from kvpress_rl.evaluators import artifacts
from kvpress_rl.evaluators.artifacts import (
    SPARSITIES,
    clean_stale_folders,
    export_pattern,
    write_folder_atomic,
    write_pattern,
)
from kvpress_rl.plan import plan_from_scores

QWEN = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def plan_table(card: str) -> dict[str, list[str]]:
    """The rows of the card's plan table, by their first cell."""
    section = card.split("## Plans and KV memory", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def trained_scores(tmp_path, steps=3):
    scores = HeadScores(torch.linspace(0, 1, 12).reshape(6, 2), model_id="org/model", strategy="rlkv",
                        strategy_version="3", options={"lr": 0.01}, data="gsm8k", seed=1, wall_time_s=4000.0)
    path = scores.save(tmp_path / "heads-rlkv.safetensors")
    (tmp_path / "heads-rlkv.run").mkdir()
    (tmp_path / "heads-rlkv.run" / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": i, "mean_reward": 0.2 * i, "mean_alpha": 1 - 0.1 * i}) + "\n"
                for i in range(1, steps + 1)))
    return scores, path


def test_published_rlkv_pattern_exports_to_a_valid_card(head_patterns, tmp_path):
    tsv = head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv"
    out, scores = export_pattern(str(tsv), tmp_path / "qwen7b-rlkv", model_id=QWEN)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "gates.png", "head_scores.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen7b-rlkv"]  # no temporary left
    card = (out / "README.md").read_text()
    assert front_matter(card) == {"library_name": "kvpress-rl", "tags": ["kv-cache", "head-pattern", "file"],
                                  "base_model": QWEN}
    assert "# Head pattern: rlkv.tsv (file) for deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in card
    assert "28 layers x 4 KV heads = 112 KV heads" in card
    assert "Imported from a published TSV pattern (`rlkv.tsv`)" in card
    assert "No training log was found" in card and "training.png" not in card
    assert "| seed | not recorded |" in card and "| wall time | not recorded |" in card
    assert "8192 tokens" in card and "head dim 128 (`--head-dim`" in card
    # the plan table: the official rule at each sparsity, the memory share of the full cache at 8192 tokens, head dim
    # 128
    table = plan_table(card)
    assert list(table) == ["0 (full cache)", *(f"{s:g}" for s in SPARSITIES)]
    assert table["0 (full cache)"] == ["0 / 112", "112", "448.0", "100.0%"]
    assert table["0.5"] == ["56 / 112", "56", "226.2", "50.5%"]  # 56 full x 8192 + 56 x 80 tokens of 112 x 8192
    for s in SPARSITIES:
        plan = plan_from_scores(HeadScores.load(tsv), s)
        share = plan.kv_bytes(8192, head_dim=128) / plan.full_kv_bytes(8192, head_dim=128)
        assert table[f"{s:g}"] == [f"{plan.num_compressed} / 112", str(112 - plan.num_compressed),
                                   f"{plan.kv_bytes(8192, head_dim=128) / 2**20:.1f}", f"{100 * share:.1f}%"]
    # the folder loads back exactly, with the model id set at export
    loaded = HeadScores.load(out)
    assert torch.equal(loaded.scores, HeadScores.load(tsv).scores) and torch.equal(loaded.scores, scores.scores)
    assert loaded.model_id == QWEN and loaded.strategy == "file"
    config = json.loads((out / "config.json").read_text())
    assert config["model_id"] == QWEN and (config["layers"],
                                           config["kv_heads"]) == (28, 4) and config["strategy"] == "file"
    assert config["source"] == str(tsv) and config["kvpress_rl_version"] == kvpress_rl.__version__
    assert config["seed"] is None and config["wall_time_s"] is None and config["files"]["training_curve"] is None
    assert config["card"] == {"seq_len": 8192, "head_dim": 128, "dtype": "bfloat16", "sparsities": list(SPARSITIES)}
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["rlkv.tsv", "duo_attention.tsv"])
@pytest.mark.parametrize("model", ["Llama-3.1-8B-R1", "Qwen-3-4B-Thinking"])
def test_every_published_pattern_round_trips(head_patterns, tmp_path, model, name):
    out, _ = export_pattern(str(head_patterns / model / name), tmp_path / "out", model_id="org/model")
    assert torch.equal(HeadScores.load(out).scores, HeadScores.load(head_patterns / model / name).scores)


def test_seq_len_and_head_dim_set_the_memory_table(tmp_path):
    scores = HeadScores(torch.linspace(0, 1, 8).reshape(2, 4), model_id="org/m", strategy="random")
    out = write_pattern(scores, tmp_path / "p", source="x", seq_len=1000, head_dim=64)
    card = (out / "README.md").read_text()
    assert "one sequence of 1000 tokens" in card and "head dim 64" in card
    plan = plan_from_scores(scores, 0.5)
    assert plan_table(card)["0.5"][2] == f"{plan.kv_bytes(1000, head_dim=64) / 2**20:.1f}"
    assert "--seq-len 1000 --head-dim 64" in card


def test_a_training_log_beside_the_scores_gives_the_curve(tmp_path):
    scores, path = trained_scores(tmp_path)
    out, _ = export_pattern(str(path), tmp_path / "out")
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "![training curve](training.png)" in card and "3 logged steps (last step 3)" in card
    assert "mean reward 0.200 -> 0.600" in card and "mean gate (alpha) 0.900 -> 0.700" in card
    assert "| strategy | `rlkv`, version `3` |" in card and '| options | `{"lr": 0.01}` |' in card
    assert "| data | `gsm8k` |" in card and "| seed | 1 |" in card and "| wall time | 1 h 6 min (4000 s) |" in card
    assert front_matter(card)["tags"] == ["kv-cache", "head-pattern",
                                          "rlkv"] and front_matter(card)["base_model"] == "org/model"
    assert json.loads((out / "config.json").read_text())["files"]["training_curve"] == "training.png"
    assert HeadScores.load(out).provenance() == scores.provenance()


def test_a_damaged_training_log_is_one_line_and_nothing_is_written(tmp_path):
    _, path = trained_scores(tmp_path)
    with (tmp_path / "heads-rlkv.run" / "train_log.jsonl").open("a") as log:
        log.write('{"step": 4, "mean_rew')
    with pytest.raises(KvrlError, match=r"train_log.jsonl line 4 is not a training-log record"):
        export_pattern(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_ids_that_are_not_hub_ids_get_no_base_model(tmp_path):
    for model in ("embedded", "random:llama", "/models/local"):
        out = write_pattern(HeadScores(torch.rand(2, 2), model_id=model, strategy="odd name"), tmp_path / "p",
                            source="s", overwrite=True)
        meta = front_matter((out / "README.md").read_text())
        assert "base_model" not in meta and meta["tags"] == ["kv-cache", "head-pattern", "odd name"]


def test_an_existing_folder_is_refused_unless_overwrite(tmp_path):
    scores = HeadScores(torch.rand(2, 2), strategy="random")
    out = write_pattern(scores, tmp_path / "p", source="a")
    with pytest.raises(KvrlError, match="p exists; pass --overwrite to replace it"):
        write_pattern(HeadScores(torch.zeros(2, 2)), out, source="b")
    assert torch.equal(HeadScores.load(out).scores, scores.scores)
    write_pattern(HeadScores(torch.zeros(2, 2)), out, source="b", overwrite=True)
    assert torch.equal(HeadScores.load(out).scores, torch.zeros(2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(KvrlError, match="mine is not a head-pattern folder"):
        write_pattern(HeadScores(torch.rand(2, 2)), tmp_path / "mine", source="s", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(KvrlError, match="file is a file; --output names the folder to write"):
        write_pattern(HeadScores(torch.rand(2, 2)), tmp_path / "file", source="s", overwrite=True)
    with pytest.raises(KvrlError, match="is a file, not a folder"):
        write_pattern(HeadScores(torch.rand(2, 2)), tmp_path / "file" / "p", source="s")


def test_a_failed_write_leaves_nothing_and_keeps_the_earlier_folder(tmp_path, monkeypatch):
    earlier = HeadScores(torch.rand(2, 2))
    out = write_pattern(earlier, tmp_path / "p", source="a")

    def broken(scores, path, title=None):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(artifacts, "gate_heatmap", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_pattern(HeadScores(torch.zeros(2, 2)), out, source="b", overwrite=True)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_pattern(HeadScores(torch.zeros(2, 2)), tmp_path / "q", source="b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert torch.equal(HeadScores.load(out).scores, earlier.scores)


def test_bad_sizes_are_refused_before_anything_is_written(tmp_path):
    for options in ({"seq_len": 0}, {"head_dim": -1}, {"seq_len": 1.5}):
        with pytest.raises(KvrlError, match="must be a positive whole number"):
            write_pattern(HeadScores(torch.rand(2, 2)), tmp_path / "p", source="s", **options)
    assert not list(tmp_path.iterdir())


def test_folders_of_killed_writers_are_removed(tmp_path):
    dead = 4_999_999  # above the largest pid Linux gives (2**22)
    stale = tmp_path / f".p.{dead}-0123abcd.tmp"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    mine = tmp_path / f".p.{os.getpid()}-0123abcd.tmp"  # a live writer's: kept
    mine.mkdir()
    aside = tmp_path / f".p.{dead}-4567abcd.old"  # an earlier folder moved aside; p is absent: it may be the only copy
    aside.mkdir()
    write_folder_atomic(tmp_path / "p", lambda folder: (folder / "x").write_text("1"))
    assert not stale.exists() and mine.is_dir() and aside.is_dir()
    assert clean_stale_folders(tmp_path / "p") == [aside]  # p exists again: the folder moved aside goes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p", mine.name])
