"""`ruff check` on the whole tree, with the rules and line length of pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str] | None:
    """The ruff next to this interpreter, else the one on PATH; None where ruff is not installed."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    return [found] if found else None


RUFF = ruff_command()


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_is_clean():
    result = subprocess.run([*RUFF, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
