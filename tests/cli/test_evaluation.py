"""`kvrl eval` and `kvrl report` as a user runs them, on the embedded model and ../shared/data."""

import csv
import json

import pytest
import torch

from kvpress_rl import HeadScores
from tests.helpers import run_kvrl

pytestmark = pytest.mark.slow

FOUR_TASKS = "gsm8k,aime24,minerva_math500,mbpp"


def eval_args(shared_data, out, tasks=FOUR_TASKS, *extra):
    return ("eval", "--tasks", tasks, "--data-dir", str(shared_data), "--strategy", "random", "--sparsity", "0.5", "--seeds", "0",
            "--limit", "3", "--max-tokens", "12", "--batch-size", "3", "--allow-code-execution", "--output", str(out), *extra)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def four_task_grid(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "grid"
    result = run_kvrl(*eval_args(shared_data, out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_offline_tasks_run_on_the_embedded_model(four_task_grid):
    out, result = four_task_grid
    with (out / "grid.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["task"], r["strategy"]) for r in rows) == sorted(
        (t, s) for t in FOUR_TASKS.split(",") for s in ("full", "random"))
    assert all(int(r["total"]) == 3 for r in rows)
    assert all(int(r["correct"]) + int(r["overlength"]) + int(r["repetitive"]) + int(r["incorrect"]) == 3 for r in rows)
    for task in FOUR_TASKS.split(","):
        lm_eval_json = json.loads((out / "results" / task / "random-s0.5-seed0.json").read_text())
        assert task in lm_eval_json["results"] and lm_eval_json["n-samples"][task]["effective"] == 3
        samples = [json.loads(line) for line in (out / "samples" / task / "random-s0.5-seed0.jsonl").read_text().splitlines()]
        assert len(samples) == 3 and all(s["classification"] in ("correct", "overlength", "repetitive", "incorrect") for s in samples)
    assert "change vs full" in result.stdout and "KV saved" in result.stdout


def test_an_interrupted_grid_resumes_from_the_finished_cells(four_task_grid, shared_data):
    out, _ = four_task_grid
    grid = out / "grid.csv"
    lines = grid.read_text().splitlines()
    grid.write_text("\n".join(lines[:-1]) + "\n")  # as if the last cell had not finished
    kept = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    result = run_kvrl(*eval_args(shared_data, out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(grid.read_text().splitlines()) == len(lines)
    rerun = [p for p, mtime in kept.items() if p.stat().st_mtime_ns != mtime]
    assert len(rerun) == 1  # only the missing cell ran again


def test_report_draws_the_grid_and_the_paper(four_task_grid, tmp_path):
    out, _ = four_task_grid
    paper = tmp_path / "paper.csv"
    paper.write_text("model,benchmark,method,sparsity,accuracy,full_accuracy\n"
                     "M,GSM8K,RLKV,0.2,88.0,89.0\nM,GSM8K,RLKV,0.4,80.0,89.0\nOther,GSM8K,RLKV,0.2,1.0,2.0\n")
    result = run_kvrl("report", str(out), "--paper", str(paper), "--paper-model", "M")
    assert result.returncode == 0, result.stderr
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report.md").read_text()
    assert "| gsm8k | random | 0.5 | 1 |" in table and "| mbpp | full | 0 | 1 |" in table
    missing = run_kvrl("report", str(out), "--paper", str(paper), "--paper-model", "Nope")
    assert "has no model 'Nope'; it has: M, Other" in one_line_error(missing)


def test_unknown_task_is_refused_with_close_names(tmp_path):
    result = run_kvrl("eval", "--tasks", "gsm8kk", "--output", "out", cwd=tmp_path)
    assert "unknown task 'gsm8kk'" in one_line_error(result) and "gsm8k" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_a_data_directory_without_the_file_is_refused(tmp_path):
    result = run_kvrl("eval", "--tasks", "math500_r1", "--data-dir", str(tmp_path), "--output", "out", cwd=tmp_path)
    assert "needs math500/test.jsonl" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_mbpp_needs_permission_to_run_code(shared_data, tmp_path):
    result = run_kvrl("eval", "--tasks", "mbpp", "--data-dir", str(shared_data), "--output", "out", cwd=tmp_path)
    assert "--allow-code-execution" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_heads_of_another_model_are_refused(tmp_path):
    HeadScores(torch.rand(4, 2), model_id="other", strategy="rlkv").save(tmp_path / "other.safetensors")
    result = run_kvrl("eval", "--strategy", "rlkv", "--heads", str(tmp_path / "other.safetensors"), "--sparsity", "0.5",
                      "--limit", "2", "--output", "out", cwd=tmp_path)
    assert "heads of 'rlkv' do not fit this model" in one_line_error(result)
    assert not (tmp_path / "out" / "grid.csv").exists() and not (tmp_path / "out" / "results").exists()  # refused before the full-cache cell


def test_data_parallel_eval_with_two_cpu_processes(tmp_path):
    args = ("eval", "--strategy", "random", "--sparsity", "0.5", "--seeds", "0", "--limit", "4", "--max-tokens", "64")
    parallel = run_kvrl(*args, "--num-processes", "2", "--output", "two", cwd=tmp_path, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "results" / "embedded" / "random-s0.5-seed0.json").read_text())
    assert results["config"]["kvrl_processes"] == 2
    samples = (tmp_path / "two" / "samples" / "embedded" / "random-s0.5-seed0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["doc_id"] for line in samples) == [0, 1, 2, 3]  # both halves gathered on rank 0
    single = run_kvrl(*args, "--output", "one", cwd=tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    def accuracies(name):
        with (tmp_path / name / "grid.csv").open() as handle:
            return {(r["strategy"], r["sparsity"]): r["accuracy"] for r in csv.DictReader(handle)}
    assert accuracies("two") == accuracies("one")


def test_gsm8k_on_the_real_model_with_its_chat_template(shared_data, tmp_path):
    from kvpress_rl.embedded.model import smollm2_gguf

    result = run_kvrl("eval", "--model", str(smollm2_gguf()), "--tasks", "gsm8k", "--data-dir", str(shared_data), "--limit", "20",
                      "--strategy", "random", "--sparsity", "0.5", "--seeds", "0", "--max-tokens", "16", "--batch-size", "10",
                      "--output", "out", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples" / "gsm8k" / "full-s0-seed0.jsonl").read_text().splitlines()]
    assert len(samples) == 20
    prompt = samples[0]["arguments"][0][0] if isinstance(samples[0]["arguments"], list) else samples[0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("<|im_start|>user") == 6 and prompt.endswith("<|im_start|>assistant\n")  # 5 shots as turns, then the question
    results = json.loads((tmp_path / "out" / "results" / "gsm8k" / "random-s0.5-seed0.json").read_text())
    assert results["config"]["kvrl_plan"]["compressed_kv_heads"] == 45
