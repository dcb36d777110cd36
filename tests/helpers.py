"""Helpers for tests that run `kvrl` as a user would: a subprocess, optionally with extra plugins installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KVRL = str(Path(sys.executable).parent / "kvrl")


def run_kvrl(*args: str, cwd: Path | None = None, pythonpath: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([KVRL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pip_install_target(source: Path, target: Path) -> None:
    """Install a distribution the way a user would, into `target` (kept off the test environment)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )


def write_distribution(root: Path, name: str, module: str, entry_name: str, code: str) -> Path:
    """A minimal distribution registering `module` under the `kvpress_rl` entry-point group."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=70.1"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "0.1.0"\n\n'
        f'[project.entry-points.kvpress_rl]\n{entry_name} = "{module}"\n\n'
        f'[tool.setuptools]\npy-modules = ["{module}"]\n'
    )
    (root / f"{module}.py").write_text(code)
    return root
