"""`kvrl eval --engine vllm`: the same grid through the vLLM plugin gives the transformers path's answers, its cells are
keyed by engine, and what the engine cannot run is refused in one line before anything loads."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.usefixtures("vllm_installed"), pytest.mark.engine]
RLKV_HEADS = REPO_ROOT / "benchmarks" / "results" / "heads-rlkv-embedded-count.safetensors"
GRID = ["eval", "--tasks", "embedded_count", "--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--sparsity", "0.8", "--limit", "6", "--dtype", "float32",
        "--batch-size", "6"]


def responses(folder) -> dict[str, list[str]]:
    found = {}
    for path in sorted((folder / "samples" / "embedded_count").glob("*.jsonl")):
        found[path.stem] = [json.loads(line)["filtered_resps"][0] for line in path.read_text().splitlines()]
    return found


def test_the_engine_answers_as_the_executor_and_its_cells_are_its_own(cli, tmp_path):
    engine = cli(*GRID, "--engine", "vllm", "--output", "vllm")
    assert engine.exit_code == 0, engine.output
    executor = cli(*GRID, "--output", "transformers")
    assert executor.exit_code == 0, executor.output
    answers = responses(tmp_path / "vllm")
    assert answers and answers == responses(tmp_path / "transformers")  # every answer, full cache and s = 0.8
    rows = list(csv.DictReader((tmp_path / "vllm" / "grid.csv").open()))
    assert {json.loads(row["definition"])["engine"] for row in rows} == {"vllm"}
    resumed = cli(*GRID, "--output", "vllm")  # the transformers path does not resume the engine's cells
    assert resumed.exit_code == 2 and "--engine" in resumed.output


@pytest.mark.parametrize("args, message", [
    (["--strategy", "streaming"], "not token strategies (streaming)"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--compressed-policy", "snapkv"], "--compressed-policy other than streaming"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--decoding-simulation", "50"], "no decoding simulation"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--num-processes", "2"], "runs in one process"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--model", "random:llama"], "loads a folder of weights or a hub id"),
])
def test_what_the_engine_cannot_run_is_refused_in_one_line(cli, tmp_path, args, message):
    result = cli("eval", "--tasks", "embedded_count", "--sparsity", "0.5", "--limit", "2", "--engine", "vllm", *args, "--output", "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()
