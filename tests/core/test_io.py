"""`kvpress_rl.io`: atomic writes, the temporaries of killed writers, and folders found unwritable before any work."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvpress_rl import HeadScores, KvrlError
from kvpress_rl.io import check_writable, clean_stale_temporaries, write_atomic


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


@pytest.mark.skipif(not os.path.isdir("/proc/self"),
                    reason="needs /proc, where nobody (root included) can create a file")
def test_a_read_only_folder_is_found_before_any_work():
    with pytest.raises(KvrlError, match="cannot write in /proc"):
        check_writable(Path("/proc/kvrl-test.safetensors"), overwrite=False)


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
