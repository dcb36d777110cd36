"""`kvrl eval` through the command line: bad input refused as one line before the model loads (also under
`--num-processes`), one writer per output folder, damaged grids left alone, a readable log."""

import os
import subprocess
import sys
import time

import pytest
import torch

from kvpress_rl import HeadScores
from tests.helpers import KVRL, only_error_line

pytestmark = pytest.mark.slow

LINE_CUT = "\u2026"  # rich's ellipsis when a column is cut


def kvrl(*args, cwd, timeout=120, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "KVRL_MODEL")}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    return subprocess.run([KVRL, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)




@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize("args, env, message", [
    (("--seeds=-1",), {}, "--seeds must be an integer with 0 <= seed"),
    (("--strategy", "rlkv", "--heads", "missing.safetensors"), {}, "head scores file not found: missing.safetensors"),
    (("--output", "a-file/out"), {}, "--output a-file/out is not writable"),
    (("--device", "tpu"), {}, "unknown device 'tpu'"),
    (("--strategy", "random,rlkv"), {}, "run `kvrl select --strategy rlkv --output heads-rlkv.safetensors` first"),
    ((), {"KVRL_MODEL": "./no-such-model"}, "model path does not exist: ./no-such-model"),
])
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, processes, args, env, message):
    (tmp_path / "a-file").write_text("")
    began = time.monotonic()
    result = kvrl("eval", "--num-processes", processes, *args, cwd=tmp_path, **env)
    assert message in only_error_line(result)
    assert time.monotonic() - began < 60  # no model was loaded, no process launched
    assert not (tmp_path / "kvrl-eval" / "grid.csv").exists() and not (tmp_path / "kvrl-eval" / "results").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert "not writable" in only_error_line(kvrl("eval", "--output", "ro/out", cwd=tmp_path))


@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_damaged_grid_is_refused_and_kept(tmp_path, command):
    grid = tmp_path / "out" / "grid.csv"
    grid.parent.mkdir()
    broken = b"task,strategy,sparsity,seed,accuracy,correct,total,kv_fraction,decode_tokens_per_s\nembedded,full,0.0,0,1.0,1"
    grid.write_bytes(broken)
    args = ("eval", "--output", "out") if command == "eval" else ("report", "out")
    assert "grid.csv is damaged (line 2" in only_error_line(kvrl(*args, cwd=tmp_path))
    assert grid.read_bytes() == broken


def test_a_second_writer_into_one_output_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from kvpress_rl.evaluators.grid import lock_output\n"
                               "lock = lock_output(Path('out'))\nprint('held', flush=True)\ntime.sleep(120)\n"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for processes in ("1", "2"):
            result = kvrl("eval", "--strategy", "streaming", "--num-processes", processes, "--output", "out", cwd=tmp_path)
            assert f"being written by another `kvrl eval` (pid {holder.pid})" in only_error_line(result)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".kvrl-eval.lock"]


def test_a_log_file_gets_plain_lines_and_a_grid_made_otherwise_is_not_resumed(tmp_path):
    args = ("eval", "--strategy", "random", "--seeds", "0", "--sparsity", "0.2", "--max-tokens", "8", "--batch-size", "2", "--output", "E")
    result = kvrl(*args, "--limit", "2", cwd=tmp_path, timeout=600)  # stdout is a pipe, as when written to a log file
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["embedded full s=0 seed=0", "embedded random s=0.2 seed=0"]
    assert "| embedded | random | 0.2 | 1 |" in result.stdout and LINE_CUT not in result.stdout
    assert "\x1b[" not in result.stdout  # no terminal control sequences in a log
    grid = (tmp_path / "E" / "grid.csv").read_text()
    refused = kvrl(*args, "--limit", "1", cwd=tmp_path)
    assert "--limit 2 -> 1" in only_error_line(refused) and "--recompute" in only_error_line(refused)
    assert (tmp_path / "E" / "grid.csv").read_text() == grid


def test_a_rank_that_fails_after_loading_reports_one_line(tmp_path):
    HeadScores(torch.rand(4, 2), model_id="other", strategy="rlkv").save(tmp_path / "other.safetensors")
    result = kvrl("eval", "--strategy", "rlkv", "--heads", "other.safetensors", "--sparsity", "0.5", "--limit", "2",
                  "--num-processes", "2", "--output", "out", cwd=tmp_path, timeout=600)
    assert "heads of 'rlkv' do not fit this model" in only_error_line(result)
    assert not (tmp_path / "out" / "results").exists()
