"""One `kvrl eval` at a time writes an output folder: `lock_output` holds `.kvrl-eval.lock` (flock) in it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO

from kvpress_rl.errors import KvrlError

OUTPUT_LOCK = ".kvrl-eval.lock"
LOCK_HELD_ENV = "KVRL_EVAL_LOCK_HELD"  # set by a launching process that holds the lock for its ranks


def check_output(out: Path) -> None:
    """The output folder exists (created) and takes files: refused with one line before the model loads."""
    if out.exists() and not out.is_dir():
        raise KvrlError(f"--output {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kvrl-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise KvrlError(f"--output {out} is not writable: {err.strerror or err}") from None


def lock_output(out: Path) -> TextIO:
    """Hold `out/.kvrl-eval.lock` (flock) for this process's lifetime, or refuse a second writer with one line.

    Returns the open lock file (keep it referenced; closing it releases the lock).
    """
    check_output(out)
    handle = (out / OUTPUT_LOCK).open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise KvrlError(f"{out} is being written by another `kvrl eval`{f' (pid {holder})' if holder else ''}; "
                        "wait for it to finish or pass another --output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
