"""RLKV trainings side by side (`kvrl report rewards`): the per-step table, each run's totals, the figure."""

import json

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.reward_curves import read_train_log, run_summary, steps_table, write_reward_curves


def train_log(path, rewards: list[float]):
    """A `train_log.jsonl` as `kvrl select --strategy rlkv` writes it: one record per step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": i + 1, "mean_reward": r, "mean_alpha": 1 - 0.1 * i,
                                        "rollout_seconds": 2.0, "completion_tokens": 50, "seconds": 3.0}) + "\n"
                            for i, r in enumerate(rewards)) + "\n")
    return path


def test_runs_of_different_lengths_are_tabled_step_by_step(tmp_path):
    runs = {"transformers": read_train_log(train_log(tmp_path / "a" / "train_log.jsonl", [0.5, 0.75, 1.0])),
            "vllm": read_train_log(train_log(tmp_path / "b" / "train_log.jsonl", [0.25]))}
    lines = steps_table(runs).splitlines()
    assert lines[0] == "| step | transformers reward | transformers mean alpha | vllm reward | vllm mean alpha |"
    assert lines[1] == "| --- | --- | --- | --- | --- |"
    assert lines[2] == "| 1 | 0.500 | 1.000 | 0.250 | 1.000 |"
    assert lines[4] == "| 3 | 1.000 | 0.800 |  |  |"  # past the shorter run's last step: blank
    assert run_summary("transformers", runs["transformers"]) == (
        "transformers: mean reward 0.750, last 10 0.750, final mean alpha 0.800, steps 9 s, rollouts 6 s, "
        "25.0 rollout tokens/s")
    png = write_reward_curves(runs, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["curves.png"]  # no temporary left


def test_a_folder_without_a_log_or_steps_is_refused(tmp_path):
    with pytest.raises(KvrlError, match="no training log .*kvrl select --strategy rlkv"):
        read_train_log(tmp_path / "train_log.jsonl")
    (tmp_path / "train_log.jsonl").write_text("\n")
    with pytest.raises(KvrlError, match="logs no step yet"):
        read_train_log(tmp_path / "train_log.jsonl")


def test_a_partly_written_log_line_is_refused_in_one_line(tmp_path):
    log = train_log(tmp_path / "a" / "train_log.jsonl", [0.5, 0.75])
    log.write_text(log.read_text().rstrip("\n") + '\n{"step": 3, "mean_rew')  # a run killed while it wrote
    with pytest.raises(KvrlError, match=r"train_log.jsonl line 3 is not a training-log record"):
        read_train_log(log)
