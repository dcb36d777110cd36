import json

import pytest
import torch

from kvpress_rl import HeadScores, KvrlError, ModelShape


def make_scores(**extra):
    return HeadScores(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 12, model_id="m", strategy="random",
                      strategy_version="1", options={"a": 1}, data="d", seed=7, wall_time_s=0.5, extra=extra)


def test_safetensors_round_trip_keeps_scores_and_provenance(tmp_path):
    scores = make_scores(reward_curve=[0.1, 0.2])
    path = scores.save(tmp_path / "s.safetensors")
    loaded = HeadScores.load(path)
    assert torch.equal(loaded.scores, scores.scores)
    assert loaded.provenance() == json.loads(json.dumps(scores.provenance()))


def test_tsv_round_trip(tmp_path):
    scores = make_scores()
    loaded = HeadScores.load(scores.to_tsv(tmp_path / "s.tsv"))
    assert torch.equal(loaded.scores, scores.scores)


@pytest.mark.parametrize("model,shape", [("Llama-3.1-8B-R1", (32, 8)), ("Qwen-2.5-7B-R1", (28, 4)), ("Qwen-3-4B-Thinking", (36, 8))])
@pytest.mark.parametrize("name", ["rlkv.tsv", "duo_attention.tsv"])
def test_published_patterns_load_as_they_are(head_patterns, model, shape, name):
    assert HeadScores.load(head_patterns / model / name).shape == shape


def test_shape_check_refuses_another_model():
    with pytest.raises(KvrlError, match="3 layers x 4 KV heads.*28 x 4"):
        make_scores().check_shape(ModelShape(28, 4, 28, 128))


def test_missing_and_corrupted_files_are_clear_errors(tmp_path):
    with pytest.raises(KvrlError, match="not found"):
        HeadScores.load(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(KvrlError, match="not a readable head-scores file"):
        HeadScores.load(bad)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(KvrlError, match="same number of columns"):
        HeadScores.load(ragged)
    words = tmp_path / "words.tsv"
    words.write_text("a\tb\n")
    with pytest.raises(KvrlError, match="not a TSV of numbers"):
        HeadScores.load(words)


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path):
    path = make_scores().save(tmp_path / "s.safetensors")
    before = path.read_bytes()
    with pytest.raises(KvrlError, match="exists"):
        HeadScores(torch.zeros(3, 4)).save(path)
    assert path.read_bytes() == before
    HeadScores(torch.zeros(3, 4)).save(path, overwrite=True)
    assert torch.equal(HeadScores.load(path).scores, torch.zeros(3, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_rejects_non_matrix_and_non_finite_scores():
    with pytest.raises(KvrlError):
        HeadScores(torch.zeros(4))
    with pytest.raises(KvrlError):
        HeadScores(torch.tensor([[float("nan")]]))
