"""`kvrl report` as a user runs it (in-process): `kvrl report DIR` is the grid subcommand, and the subcommands
that compare two cells (`paired`), two engines' grids (`engines`) and RLKV trainings (`rewards`)."""

import json
from pathlib import Path

from kvpress_rl.evaluators.cells import Cell, write_grid
from tests.helpers import error_line


def cell(path: Path, solved: list[int]) -> Path:
    path.write_text("".join(json.dumps({"doc_id": i, "acc": float(ok)}) + "\n" for i, ok in enumerate(solved)))
    return path


def test_the_subcommands_are_listed(cli):
    result = cli("report", "--help")
    assert result.exit_code == 0
    for name in ("grid", "paired", "engines", "rewards"):
        assert f"  {name} " in result.output


def small_grid(folder: Path, task: str = "embedded") -> None:
    write_grid(folder / "grid.csv", [
        Cell(task=task, strategy=strategy, sparsity=sparsity, seed=0, accuracy=accuracy, correct=1, total=2,
             kv_fraction=1 - sparsity / 2, decode_tokens_per_s=50.0, kv_measured=1 - sparsity / 2)
        for strategy, sparsity, accuracy in (("full", 0.0, 1.0), ("streaming", 0.5, 0.5))])


def test_a_folder_first_is_the_grid_subcommand_with_its_options_anywhere(cli, tmp_path):
    small_grid(tmp_path / "out")
    for args in (("report", "out", "--frontier"), ("report", "--frontier", "out"), ("report", "grid", "out")):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "wrote out/report.png and out/report.md" in result.output
    assert (tmp_path / "out" / "frontier.md").is_file()
    assert "no finished cells in missing/grid.csv" in error_line(cli("report", "missing"))


def test_the_grid_is_drawn_beside_the_papers_points_of_one_model(cli, tmp_path):
    small_grid(tmp_path / "out", task="gsm8k")
    (tmp_path / "paper.csv").write_text("model,benchmark,method,sparsity,accuracy,full_accuracy\n"
                                        "M,GSM8K,RLKV,0.2,88.0,89.0\nOther,GSM8K,RLKV,0.2,1.0,2.0\n")
    assert cli("report", "out", "--paper", "paper.csv", "--paper-model", "M").exit_code == 0
    assert "| gsm8k | streaming | 0.5 | 1 |" in (tmp_path / "out" / "report.md").read_text()
    missing = cli("report", "out", "--paper", "paper.csv", "--paper-model", "Nope")
    assert "has no model 'Nope'; it has: M, Other" in error_line(missing)
    assert "--paper needs --paper-model" in error_line(cli("report", "out", "--paper", "paper.csv"))


def test_paired_counts_the_discordant_problems_and_their_exact_p(cli, tmp_path):
    a = cell(tmp_path / "a.jsonl", [1] * 10 + [0] * 2)
    b = cell(tmp_path / "b.jsonl", [0] * 10 + [1] * 2)
    out = cli("report", "paired", str(a), str(b))
    assert out.exit_code == 0, out.output
    # 2 * (1 + 12 + 66) / 4096
    assert "only the first 10, only the second 2; exact two-sided p = 0.039" in out.stdout


def test_paired_cells_on_different_problems_need_common(cli, tmp_path):
    long = cell(tmp_path / "long.jsonl", [1, 1, 1, 1, 0, 0])
    short = cell(tmp_path / "short.jsonl", [0, 0, 1])
    refused = cli("report", "paired", str(long), str(short))
    assert refused.exit_code != 0 and "--common" in refused.stderr
    assert "--common" in error_line(refused)  # one line, exit 2
    out = cli("report", "paired", str(long), str(short), "--common")
    assert out.exit_code == 0 and out.stdout.startswith("3 problems:")
    assert "only the first 2, only the second 0" in out.stdout


def test_paired_writes_a_tiny_p_as_a_bound(cli, tmp_path):
    a = cell(tmp_path / "a.jsonl", [1] * 30)
    b = cell(tmp_path / "b.jsonl", [0] * 30)
    assert "exact two-sided p < 0.001" in cli("report", "paired", str(a), str(b)).stdout


def test_engines_tables_the_cells_both_outputs_ran(cli, tmp_path):
    for engine, answers in (("transformers", ["7", "12"]), ("vllm", ["7", "13"])):
        path = tmp_path / engine / "samples" / "embedded_count" / "rlkv-s0.6-seed0.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"doc_id": i, "filtered_resps": [a], "classification": "correct"}) + "\n"
                                for i, a in enumerate(answers)))
    out = cli("report", "engines", "transformers", "vllm")
    assert out.exit_code == 0, out.output
    assert "| embedded_count | rlkv-s0.6-seed0 | 100.0 | 100.0 | 1 / 2 | 1 (char 1) |" in out.stdout
    assert "no samples in nothing/samples" in error_line(cli("report", "engines", "transformers", "nothing"))


def test_rewards_tables_each_run_and_draws_the_figure(cli, tmp_path):
    for name, rewards in (("a.run", [0.5, 1.0]), ("b.run", [0.25])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "mean_reward": r, "mean_alpha": 0.9, "rollout_seconds": 1.0,
                        "completion_tokens": 10, "seconds": 2.0}) + "\n" for i, r in enumerate(rewards)))
    out = cli("report", "rewards", "transformers=a.run", "vllm=b.run", "--output", "curves.png")
    assert out.exit_code == 0, out.output
    assert "| 2 | 1.000 | 0.900 |  |  |" in out.stdout
    assert "vllm: mean reward 0.250, last 10 0.250" in out.stdout
    assert out.stdout.splitlines()[-1] == "wrote curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "'a.run': expected NAME=WORK_FOLDER" in error_line(cli("report", "rewards", "a.run"))
    assert "no training log missing.run/train_log.jsonl" in error_line(cli("report", "rewards", "x=missing.run"))
