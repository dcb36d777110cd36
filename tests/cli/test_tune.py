"""`kvrl tune` as a user runs it: refusals in one line, and a whole run on a random-weight model that resumes."""

import json

import pytest

from kvpress_rl.evaluators.cells import read_grid
from kvpress_rl.evaluators.tune import choose


@pytest.mark.parametrize("args, message", [
    (["--split", "test"], "chooses on the validation split only"),
    (["--tasks", "aime24_r1", "--strategy", "retrieval"], "no validation split"),
    (["--strategy", "streaming"], "not for token strategies"),
    (["--margin", "0", "--strategy", "random"], "--margin is in accuracy points"),
    (["--step", "0.1", "--resolution", "0.2", "--strategy", "random"], "--resolution must be positive"),
    (["--confidence", "1.5", "--strategy", "random"], "--confidence must lie strictly between"),
    (["--strategy", "rlkv"], "run `kvrl select --strategy rlkv"),
])
def test_bad_input_is_refused_in_one_line_before_any_model_loads(cli, tmp_path, args, message):
    result = cli("tune", "--output", "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def random_weight_folder(tmp_path_factory):
    """A random-weight Llama with the embedded model's tokenizer (and chat template), saved as a model folder."""
    from kvpress_rl.models import load_model, random_model, small_config

    _, tokenizer = load_model()
    folder = tmp_path_factory.mktemp("random-llama")
    random_model(small_config("llama", vocab_size=len(tokenizer)), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tune_args(folder, *extra):
    return ("tune", "--model", str(folder), "--strategy", "random", "--seeds", "0", "--tasks", "embedded",
            "--limit", "3", "--max-tokens", "4", "--batch-size", "3", "--step", "0.25", "--resolution", "0.125",
            "--output", "out", *extra)


@pytest.mark.slow
def test_a_tune_run_chooses_on_validation_measures_on_test_and_resumes(cli, tmp_path, random_weight_folder):
    result = cli(*tune_args(random_weight_folder, "--margin", "99"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    validation = read_grid(out / "validation" / "grid.csv")
    assert {c.sparsity for c in validation if c.strategy == "random"} == {0.25, 0.5, 0.75}
    assert all(json.loads(c.definition)["split"] == "validation" for c in validation)
    report = json.loads((out / "tune.json").read_text())
    [row] = report["results"]
    assert row["chosen"] == choose(out / "validation", validation, "embedded", "random", margin=99).chosen
    test = read_grid(out / "test" / "grid.csv")
    assert sorted((c.strategy, c.sparsity) for c in test) == [("full", 0.0), ("random", row["chosen"])]
    assert all("split" not in json.loads(c.definition) for c in test)
    assert row["serve_command"].startswith("kvrl serve --heads ")
    assert f"--sparsity {row['chosen']:g}" in row["serve_command"]
    assert (out / "tune.png").stat().st_size > 0 and "Near-lossless sparsity" in (out / "tune.md").read_text()

    results = {p: p.stat().st_mtime_ns for p in (out / "validation" / "results").rglob("*.json")}
    grid = out / "validation" / "grid.csv"
    lines = grid.read_text().splitlines()
    grid.write_text("\n".join(lines[:-1]) + "\n")  # as if the last cell had not finished
    again = cli(*tune_args(random_weight_folder, "--margin", "99"))
    assert again.exit_code == 0, again.output
    assert len(grid.read_text().splitlines()) == len(lines)
    assert sum(p.stat().st_mtime_ns != mtime for p, mtime in results.items()) == 1  # only the missing cell ran again

    strict = cli(*tune_args(random_weight_folder, "--output", "strict"))  # 3 problems: nothing can hold with the bound
    assert strict.exit_code == 0, strict.output
    assert "no sparsity can hold" in strict.output and "keep the full cache" in strict.output
    assert not (tmp_path / "strict" / "test").exists()
