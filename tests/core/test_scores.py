import json
import os
import stat
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.errors
import pytest
import torch
from safetensors.torch import save_file

from kvpress_rl import HeadScores, KvrlError, ModelShape
from kvpress_rl.hub import HubRef, is_hub_ref, parse_hub_ref
from kvpress_rl.scores import SCORES_FILE


def make_scores(**extra):
    return HeadScores(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 12, model_id="m", strategy="random",
                      strategy_version="1", options={"a": 1}, data="d", seed=7, wall_time_s=0.5, extra=extra)


def test_safetensors_round_trip_keeps_scores_and_provenance(tmp_path):
    scores = make_scores(reward_curve=[0.1, 0.2])
    path = scores.save(tmp_path / "s.safetensors")
    loaded = HeadScores.load(path)
    assert torch.equal(loaded.scores, scores.scores)
    assert loaded.provenance() == json.loads(json.dumps(scores.provenance()))


def test_tsv_round_trip(tmp_path):
    scores = make_scores()
    loaded = HeadScores.load(scores.to_tsv(tmp_path / "s.tsv"))
    assert torch.equal(loaded.scores, scores.scores)


@pytest.mark.parametrize("model,shape", [("Llama-3.1-8B-R1", (32, 8)), ("Qwen-2.5-7B-R1", (28, 4)),
                                         ("Qwen-3-4B-Thinking", (36, 8))])
@pytest.mark.parametrize("name", ["rlkv.tsv", "duo_attention.tsv"])
def test_published_patterns_load_as_they_are(head_patterns, model, shape, name):
    assert HeadScores.load(head_patterns / model / name).shape == shape


def test_shape_check_refuses_another_model():
    with pytest.raises(KvrlError, match="3 layers x 4 KV heads.*28 x 4"):
        make_scores().check_shape(ModelShape(28, 4, 28, 128))


def test_missing_and_corrupted_files_are_clear_errors(tmp_path):
    with pytest.raises(KvrlError, match="not found"):
        HeadScores.load(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(KvrlError, match="not a readable head-scores file"):
        HeadScores.load(bad)
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(KvrlError, match="same number of columns"):
        HeadScores.load(ragged)
    words = tmp_path / "words.tsv"
    words.write_text("a\tb\n")
    with pytest.raises(KvrlError, match="not a TSV of numbers"):
        HeadScores.load(words)


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path):
    path = make_scores().save(tmp_path / "s.safetensors")
    before = path.read_bytes()
    with pytest.raises(KvrlError, match="exists"):
        HeadScores(torch.zeros(3, 4)).save(path)
    assert path.read_bytes() == before
    HeadScores(torch.zeros(3, 4)).save(path, overwrite=True)
    assert torch.equal(HeadScores.load(path).scores, torch.zeros(3, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_rejects_non_matrix_and_non_finite_scores():
    with pytest.raises(KvrlError):
        HeadScores(torch.zeros(4))
    with pytest.raises(KvrlError):
        HeadScores(torch.tensor([[float("nan")]]))


# --- head-pattern folders and hf:// references (kvrl export) ------------------------------------------------

def test_a_folder_loads_its_head_scores_file(tmp_path):
    scores = make_scores()
    scores.save(tmp_path / "pattern" / SCORES_FILE)
    loaded = HeadScores.load(tmp_path / "pattern")
    assert torch.equal(loaded.scores, scores.scores) and loaded.provenance() == scores.provenance()
    assert torch.equal(HeadScores.load(str(tmp_path / "pattern") + "/").scores, scores.scores)


def test_a_folder_without_head_scores_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvrlError, match=r"^\S*empty is a folder without head_scores.safetensors; pass a head-pattern "
                                        r"folder") as err:
        HeadScores.load(tmp_path / "empty")
    assert "\n" not in str(err.value)


def test_save_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = make_scores().save(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("text, repo, revision", [
    ("hf://owner/repo", "owner/repo", None),
    ("hf://owner/repo/", "owner/repo", None),
    ("hf://owner/repo@main", "owner/repo", "main"),
    ("hf://Owner-1/my.repo_2@0123456789abcdef0123456789abcdef01234567", "Owner-1/my.repo_2",
     "0123456789abcdef0123456789abcdef01234567"),
    ("hf://owner/repo@refs/pr/3", "owner/repo", "refs/pr/3"),
    # a Path folds `//` into `/` (click.Path options): still a hub reference
    (Path("hf://owner/repo"), "owner/repo", None),
])
def test_hub_references_parse(text, repo, revision):
    assert is_hub_ref(text)
    assert parse_hub_ref(text) == HubRef(repo, revision)
    assert str(HubRef(repo, revision)) == f"hf://{repo}" + (f"@{revision}" if revision else "")


@pytest.mark.parametrize("text", ["hf://repo", "hf://a/b/c", "hf://a/b@", "hf://../b", "hf://a/..b", "hf://a--b/c",
                                  "hf:///b", "hf://a/b c"])
def test_bad_hub_references_are_one_line(text):
    with pytest.raises(KvrlError, match="expected hf://OWNER/REPO or hf://OWNER/REPO@REVISION"):
        HeadScores.load(text)


def test_local_paths_are_not_hub_references():
    assert not is_hub_ref("heads.safetensors") and not is_hub_ref("hf.tsv") and not is_hub_ref("./hf://x")


def test_hf_reference_offline_is_one_line_that_says_what_to_do(monkeypatch):
    """HF_HUB_OFFLINE=1: the local cache is looked in (no network), and a folder not there is refused at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(KvrlError) as err:
        HeadScores.load("hf://kvpress-rl-tests/no-such-pattern@v1")
    assert time.perf_counter() - started < 30
    message = str(err.value)
    assert message.startswith("cannot download hf://kvpress-rl-tests/no-such-pattern@v1: the Hugging Face hub is "
                              "offline here (HF_HUB_OFFLINE=1) and the folder is not in the local cache")
    assert "hf download kvpress-rl-tests/no-such-pattern --revision v1 --local-dir DIR" in message
    assert message.endswith("pass DIR")
    assert "\n" not in message


def fake_snapshot(tmp_path, monkeypatch, scores=None, commit="0123456789abcdef0123456789abcdef01234567"):
    """A stand-in for `huggingface_hub.snapshot_download` (no download can happen here): it returns a local folder
    laid out like a cache snapshot, `.../snapshots/COMMIT/`, and records how it was called."""
    folder = tmp_path / "cache" / "snapshots" / commit
    folder.mkdir(parents=True)
    if scores is not None:
        scores.save(folder / SCORES_FILE)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hf_reference_loads_the_snapshot_and_pins_its_commit(tmp_path, monkeypatch):
    """The success path with `huggingface_hub.snapshot_download` monkeypatched to return a local folder (a real
    download cannot run here): the scores load, and `extra["hub"]` records the repository and the commit hash."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scores = make_scores(note="kept")
    calls = fake_snapshot(tmp_path, monkeypatch, scores)
    loaded = HeadScores.load("hf://owner/pattern@main")
    assert torch.equal(loaded.scores, scores.scores) and loaded.model_id == "m" and loaded.extra["note"] == "kept"
    assert loaded.extra["hub"] == {"repo": "owner/pattern", "revision": "0123456789abcdef0123456789abcdef01234567"}
    ((repo, kwargs),) = calls
    assert repo == "owner/pattern" and kwargs["revision"] == "main"
    assert sorted(kwargs["allow_patterns"]) == ["README.md", "config.json", "head_scores.safetensors"]
    assert kwargs["local_files_only"] is True  # HF_HUB_OFFLINE=1: the local cache only
    assert HeadScores.load(Path("hf://owner/pattern")).extra["hub"]["repo"] == "owner/pattern"


def test_hf_reference_without_head_scores_is_refused(tmp_path, monkeypatch):
    fake_snapshot(tmp_path, monkeypatch, scores=None)
    with pytest.raises(KvrlError, match=r"^hf://owner/readme-only holds no head_scores.safetensors: it is not a "
                                        r"head-pattern folder"):
        HeadScores.load("hf://owner/readme-only")


def test_hf_reference_without_network_is_one_line(monkeypatch):
    """Not offline by setting, but the hub cannot be reached: snapshot_download (monkeypatched, as it fails without a
    network) raises huggingface_hub's LocalEntryNotFoundError."""
    def unreachable(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("An error happened while trying to locate the files on "
                                                             "the Hub\nPlease check")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(KvrlError, match=r"^cannot download hf://a/b: the Hugging Face hub cannot be reached \(no "
                                        r"network\?\) and the folder is not in the local cache; download the folder "
                                        r"where the hub is reachable") as err:
        HeadScores.load("hf://a/b")
    assert "\n" not in str(err.value)


def test_a_missing_hub_repository_is_one_line_without_the_download_hint(monkeypatch):
    """snapshot_download (monkeypatched) raises as for a repository that does not exist: no advice to download it
    elsewhere."""
    response = type("Response", (),
                    {"status_code": 404, "headers": {}, "request": None, "url": "https://huggingface.co"})()

    def missing(repo_id, **kwargs):
        raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(KvrlError) as err:
        HeadScores.load("hf://owner/absent")
    assert str(err.value) == ("cannot download hf://owner/absent: no such model repository, or it is private or gated "
                              "(log in with `hf auth login`)")


def test_a_tsv_of_random_bytes_is_refused_in_one_line(tmp_path):
    path = tmp_path / "noise.tsv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(KvrlError, match="not a TSV of numbers"):
        HeadScores.load(path)


def test_an_empty_tsv_is_called_empty(tmp_path):
    for text in ("", "\n\n  \n"):
        (tmp_path / "e.tsv").write_text(text)
        with pytest.raises(KvrlError, match="is empty"):
            HeadScores.load(tmp_path / "e.tsv")


@pytest.mark.parametrize("provenance", ["5", "[1, 2]", '"model_id"', "null"])
def test_provenance_that_is_not_a_json_object_is_refused(tmp_path, provenance):
    path = tmp_path / "p.safetensors"
    save_file({"scores": torch.rand(2, 2)}, str(path), metadata={"provenance": provenance})
    with pytest.raises(KvrlError, match="not a JSON object"):
        HeadScores.load(path)


def test_provenance_fields_of_the_wrong_type_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file({"scores": torch.rand(2, 2)}, str(path), metadata={"provenance": json.dumps({"options": 3, "seed": 1})})
    with pytest.raises(KvrlError, match="'options' should be dict, got int"):
        HeadScores.load(path)
    save_file({"scores": torch.rand(2, 2)}, str(path),
              metadata={"provenance": json.dumps({"seed": 7, "strategy": "x"})})
    loaded = HeadScores.load(path)
    assert loaded.seed == 7 and loaded.strategy == "x" and loaded.options == {}
