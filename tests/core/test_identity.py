"""A result knows the weights and the code that made it (`kvpress_rl.identity`), and a grid
cell made with other weights or other code is never resumed."""

import json
import shutil
import subprocess

import pytest

import kvpress_rl
from kvpress_rl import KvrlError
from kvpress_rl.cli.eval_request import EvalRequest, eval_inputs
from kvpress_rl.embedded import model as embedded
from kvpress_rl.evaluators.resume import plan_resume
from kvpress_rl.evaluators.strategy_scores import selection_key
from kvpress_rl.identity import (
    _checkout_identity,
    code_identity,
    file_digest,
    folder_digest,
    git_identity,
    weights_identity,
)
from tests.helpers import finish_grid


def eval_spec(model: str | None = None, tasks: str = "embedded"):
    """The `GridSpec` `kvrl eval --strategy random --sparsity 0.5 --limit 2` builds before the model loads."""
    request = EvalRequest(tasks=tasks, strategies="random", sparsities="0.5", seeds="0", model=model, heads=None,
                          limit=2, batch_size=2, max_tokens=None, data_dir=None, compressed_policy="streaming",
                          full_policy=None, full_budgets=None, plan_rule="official", decoding_simulation=None,
                          allow_code_execution=False, chat_template=None, device="cpu", dtype="auto",
                          engine="transformers", output="kvrl-eval", recompute=False)
    spec, _ = eval_inputs(request, quiet=True)
    return spec


def model_folder(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    (path / "README.md").write_text("a card")
    return path


@pytest.fixture
def adapter_copy(tmp_path, monkeypatch):
    """The shipped adapter copied to a folder a test may retrain (rewrite)."""
    if not embedded.ADAPTER_DIR.joinpath("adapter_model.safetensors").is_file():
        pytest.skip("no shipped adapter")
    try:
        embedded.smollm2_gguf()
    except KvrlError as err:
        pytest.skip(str(err))
    copy = tmp_path / "adapter"
    shutil.copytree(embedded.ADAPTER_DIR, copy)
    monkeypatch.setattr(embedded, "ADAPTER_DIR", copy)
    return copy


def test_a_retrained_adapter_is_not_resumed(adapter_copy, tmp_path):
    out = tmp_path / "out"
    spec = eval_spec()
    assert spec.weights.startswith("embedded:adapter=") and ",gguf=" in spec.weights
    finish_grid(spec, out)
    assert plan_resume(eval_spec(), out)[1] == []  # the same adapter: everything resumes
    weights = adapter_copy / "adapter_model.safetensors"
    # `kvrl embedded train` wrote a new adapter in its place
    weights.write_bytes(weights.read_bytes()[:-8] + b"retrain!")
    with pytest.raises(KvrlError, match="model weights embedded:adapter=.* -> "
                                        "embedded:adapter=.*--recompute") as refused:
        plan_resume(eval_spec(), out)
    assert "\n" not in str(refused.value)
    kept, todo = plan_resume(eval_spec(), out, recompute=True)
    assert kept == [] and len(todo) == 2  # the full cache and random at 0.5: every cell ran with the old adapter


def test_a_changed_weight_file_in_a_model_folder_is_not_resumed(tmp_path):
    folder = model_folder(tmp_path / "model")
    out = tmp_path / "out"
    spec = eval_spec(str(folder), tasks="embedded")
    assert spec.weights.startswith("folder:")
    finish_grid(spec, out)
    (folder / "README.md").write_text("an edited card")  # not the weights: still resumes
    assert plan_resume(eval_spec(str(folder)), out)[1] == []
    (folder / "model.safetensors").write_bytes(b"\1" * 64)  # same name, same size, new weights
    with pytest.raises(KvrlError, match="model weights folder:"):
        plan_resume(eval_spec(str(folder)), out)
    assert len(plan_resume(eval_spec(str(folder)), out, recompute=True)[1]) == 2


def test_a_new_version_or_commit_is_not_resumed(tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "model")
    out = tmp_path / "out"
    finish_grid(eval_spec(str(folder)), out)
    monkeypatch.setattr(kvpress_rl, "__version__", "99.0.0")  # a bumped release
    with pytest.raises(KvrlError, match=r"kvrl version \S+ -> 99\.0\.0"):
        plan_resume(eval_spec(str(folder)), out)
    monkeypatch.undo()
    _checkout_identity.cache_clear()
    # another commit of the same version
    monkeypatch.setattr("kvpress_rl.identity._checkout_identity", lambda: "git:0123456789ab")
    with pytest.raises(KvrlError, match=r"kvrl version .* -> .*\+git:0123456789ab"):
        plan_resume(eval_spec(str(folder)), out)


def test_selected_heads_are_cached_per_weights(tmp_path):
    folder = model_folder(tmp_path / "model")
    spec = eval_spec(str(folder))
    ((name, entry),) = spec.strategies
    before = selection_key(spec, name, entry, 0)
    (folder / "model.safetensors").write_bytes(b"\2" * 64)
    assert selection_key(eval_spec(str(folder)), name, entry, 0) != before


def test_file_digests_follow_the_content_and_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRL_CACHE_DIR", str(tmp_path / "cache"))
    big = tmp_path / "weights.bin"
    big.write_bytes(b"a" * (1 << 20))
    first = file_digest(big)
    cached = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert cached[str(big.resolve())][2] == first  # hashed once, then read back by size and mtime
    big.write_bytes(b"b" * (1 << 20))
    assert file_digest(big) != first


def test_folder_digest_covers_every_file_but_cards(tmp_path):
    folder = model_folder(tmp_path / "model")
    before = folder_digest(folder)
    (folder / "README.md").write_text("new card")
    assert folder_digest(folder) == before
    (folder / "tokenizer.json").write_text("{}")
    assert folder_digest(folder) != before
    assert weights_identity(str(folder)) == f"folder:{folder_digest(folder)}"
    assert weights_identity("random:qwen2") == "random:qwen2"


def test_an_uncached_hub_id_offline_is_unresolved(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_identity("nobody/no-such-model-kvrl-test") == "hub:nobody/no-such-model-kvrl-test@unresolved"


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_git_identity_names_the_commit_and_uncommitted_source_changes(tmp_path):
    root = tmp_path / "repo"
    (root / "kvpress_rl").mkdir(parents=True)
    (root / "kvpress_rl" / "plan.py").write_text("x = 1\n")
    (root / "README.md").write_text("docs\n")
    git(root, "init", "-q")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_identity(root)
    assert clean is not None and clean.startswith("git:") and "dirty" not in clean
    (root / "README.md").write_text("more docs\n")  # not code: same identity
    assert git_identity(root) == clean
    (root / "kvpress_rl" / "plan.py").write_text("x = 2\n")
    dirty = git_identity(root)
    assert dirty.startswith(clean + "+dirty:")
    (root / "kvpress_rl" / "plan.py").write_text("x = 3\n")
    assert git_identity(root) not in (clean, dirty)  # two uncommitted states never look the same
    (root / "kvpress_rl" / "plan.py").write_text("x = 1\n")
    (root / "kvpress_rl" / "new.py").write_text("y = 1\n")  # an untracked module counts too
    assert git_identity(root).startswith(clean + "+dirty:")


def test_the_code_identity_starts_with_the_version():
    assert code_identity().startswith(kvpress_rl.__version__)
