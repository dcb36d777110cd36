"""The chat template through the command line: `--no-chat-template` is honoured on a task that asks for the
chat template, and a chat template asked for on a tokenizer without one is one line (exit 2), before the model loads."""

import json

import pytest

from kvpress_rl.evaluators.grid import read_grid, sample_context
from tests.helpers import only_error_line, run_kvrl, tiny_model_and_tokenizer

TEMPLATE = "{% for m in messages %}[[{{ m['content'] }}]]{% endfor %}"
RUN = ("--strategy", "streaming", "--sparsity", "0.5", "--seeds", "0", "--limit", "1", "--max-tokens", "2", "--batch-size", "1")


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
    extra = tuple(str(shared_data) if e == "DATA" else e for e in extra)
    result = run_kvrl("eval", "--model", str(folders / "plain"), "--tasks", tasks, *extra, *RUN, "--output", "out", cwd=tmp_path)
    line = single_line(result)
    assert named in line and str(folders / "plain") in line and "pass --no-chat-template" in line
    assert not (tmp_path / "out").exists()  # refused before the output folder (and the model) was touched


@pytest.mark.parametrize("folder", ["plain", "templated"])
def test_no_chat_template_wins_over_the_tasks_preference(folders, tmp_path, folder):
    result = run_kvrl("eval", "--model", str(folders / folder), "--tasks", "embedded", "--no-chat-template", *RUN, "--output", "out",
                      cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    cells = read_grid(tmp_path / "out" / "grid.csv")
    assert [c.strategy for c in cells] == ["full", "streaming"]
    assert all(json.loads(c.definition)["chat_template"] is False for c in cells)  # what was used is what is recorded
    sample = json.loads((tmp_path / "out" / "samples" / "embedded" / "full-s0-seed0.jsonl").read_text().splitlines()[0])
    assert sample_context(sample) == sample["doc"]["prompt"]  # the plain prompt, not the template's "[[...]]"


def test_max_tokens_the_model_cannot_hold_is_one_line(folders, tmp_path):
    result = run_kvrl("eval", "--model", str(folders / "plain"), "--tasks", "embedded", "--no-chat-template", *RUN, "--max-tokens", "40000",
                      "--output", "out", cwd=tmp_path)
    line = only_error_line(result)  # after the model loads (its length is in its config), before lm-eval runs
    assert "--max-tokens 40000: model" in line and "reads at most 32768 tokens" in line and "pass --max-tokens below 32768" in line
    assert not (tmp_path / "out" / "grid.csv").exists() and not (tmp_path / "out" / "results").exists()
