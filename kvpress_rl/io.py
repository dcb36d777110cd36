"""Atomic file writes: a result file is either complete or absent, never half written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvpress_rl.errors import KvrlError


def check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise KvrlError(f"{path} exists; pass --overwrite to replace it")


def write_atomic(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`."""
    path = Path(path)
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
