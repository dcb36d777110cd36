"""`kvrl eval` and `kvrl report` as a user runs them, on the embedded model and ../shared/data: the results table
that keeps names and numbers whole at any width, bad input refused as one line before the model loads, one writer
per output folder, damaged grids left alone, a readable log, and the chat template as the flag or the task asks."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from kvpress_rl import HeadScores
from kvpress_rl.cli.evaluation import results_table
from kvpress_rl.evaluators.cells import Cell, read_grid, summarize
from kvpress_rl.evaluators.samples import sample_context
from tests.helpers import KVRL, error_line, only_error_line, run_kvrl, tiny_model_and_tokenizer

FOUR_TASKS = "gsm8k,aime24,minerva_math500,mbpp"
ELLIPSIS = "…"  # rich's ellipsis when a cell is cut
TEMPLATE = "{% for m in messages %}[[{{ m['content'] }}]]{% endfor %}"
TINY_RUN = ("--strategy", "streaming", "--sparsity", "0.5", "--seeds", "0", "--limit", "1", "--max-tokens", "2",
            "--batch-size", "1")


# --- the results table --------------------------------------------------------------------------------
def embedded_rows():
    """A realistic `kvrl eval` summary: the embedded task, three strategies at sparsity 0.6, random over three seeds."""
    def cell(strategy, sparsity, seed, accuracy, overlength=2, repetitive=1):
        return Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=seed, accuracy=accuracy,
                    correct=round(accuracy * 30), total=30, kv_fraction=1 - sparsity * 0.8, decode_tokens_per_s=1234.5,
                    overlength=overlength, repetitive=repetitive)

    cells = [cell("full", 0.0, 0, 0.733, 0, 0), cell("streaming", 0.6, 0, 0.5), cell("retrieval", 0.6, 0, 0.6),
             cell("random", 0.6, 0, 0.0, 14, 3), cell("random", 0.6, 1, 0.1), cell("random", 0.6, 2, 1.0)]
    return summarize(cells)


def rendered(renderable, width: int) -> str:
    console = Console(width=width, record=True, force_terminal=True)
    console.print(renderable)
    return console.export_text()


def test_the_results_table_keeps_names_and_numbers_whole_at_80_columns():
    rows = embedded_rows()
    random_row = next(r for r in rows if r["strategy"] == "random")
    assert random_row["seeds"] == 3
    text = rendered(results_table(rows), 80)
    assert ELLIPSIS not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("embedded", "full", "streaming", "random", "retrieval"):
        assert f" {name} " in text  # whole, on one line
    assert "36.7 ± 55.1" in text  # mean ± std over the seeds, whole
    for r in rows:  # each row's numbers, whole on its line
        line = next(line for line in text.splitlines() if line.startswith(f"│ embedded │ {r['strategy']} "))
        for number in (f"{100 * r['accuracy']:.1f}", f"{100 * r['change']:+.1f}", f"{100 * r['kv_saved']:.0f}%",
                       f"{r['sparsity']:g}"):
            assert f" {number} " in line, (number, line)
    # what did not fit is named, not silently cut
    assert "not shown at this width: decode tok/s, overlength, repetitive" in " ".join(text.split())


def test_the_results_table_shows_every_column_where_there_is_room():
    text = rendered(results_table(embedded_rows()), 160)
    assert ELLIPSIS not in text and "not shown" not in text
    for header in ("decode tok/s", "overlength", "repetitive"):
        assert header in text
    row = next(line for line in text.splitlines() if line.startswith("│ embedded │ random "))
    assert " 1234.5 │ " in row and " 18 │ " in row and " 5 │" in row  # overlength and repetitive, summed over the seeds


@pytest.mark.parametrize("width", [40, 50, 60, 70, 90, 100, 120])
def test_the_results_table_never_cuts_a_cell_and_fits_the_console(width):
    text = rendered(results_table(embedded_rows()), width)
    assert ELLIPSIS not in text
    assert max(len(line) for line in text.splitlines()) <= width
    if width >= 60:  # from 60 columns on, names and numbers are whole on their line
        for piece in ("embedded", "streaming", "retrieval", "-36.6", "73.3", "48%"):
            assert f" {piece} " in text


# --- a grid as a user runs it ---------------------------------------------------------------------------
def eval_args(shared_data, out, tasks=FOUR_TASKS, *extra):
    return ("eval", "--tasks", tasks, "--data-dir", str(shared_data), "--strategy", "random", "--sparsity", "0.5",
            "--seeds", "0", "--limit", "3", "--max-tokens", "12", "--batch-size", "3", "--allow-code-execution",
            "--output", str(out), *extra)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def kvrl(*args, cwd, timeout=120, **env):
    """`kvrl ARGS` in a subprocess, without the test run's COLUMNS and KVRL_MODEL."""
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "KVRL_MODEL")}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    return subprocess.run([KVRL, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def four_task_grid(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "grid"
    result = run_kvrl(*eval_args(shared_data, out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_offline_tasks_run_on_the_embedded_model(four_task_grid):
    out, result = four_task_grid
    with (out / "grid.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["task"], r["strategy"]) for r in rows) == sorted(
        (t, s) for t in FOUR_TASKS.split(",") for s in ("full", "random"))
    assert all(int(r["total"]) == 3 for r in rows)
    assert all(int(r["correct"]) + int(r["overlength"]) + int(r["repetitive"]) + int(r["incorrect"]) == 3
               for r in rows)
    for task in FOUR_TASKS.split(","):
        lm_eval_json = json.loads((out / "results" / task / "random-s0.5-seed0.json").read_text())
        assert task in lm_eval_json["results"] and lm_eval_json["n-samples"][task]["effective"] == 3
        samples = [json.loads(line)
                   for line in (out / "samples" / task / "random-s0.5-seed0.jsonl").read_text().splitlines()]
        assert len(samples) == 3
        assert all(s["classification"] in ("correct", "overlength", "repetitive", "incorrect") for s in samples)
    assert "change vs full" in result.stdout and "KV saved" in result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_gsm8k_on_the_real_model_with_its_chat_template(shared_data, tmp_path):
    from kvpress_rl.embedded.model import smollm2_gguf

    result = run_kvrl("eval", "--model", str(smollm2_gguf()), "--tasks", "gsm8k", "--data-dir", str(shared_data),
                      "--limit", "20", "--strategy", "random", "--sparsity", "0.5", "--seeds", "0",
                      "--max-tokens", "16", "--batch-size", "10", "--output", "out", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line)
               for line in (tmp_path / "out" / "samples" / "gsm8k" / "full-s0-seed0.jsonl").read_text().splitlines()]
    assert len(samples) == 20
    arguments = samples[0]["arguments"]
    prompt = arguments[0][0] if isinstance(arguments, list) else arguments["gen_args_0"]["arg_0"]
    # 5 shots as turns, then the question
    assert prompt.count("<|im_start|>user") == 6 and prompt.endswith("<|im_start|>assistant\n")
    results = json.loads((tmp_path / "out" / "results" / "gsm8k" / "random-s0.5-seed0.json").read_text())
    assert results["config"]["kvrl_plan"]["compressed_kv_heads"] == 45


# --- refused as one line, exit 2 ----------------------------------------------------------------------
def test_unknown_task_is_refused_with_close_names(cli, tmp_path):
    line = error_line(cli("eval", "--tasks", "gsm8kk", "--output", "out"))
    assert "unknown task 'gsm8kk'" in line and "gsm8k" in line
    assert not (tmp_path / "out").exists()


def test_a_data_directory_without_the_file_is_refused(cli, tmp_path):
    line = error_line(cli("eval", "--tasks", "math500_r1", "--data-dir", str(tmp_path), "--output", "out"))
    assert "needs math500/test.jsonl" in line
    assert not (tmp_path / "out").exists()


def test_mbpp_needs_permission_to_run_code(cli, shared_data, tmp_path):
    line = error_line(cli("eval", "--tasks", "mbpp", "--data-dir", str(shared_data), "--output", "out"))
    assert "--allow-code-execution" in line
    assert not (tmp_path / "out").exists()


def test_heads_of_another_model_are_refused(cli, tmp_path):
    HeadScores(torch.rand(4, 2), model_id="other", strategy="rlkv").save(tmp_path / "other.safetensors")
    line = error_line(cli("eval", "--strategy", "rlkv", "--heads", str(tmp_path / "other.safetensors"),
                          "--sparsity", "0.5", "--limit", "2", "--output", "out"))
    assert "heads of 'rlkv' do not fit this model" in line
    # refused before the full-cache cell
    assert not (tmp_path / "out" / "grid.csv").exists() and not (tmp_path / "out" / "results").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_is_refused(cli, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert "not writable" in error_line(cli("eval", "--output", "ro/out"))


@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_damaged_grid_is_refused_and_kept(cli, tmp_path, command):
    grid = tmp_path / "out" / "grid.csv"
    grid.parent.mkdir()
    broken = (b"task,strategy,sparsity,seed,accuracy,correct,total,kv_fraction,decode_tokens_per_s\n"
              b"embedded,full,0.0,0,1.0,1")
    grid.write_bytes(broken)
    args = ("eval", "--output", "out") if command == "eval" else ("report", "out")
    assert "grid.csv is damaged (line 2" in error_line(cli(*args))
    assert grid.read_bytes() == broken


def test_a_second_writer_into_one_output_is_refused(cli, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from kvpress_rl.evaluators.output_lock import lock_output\n"
                               "lock = lock_output(Path('out'))\nprint('held', flush=True)\ntime.sleep(120)\n"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for processes in ("1", "2"):
            result = cli("eval", "--strategy", "streaming", "--num-processes", processes, "--output", "out")
            assert f"being written by another `kvrl eval` (pid {holder.pid})" in error_line(result)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".kvrl-eval.lock"]


@pytest.mark.slow
def test_a_log_file_gets_plain_lines_and_a_grid_made_otherwise_is_not_resumed(tmp_path):
    args = ("eval", "--strategy", "random", "--seeds", "0", "--sparsity", "0.2", "--max-tokens", "8",
            "--batch-size", "2", "--output", "E")
    result = kvrl(*args, "--limit", "2", cwd=tmp_path, timeout=600)  # stdout is a pipe, as when written to a log file
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["embedded full s=0 seed=0", "embedded random s=0.2 seed=0"]
    assert "| embedded | random | 0.2 | 1 |" in result.stdout and ELLIPSIS not in result.stdout
    assert "\x1b[" not in result.stdout  # no terminal control sequences in a log
    grid = (tmp_path / "E" / "grid.csv").read_text()
    refused = kvrl(*args, "--limit", "1", cwd=tmp_path)
    assert "--limit 2 -> 1" in only_error_line(refused) and "--recompute" in only_error_line(refused)
    assert (tmp_path / "E" / "grid.csv").read_text() == grid


@pytest.mark.slow
def test_a_rank_that_fails_after_loading_reports_one_line(tmp_path):
    HeadScores(torch.rand(4, 2), model_id="other", strategy="rlkv").save(tmp_path / "other.safetensors")
    result = kvrl("eval", "--strategy", "rlkv", "--heads", "other.safetensors", "--sparsity", "0.5", "--limit", "2",
                  "--num-processes", "2", "--output", "out", cwd=tmp_path, timeout=600)
    assert "heads of 'rlkv' do not fit this model" in only_error_line(result)
    assert not (tmp_path / "out" / "results").exists()


# --- the chat template ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two model folders with the same tiny weights: a tokenizer without a chat template, and one with."""
    model, tokenizer = tiny_model_and_tokenizer()
    root = tmp_path_factory.mktemp("models")
    for name in ("plain", "templated"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "templated" / "chat_template.jinja").write_text(TEMPLATE)
    assert "chat_template" not in json.loads((root / "plain" / "tokenizer_config.json").read_text())
    return root


def single_line(result) -> str:
    line = only_error_line(result)
    assert (result.stdout + result.stderr).strip() == line  # nothing else: no warnings, no progress, no traceback
    return line


@pytest.mark.parametrize("tasks, extra, named", [
    ("embedded", (), "task 'embedded' uses the chat template by default"),
    ("gsm8k_r1", ("--data-dir", "DATA"), "task 'gsm8k_r1' uses the chat template by default"),
    ("embedded", ("--chat-template",), "--chat-template: the tokenizer of model"),
])
def test_a_chat_template_the_tokenizer_lacks_is_one_line(folders, shared_data, tmp_path, tasks, extra, named):
    # a subprocess: the whole output of the real command is the one line
    extra = tuple(str(shared_data) if e == "DATA" else e for e in extra)
    result = run_kvrl("eval", "--model", str(folders / "plain"), "--tasks", tasks, *extra, *TINY_RUN,
                      "--output", "out", cwd=tmp_path)
    line = single_line(result)
    assert named in line and str(folders / "plain") in line and "pass --no-chat-template" in line
    assert not (tmp_path / "out").exists()  # refused before the output folder (and the model) was touched


@pytest.mark.parametrize("folder", ["plain", "templated"])
def test_no_chat_template_wins_over_the_tasks_preference(folders, tmp_path, folder):
    result = run_kvrl("eval", "--model", str(folders / folder), "--tasks", "embedded", "--no-chat-template", *TINY_RUN,
                      "--output", "out", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    cells = read_grid(tmp_path / "out" / "grid.csv")
    assert [c.strategy for c in cells] == ["full", "streaming"]
    assert all(json.loads(c.definition)["chat_template"] is False for c in cells)  # what was used is what is recorded
    sample = json.loads((tmp_path / "out" / "samples" / "embedded" / "full-s0-seed0.jsonl").read_text().splitlines()[0])
    assert sample_context(sample) == sample["doc"]["prompt"]  # the plain prompt, not the template's "[[...]]"


def test_max_tokens_the_model_cannot_hold_is_one_line(cli, folders, tmp_path):
    result = cli("eval", "--model", str(folders / "plain"), "--tasks", "embedded", "--no-chat-template", *TINY_RUN,
                 "--max-tokens", "40000", "--output", "out")
    line = error_line(result)  # after the model loads (its length is in its config), before lm-eval runs
    assert "--max-tokens 40000: model" in line and "reads at most 32768 tokens" in line
    assert "pass --max-tokens below 32768" in line
    assert not (tmp_path / "out" / "grid.csv").exists() and not (tmp_path / "out" / "results").exists()
