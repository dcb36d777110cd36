"""Helpers for tests that run `kvrl` as a user would: a subprocess, optionally with extra plugins installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvpress_rl.evaluators.cells import Cell, write_grid
from kvpress_rl.evaluators.resume import cell_definition, plan_resume
from kvpress_rl.evaluators.tasks import resolve_tasks

KVRL = str(Path(sys.executable).parent / "kvrl")


def run_kvrl(*args: str, cwd: Path | None = None, pythonpath: Path | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([KVRL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pip_install_target(source: Path, target: Path) -> None:
    """Install a distribution the way a user would, into `target` (kept off the test environment)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)],
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


def only_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused `kvrl` subprocess prints: exit 2, no traceback, the message shown once."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stdout + result.stderr
    return errors[0]


def error_line(result) -> str:
    """The last line of a refused in-process `kvrl` run (click's CliRunner): exit 2, no traceback, the message
    shown once."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in lines) == 1, result.output
    return lines[-1]


def tiny_model_and_tokenizer(**config):
    """A random Llama over a character vocabulary: its samples are random digit strings, so rewards vary (`config`:
    fields of `small_config` to change)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kvpress_rl.models import random_model, small_config

    chars = list("0123456789+=? ") + ["<pad>", "<eos>"]
    raw = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="?"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    model = random_model(small_config("llama", vocab_size=len(chars), num_hidden_layers=2, **config), seed=0)
    return model, tokenizer


def finish_grid(spec, out: Path) -> list[Cell]:
    """Write `out/grid.csv` as if every cell of `spec` (one task) had run, each row with its definition."""
    (config,) = resolve_tasks(spec)
    cells = []
    for pending in plan_resume(spec, out)[1]:
        setting = pending.setting
        cell = Cell(task=config.name, strategy=setting.strategy, sparsity=setting.sparsity, seed=setting.seed,
                    accuracy=0.5, correct=2, total=4, kv_fraction=1.0, decode_tokens_per_s=10.0)
        cell.definition = json.dumps(cell_definition(spec, config, setting), sort_keys=True)
        cells.append(cell)
    write_grid(out / "grid.csv", cells)
    return cells
