"""`kvrl select --num-processes N`: the same select under `accelerate launch`, on the embedded model and CPU processes."""

import pytest
import torch

from kvpress_rl import HeadScores
from tests.helpers import only_error_line, run_kvrl

pytestmark = pytest.mark.slow

TINY = ("--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "64", "--no-self-distillation")




def test_rlkv_select_on_two_processes_writes_one_file(tmp_path):
    result = run_kvrl("select", "--strategy", "rlkv", "--num-processes", "2", *TINY, "--output", "heads.safetensors", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote heads.safetensors") == 1  # rank 0 alone reports
    assert "2 processes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.run", "heads.safetensors"]
    assert not list((tmp_path / "heads.run").glob("rank*"))
    scores = HeadScores.load(tmp_path / "heads.safetensors")
    assert scores.shape == (30, 3) and scores.strategy == "rlkv"
    # the gates of the checkpoint (rank 0's, every process having taken the same all-reduced step) are the file's, and moved
    checkpoint = torch.load(tmp_path / "heads.run" / "checkpoint.pt", weights_only=False)
    assert len(checkpoint["rng"]) == 2  # both processes took part (their sampling states are gathered)
    assert torch.equal(scores.scores, checkpoint["gates"].float())
    assert (scores.scores < 1.0).any()
    assert len((tmp_path / "heads.run" / "train_log.jsonl").read_text().splitlines()) == 1  # one step, logged once


def test_bad_input_on_two_processes_is_one_line(tmp_path):
    # refused by the launching process, before any rank starts
    result = run_kvrl("select", "--strategy", "rlkv", "--num-processes", "2", "--no-such-option", "1", cwd=tmp_path)
    assert "unknown option --no-such-option" in only_error_line(result)
    # refused inside the ranks (every rank fails to load the model): still shown once
    result = run_kvrl("select", "--strategy", "rlkv", "--num-processes", "2", "--model", str(tmp_path / "missing"), *TINY, cwd=tmp_path)
    assert "cannot load model" in only_error_line(result)
    assert not list(tmp_path.glob("heads-*"))
