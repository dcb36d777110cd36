"""Atomic file writes: a result file is either complete or absent, never half written."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from kvpress_rl.errors import KvrlError

# A writer's temporary file is `.NAME.PID-RANDOM.tmp` next to NAME. One left behind by a killed writer
# (its pid gone, or older than STALE_AFTER_S whatever its name) is removed by the next write of NAME.
STALE_AFTER_S = 3600.0


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an existing `path` without `overwrite`, and a `path` that cannot be written: under a file, in a
    read-only folder, or a folder itself. Checked before the work, so that nothing is lost at the end."""
    path = Path(path)
    if path.is_dir():
        raise KvrlError(f"{path} is a folder; name a file to write")
    if path.exists() and not overwrite:
        raise KvrlError(f"{path} exists; pass --overwrite to replace it")
    check_folder_writable(path.parent)


def check_folder_writable(folder: Path) -> None:
    """Refuse a folder that cannot be created or written in: a file on its path, or a read-only folder (or
    file system). The first existing folder on the way is probed by creating and removing a file in it."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise KvrlError(f"cannot write under {folder}: {existing} is a broken link")
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise KvrlError(f"cannot write under {folder}: {existing} is a file, not a folder")
    probe = existing / f".kvrl-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise KvrlError(f"cannot write in {existing}: {err.strerror or type(err).__name__}") from None
    os.close(fd)
    os.unlink(probe)


def _writer_alive(pid_text: str | None) -> bool | None:
    """Whether the writer with this pid still runs (None: no pid, a temporary of an older version)."""
    if not pid_text:
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def stale_leftovers(folder: Path, pattern: re.Pattern,
                    older_than_s: float = STALE_AFTER_S) -> list[tuple[Path, re.Match]]:
    """Entries of `folder` whose name matches `pattern` (group 1: the writer's pid, or None) left by a writer that is
    gone, or older than `older_than_s` whatever their writer: `(path, match)` pairs, for the caller to remove."""
    found = []
    now = time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            continue
        candidate = folder / name
        try:
            age = now - candidate.stat().st_mtime
        except OSError:
            continue
        if _writer_alive(match.group(1)) is False or age > older_than_s:
            found.append((candidate, match))
    return found


def clean_stale_temporaries(path: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporary files of `path` left by killed writers: the writer's pid is gone, or the file is
    older than `older_than_s`. Returns what was removed."""
    path = Path(path)
    # ours: `.NAME.PID-HEX8.tmp`; older versions (tempfile.mkstemp): `.NAME.XXXXXXXX.tmp`
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-[0-9a-f]{{8}}|[a-z0-9_]{{8}})\.tmp")
    removed = []
    for candidate, _ in stale_leftovers(path.parent, pattern, older_than_s):
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def _create_temporary(path: Path) -> Path:
    """A new empty temporary file next to `path`, with the mode a plain `open` would give (0666 less the umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise KvrlError(f"cannot create a temporary file next to {path}")


def write_atomic(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`.

    The file gets the permissions a plain `open` would give (it follows the umask); temporary files that
    killed writers left next to `path` are removed first.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise KvrlError(f"{path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        tmp = _create_temporary(path)
    except OSError as err:  # a file on the way, a read-only folder: one line, not a traceback
        raise KvrlError(f"cannot write {path}: {err.strerror or type(err).__name__}") from None
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
