"""`kvrl export`: through click's CliRunner on the command itself (`cli/main.py` adds it to `kvrl`)."""

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner

from kvpress_rl import HeadScores
from kvpress_rl.cli.export import export_command

QWEN = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


@pytest.fixture
def export(tmp_path, monkeypatch):
    """`kvrl export ARGS...` in a fresh working folder (HF_HUB_OFFLINE=1 unless a test changes it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    return lambda *args: runner.invoke(export_command, list(args))


def refused(result) -> str:
    """The one line of a refusal: exit 2 (click's UsageError), `Error: ...`, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_published_pattern_exports(export, head_patterns, tmp_path):
    tsv = head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv"
    result = export(str(tsv), "--model-id", QWEN, "--output", "qwen7b-rlkv")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote qwen7b-rlkv: 28 layers x 4 KV heads, strategy file, model {QWEN}")
    card = (tmp_path / "qwen7b-rlkv" / "README.md").read_text()
    assert f"base_model: {QWEN}" in card and "| 0.5 | 56 / 112 | 56 | 226.2 | 50.5% |" in card
    assert "kvrl plan --heads qwen7b-rlkv --sparsity 0.5" in card
    assert torch.equal(HeadScores.load(tmp_path / "qwen7b-rlkv").scores, HeadScores.load(tsv).scores)
    # the folder is an input like any other: exported again, with another memory table
    again = export("qwen7b-rlkv", "--output", "again", "--seq-len", "1000", "--head-dim", "64")
    assert again.exit_code == 0, again.output
    assert HeadScores.load(tmp_path / "again").model_id == QWEN
    assert "one sequence of 1000 tokens" in (tmp_path / "again" / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["absent.tsv", "--output", "out"], "Error: head scores file not found: absent.tsv"),
    (["p.tsv", "--output", "out", "--seq-len", "0"], "Error: --seq-len must be a positive whole number, got 0"),
    (["p.tsv", "--output", "out", "--head-dim", "0"], "Error: --head-dim must be a positive whole number, got 0"),
    (["p.tsv", "--output", "out", "--model-id", " "], "Error: --model-id is empty; give the model's hub id"),
    (["p.tsv", "--output", "out", "--push-to-hub", "no-owner"], "Error: 'hf://no-owner' is not a hub reference"),
    (["p.tsv", "--output", "out", "--push-to-hub", "me/pattern"],
     "Error: cannot push to hf://me/pattern: the Hugging Face hub is offline here (HF_HUB_OFFLINE=1); export without "
     "--push-to-hub and upload the folder where the hub is reachable (`hf upload me/pattern out`)"),
    (["hf://owner/pattern", "--output", "out"],
     "Error: cannot download hf://owner/pattern: the Hugging Face hub is offline here (HF_HUB_OFFLINE=1) and the "
     "folder is not in the local cache; download the folder where the hub is reachable "
     "(`hf download owner/pattern --local-dir DIR`) and pass DIR"),
    (["hf://owner", "--output", "out"], "Error: 'hf://owner' is not a hub reference"),
    (["p.tsv", "--output", "p.tsv"], "Error: p.tsv is a file; --output names the folder to write"),
])
def test_bad_input_is_one_line_and_writes_nothing(export, tmp_path, args, message):
    HeadScores(torch.rand(2, 2)).to_tsv(tmp_path / "p.tsv")
    assert refused(export(*args)).startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tsv"]


def test_an_existing_output_needs_overwrite(export, tmp_path):
    HeadScores(torch.rand(2, 2)).to_tsv(tmp_path / "p.tsv")
    assert export("p.tsv", "--output", "out").exit_code == 0
    assert refused(export("p.tsv", "--output", "out")) == "Error: out exists; pass --overwrite to replace it"
    assert export("p.tsv", "--output", "out", "--overwrite").exit_code == 0


def test_hf_heads_are_exported_with_their_pinned_revision(export, tmp_path, monkeypatch):
    """With `huggingface_hub.snapshot_download` monkeypatched to return a local folder (no download can run here):
    the config records where the pattern came from, pinned to the commit."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = tmp_path / "cache" / "snapshots" / commit
    HeadScores(torch.rand(3, 2), model_id="org/model", strategy="rlkv").save(snapshot / "head_scores.safetensors")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(snapshot))
    result = export("hf://owner/pattern@main", "--output", "out")
    assert result.exit_code == 0, result.output
    config = (tmp_path / "out" / "config.json").read_text()
    assert f'"source": "hf://owner/pattern@{commit}"' in config and f'"revision": "{commit}"' in config


class FakeApi:
    """Stands in for `huggingface_hub.HfApi` (no upload can run here): records the calls."""

    calls: list = []
    fail = False

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        if FakeApi.fail:
            raise ConnectionError("Network is unreachable")
        FakeApi.calls.append(("upload_folder", repo_id, folder_path, commit_message))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_to_hub_uploads_the_written_folder(export, tmp_path, monkeypatch):
    """The upload with `huggingface_hub.HfApi` monkeypatched (no network here)."""
    online(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    HeadScores(torch.rand(2, 2), model_id="org/model", strategy="random").to_tsv(tmp_path / "p.tsv")
    result = export("p.tsv", "--output", "out", "--model-id", "org/model", "--push-to-hub", "me/pattern")
    assert result.exit_code == 0, result.output
    assert "pushed to hf://me/pattern: https://huggingface.co/me/pattern/commit/abc" in result.output
    assert FakeApi.calls == [("create_repo", "me/pattern", {"exist_ok": True}),
                             ("upload_folder", "me/pattern", "out", "kvrl export: file pattern for org/model")]
    assert "kvrl plan --heads hf://me/pattern" in (tmp_path / "out" / "README.md").read_text()


def test_a_failed_push_keeps_the_folder_and_says_how_to_upload_it(export, tmp_path, monkeypatch):
    online(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "fail", True)
    HeadScores(torch.rand(2, 2)).to_tsv(tmp_path / "p.tsv")
    result = export("p.tsv", "--output", "out", "--push-to-hub", "me/pattern")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        "wrote out: 2 layers x 2 KV heads, strategy file, model not recorded; card with plans at s = 0.2, 0.4, "
        "0.5, 0.6, 0.8",
        "Error: out was written but uploading it to hf://me/pattern failed: the Hugging Face hub cannot be reached "
        "(no network?); upload it later with `hf upload me/pattern out`"]
    assert (tmp_path / "out" / "head_scores.safetensors").is_file()
