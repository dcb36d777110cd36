"""One writer at a time into an output folder, and an output folder that cannot take files refused in one line."""

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.output_lock import lock_output


def test_one_writer_per_output_folder(tmp_path):
    held = lock_output(tmp_path / "out")
    with pytest.raises(KvrlError, match="being written by another `kvrl eval`"):
        lock_output(tmp_path / "out")
    held.close()
    lock_output(tmp_path / "out").close()


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KvrlError, match="not writable"):
        lock_output(tmp_path / "file" / "out")
    with pytest.raises(KvrlError, match="is a file"):
        lock_output(tmp_path / "file")
