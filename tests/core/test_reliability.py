"""The library's refusals: files, scores, devices, seeds, model paths and plugins fail in one clear line."""

import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import save_file

import kvpress_rl.plugins as plugins
from kvpress_rl import HeadScores, HeadSelector, KvrlError, hookimpl
from kvpress_rl.io import check_writable, clean_stale_temporaries, write_atomic
from kvpress_rl.models import check_device, check_seed, load_model
from kvpress_rl.plugins import PluginWarning, discover_strategies


# --- atomic writes ------------------------------------------------------------------------------
def test_atomic_writes_follow_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        written = write_atomic(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        os.umask(0o002)
        group = write_atomic(tmp_path / "b.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == 0o644
    assert group.stat().st_mode & 0o777 == 0o664


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_left_by_killed_writers_are_removed_by_the_next_write(tmp_path):
    old = tmp_path / ".x.tsv.abcd1234.tmp"  # an older version's name, no pid: removed once older than an hour
    old.write_text("half")
    os.utime(old, (time.time() - 7200,) * 2)
    dead = tmp_path / f".x.tsv.{dead_pid()}-0123abcd.tmp"  # its writer was killed: removed at once
    dead.write_text("half")
    live = tmp_path / f".x.tsv.{os.getpid()}-0123abcd.tmp"  # a writer still at work: kept
    live.write_text("half")
    other = tmp_path / f".x.tsv.b.{dead_pid()}-0123abcd.tmp"  # another file's temporary: not this write's business
    other.write_text("half")
    HeadScores(torch.rand(2, 2)).to_tsv(tmp_path / "x.tsv")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "x.tsv"])
    assert clean_stale_temporaries(tmp_path / "x.tsv.b") == [other]


def test_writing_under_a_file_or_into_a_read_only_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KvrlError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "sub" / "x.safetensors", overwrite=False)
    with pytest.raises(KvrlError, match="cannot write"):
        HeadScores(torch.rand(2, 2)).save(tmp_path / "file" / "x.safetensors")
    with pytest.raises(KvrlError, match="is a folder"):
        check_writable(tmp_path, overwrite=True)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where nobody (root included) can create a file")
def test_a_read_only_folder_is_found_before_any_work():
    with pytest.raises(KvrlError, match="cannot write in /proc"):
        check_writable(__import__("pathlib").Path("/proc/kvrl-test.safetensors"), overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_a_folder_without_write_permission_is_found_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(KvrlError, match="cannot write in"):
            check_writable(folder / "x.safetensors", overwrite=False)
    finally:
        folder.chmod(0o755)


# --- head-scores files ----------------------------------------------------------------------------
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
    save_file({"scores": torch.rand(2, 2)}, str(path), metadata={"provenance": json.dumps({"seed": 7, "strategy": "x"})})
    loaded = HeadScores.load(path)
    assert loaded.seed == 7 and loaded.strategy == "x" and loaded.options == {}


# --- devices, seeds, model paths ---------------------------------------------------------------
def test_check_device_normalises_known_names_and_refuses_others(monkeypatch):
    assert check_device("cpu") == "cpu" and check_device(" CPU ") == "cpu"
    for bad in ("bogus", "cuda:x", "cpu:0", "cuda:-1", ""):
        with pytest.raises(KvrlError, match="unknown device") as caught:
            check_device(bad)
        assert "\n" not in str(caught.value) and "cpu, cuda, cuda:N" in str(caught.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KvrlError, match="no CUDA GPU"):
        check_device("cuda")
    with pytest.raises(KvrlError, match="no CUDA GPU"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda") == "cuda" and check_device("CUDA:01") == "cuda:1"
    with pytest.raises(KvrlError, match="2 CUDA GPU\\(s\\), cuda:0 to cuda:1"):
        check_device("cuda:2")


def test_seeds_must_fit_torch_and_numpy():
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 99999999999999999999999):
        with pytest.raises(KvrlError, match="0 <= seed < 2\\*\\*32"):
            check_seed(bad)


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "~/no-such-kvrl-model/x"])
def test_a_missing_model_path_is_called_a_missing_path(spec):
    with pytest.raises(KvrlError, match="the path does not exist") as caught:
        load_model(spec)
    assert "Repo id" not in str(caught.value)


# --- plugins ------------------------------------------------------------------------------------
class FakeEntryPoint:
    def __init__(self, name, dist, load):
        self.name, self.dist, self._load = name, types.SimpleNamespace(name=dist), load

    def load(self):
        return self._load()


def with_entry_points(monkeypatch, *extra):
    real = plugins.entry_points

    def fake(group):
        return [*real(group=group), *extra]

    monkeypatch.setattr(plugins, "entry_points", fake)


def exiting_import():
    sys.exit(0)


def test_a_plugin_that_exits_on_import_is_a_broken_plugin(monkeypatch):
    with_entry_points(monkeypatch, FakeEntryPoint("quitter", "kvrl-quitter", exiting_import))
    with pytest.warns(PluginWarning, match="'quitter' from kvrl-quitter failed to load.*SystemExit"):
        found = discover_strategies()
    assert "random" in found and "rlkv" in found


def test_keyboard_interrupt_in_a_plugin_still_stops_kvrl(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    with_entry_points(monkeypatch, FakeEntryPoint("ctrl-c", "kvrl-ctrl-c", interrupted))
    with pytest.raises(KeyboardInterrupt):
        discover_strategies()


def test_a_hook_that_exits_is_skipped():
    module = types.ModuleType("exiting_hook")

    @hookimpl
    def kvrl_strategies():
        raise SystemExit(3)

    module.kvrl_strategies = kvrl_strategies
    with pytest.warns(PluginWarning, match="exit-dist raised in kvrl_strategies.*SystemExit"):
        found = discover_strategies([("exit-dist", module)])
    assert "random" in found


class BadDescription(HeadSelector):
    name = "bad-description"
    description = 42


class BadHints(HeadSelector):
    name = "bad-hints"

    @__import__("dataclasses").dataclass
    class Options:
        depth: "NoSuchType" = 1  # noqa: F821


def test_a_strategy_class_that_cannot_be_listed_is_skipped():
    module = types.ModuleType("odd")

    @hookimpl
    def kvrl_strategies():
        return [BadDescription, BadHints]

    module.kvrl_strategies = kvrl_strategies
    with pytest.warns(PluginWarning) as caught:
        found = discover_strategies([("odd-dist", module)])
    messages = " ".join(str(w.message) for w in caught)
    assert "'bad-description' from odd-dist is unusable" in messages and "'bad-hints' from odd-dist is unusable" in messages
    assert "bad-description" not in found and "bad-hints" not in found
