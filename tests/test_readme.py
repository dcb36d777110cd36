"""The README is executable documentation: its plugin example and its set-up commands are checked here."""

import ast
import builtins
import importlib
import re
import shlex
from pathlib import Path

import pytest

from kvpress_rl import HeadScores
from tests.helpers import pip_install_target, run_kvrl

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"


def fenced_files(text: str) -> dict[str, str]:
    """Code blocks whose fence names a file: ```python path/to/file.py"""
    return {m.group(2): m.group(3) for m in re.finditer(r"```(\w+) ([\w./-]+)\n(.*?)```", text, re.DOTALL)}


def bash_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"```bash\n(.*?)```", text, re.DOTALL)]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme-plugin")
    files = fenced_files(README.read_text())
    assert {"my-kvrl-plugin/pyproject.toml", "my-kvrl-plugin/my_kvrl_plugin.py"} <= set(files)
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    site = root / "site"
    pip_install_target(root / "my-kvrl-plugin", site)
    return site


def test_readme_plugin_is_listed_with_its_distribution(plugin_site):
    listing = run_kvrl("strategies", pythonpath=plugin_site)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "deep-layers" in line)
    assert "my-kvrl-plugin" in row and "head" in row
    detail = run_kvrl("strategies", "deep-layers", pythonpath=plugin_site)
    assert "--decay" in detail.stdout and "0.9" in detail.stdout


def test_readme_plugin_runs_through_select(plugin_site, tmp_path):
    result = run_kvrl("select", "--strategy", "deep-layers", "--model", "random:llama", "--decay", "0.5",
                      "--output", "deep.safetensors", cwd=tmp_path, pythonpath=plugin_site)
    assert result.returncode == 0, result.stderr
    scores = HeadScores.load(tmp_path / "deep.safetensors")
    assert scores.strategy == "deep-layers" and scores.options == {"decay": 0.5}
    assert scores.scores[:, 0].tolist() == [0.125, 0.25, 0.5, 1.0]  # the 4 layers of random:llama


def test_ci_runs_exactly_the_readme_commands():
    install, tests = bash_blocks(README.read_text())[:2]
    ci = CI_RUN.read_text()
    install_step = install.split(" && .venv/bin/kvrl")[0]
    assert install_step in ci
    assert tests in ci
    assert shlex.split(tests)[:2] == ["HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1"]


def test_readme_stays_a_users_page():
    """What it is, set-up, concepts, CLI, API, plugins and one short results table; the rest lives in docs/."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, (f"README.md has {len(lines)} lines, at most 250: move results and history to "
                               "docs/results.md")


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```python[^\n]*\n(.*?)```", text, re.DOTALL)]


def test_readme_python_examples_import_what_they_use():
    """Every name a README Python example uses is imported or defined in it, and its imports resolve."""
    for block in python_blocks(README.read_text()):
        tree = ast.parse(block)
        defined, used = set(dir(builtins)), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.Name):
                (defined if isinstance(node.ctx, ast.Store) else used).add(node.id)
        first_line = block.splitlines()[0]
        assert not used - defined, (f"README example starting {first_line!r} uses {sorted(used - defined)} "
                                    "without importing them")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"README example: {node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
