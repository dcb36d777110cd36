"""vLLM for the engine tests: installed by the `vllm` extra (CI installs it; elsewhere the tests skip with the command).

Engines run their core in the test process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): no child process outlives a test,
and the scheduler's KV-cache configuration can be read directly. Every engine is closed by its fixture.
"""

from __future__ import annotations

import os

import pytest


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        message = f"vLLM is not installed ({err}); run `pip install -e '.[test,vllm]'` (README) to run the engine tests"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def in_process_engines():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    yield


@pytest.fixture
def vllm_installed():
    require_vllm()


def tiny_folder(tmp_path_factory, arch: str, seed: int = 0, **overrides):
    """A random-weight checkpoint small enough for every test (head size 32: vLLM's CPU attention needs >= 32)."""
    from kvpress_rl.models import random_model, small_config

    fields = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2,
                  vocab_size=512)
    fields.update(overrides)
    model = random_model(small_config(arch, **fields), seed=seed)
    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(folder)
    return model, str(folder)
