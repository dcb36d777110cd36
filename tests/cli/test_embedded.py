"""`kvrl embedded evaluate` as a user runs it: the full cache, or a head plan, on a chosen split."""

import re

import pytest
import torch
from click.testing import CliRunner

from kvpress_rl import HeadScores
from kvpress_rl.cli.main import app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def accuracy_line(result) -> tuple[int, str]:
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("accuracy"))
    return int(re.search(r"\((\d+)/", line).group(1)), line


def test_a_head_plan_is_evaluated_on_the_validation_split(cli, tmp_path):
    HeadScores(torch.zeros(30, 3), strategy="constant").save(tmp_path / "heads.safetensors")
    split = ("embedded", "evaluate", "--split", "validation", "--limit", "4", "--batch-size", "4")
    full, full_line = accuracy_line(cli(*split))
    none, none_line = accuracy_line(cli(*split, "--heads", "heads.safetensors", "--sparsity", "1"))
    assert any(f"({right}/4) on embedded validation, full cache" in full_line for right in (4, 3))
    assert "on embedded validation, heads.safetensors at sparsity 1" in none_line
    assert none < full  # every head compressed to 16 + 64 tokens breaks the look-ups


def test_the_counted_task_is_reported_by_length(cli):
    result = cli("embedded", "evaluate", "--task", "embedded_count", "--split", "validation", "--limit", "6",
                 "--batch-size", "6")
    right, line = accuracy_line(result)
    assert "on embedded_count validation, full cache" in line and right >= 5
    by_steps = next(line for line in result.output.splitlines() if line.startswith("by steps: "))
    assert re.fullmatch(r"by steps: (\d+: \d+% of \d+(, )?)+", by_steps)
    unknown = cli("embedded", "evaluate", "--task", "embedded_counted", "--limit", "2")
    assert unknown.exit_code == 2 and "embedded_count" in unknown.output


def test_heads_and_sparsity_go_together(cli, tmp_path):
    result = cli("embedded", "evaluate", "--limit", "2", "--sparsity", "0.5")
    assert result.exit_code == 2 and "--heads and --sparsity go together" in result.output.splitlines()[-1]


def test_the_full_cache_is_evaluated_in_bfloat16_as_selection_runs(cli):
    right, line = accuracy_line(cli("embedded", "evaluate", "--split", "validation", "--limit", "4",
                                    "--batch-size", "4", "--dtype", "bfloat16"))
    assert "on embedded validation, full cache, bfloat16, greedy" in line and right >= 3
    refused = cli("embedded", "evaluate", "--limit", "2", "--dtype", "float8")
    assert refused.exit_code == 2 and "float32" in refused.output and "bfloat16" in refused.output
