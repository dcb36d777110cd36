"""benchmarks/plan_attention_gpu.py, the GPU check of compressed heads' attention, at its CPU smoke size: it agrees
with dense masked attention and fails loudly when it does not."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plan_attention_gpu.py"


def run(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr().out


def test_the_smoke_run_agrees_with_the_reference(monkeypatch, capsys):
    out = run(monkeypatch, capsys, "--smoke", "--device", "cpu", "--dtype", "float32")
    lines = [line for line in out.splitlines() if line.startswith("R=")]
    assert len(lines) == 2 and all(float(line.split("max |error| ")[1].split(";")[0]) < 1e-4 for line in lines)


def test_a_wrong_attention_fails_the_check(monkeypatch, capsys):
    import kvpress_rl.engines.vllm.kept_attention as kept

    real = kept.decode_over_kept
    def wrong(keys, values, query, valid, scale, group):
        return real(keys, values, query, valid, 2 * scale, group)

    monkeypatch.setattr(kept, "decode_over_kept", wrong)
    with pytest.raises(SystemExit, match="off the reference"):
        run(monkeypatch, capsys, "--smoke", "--device", "cpu", "--dtype", "float32")


def test_the_gated_smoke_run_agrees_with_the_reference(monkeypatch, capsys):
    """`--gated`: the gated model's step (full and streaming branches mixed by gates) against the mix of the two
    references, then timed against full attention."""
    out = run(monkeypatch, capsys, "--gated", "--smoke", "--device", "cpu", "--dtype", "float32")
    lines = [line for line in out.splitlines() if line.startswith("R=")]
    assert len(lines) == 2 and all("x full attention's time" in line for line in lines)
    assert all(float(line.split("max |error| ")[1].split(";")[0]) < 1e-4 for line in lines)


def test_a_wrong_mix_fails_the_gated_check(monkeypatch, capsys):
    import importlib

    gated = importlib.import_module("kvpress_rl.executor.gated")  # the module, not the package's `gated` function

    def unmixed(full, streaming, gates, *, groups, axis):
        return full

    monkeypatch.setattr(gated, "mix_branches", unmixed)
    with pytest.raises(SystemExit, match="gated"):
        run(monkeypatch, capsys, "--gated", "--smoke", "--device", "cpu", "--dtype", "float32")
