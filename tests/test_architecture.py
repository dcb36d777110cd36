"""The layering of docs/architecture.md, checked on every import of every module (module level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kvpress_rl": "kvpress_rl", "strategies": "kvpress_rl.strategies", "evaluators": "kvpress_rl.evaluators", "engines": "kvpress_rl.engines",
           "cli": "kvpress_rl.cli"}
FLOORS = {"core": 0, "strategies": 1, "evaluators": 1, "engines": 1, "cli": 2}

# Imported inside functions only: heavy modules a command may not need (start-up time), said once in docs/architecture.md.
HEAVY = ("lm_eval", "matplotlib", "peft", "math_verify", "accelerate", "datasets", "transformers", "kvpress_rl.executor",
         "kvpress_rl.evaluators.harness", "kvpress_rl.embedded.evaluate",
         # vLLM and the plugin modules built on it: loaded when an engine starts (in vLLM's processes, through `register()`)
         "vllm", "kvpress_rl.engines.vllm.backend", "kvpress_rl.engines.vllm.cache", "kvpress_rl.engines.vllm.models",
         "kvpress_rl.engines.vllm.gated", "kvpress_rl.engines.vllm.heads", "kvpress_rl.engines.vllm.cpu_full",
         "kvpress_rl.engines.vllm.vllm_compat")


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "kvpress_rl" and path.relative_to(ROOT / folder).parts[0] in ("strategies", "evaluators", "engines", "cli"):
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join([package, *parts]), path))
    return found


def floor_of(module: str) -> str:
    for name in ("strategies", "evaluators", "engines", "cli"):
        if module == f"kvpress_rl.{name}" or module.startswith(f"kvpress_rl.{name}."):
            return name
    return "core"


def imports(path: Path) -> list[tuple[str, bool]]:
    """`(imported module, inside a function)` for every import statement of the file."""
    tree = ast.parse(path.read_text())
    found = []
    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, inner))
            visit(child, inner)
    visit(tree, False)
    return found


def strategy_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "strategies" else None


@pytest.mark.parametrize("module, path", modules(), ids=lambda value: value if isinstance(value, str) else "")
def test_no_module_imports_a_higher_floor_or_a_sibling_strategy(module, path):
    mine = floor_of(module)
    for target, _ in imports(path):
        if not target.startswith("kvpress_rl"):
            continue
        theirs = floor_of(target)
        if module == "kvpress_rl.strategies" and theirs == "strategies":
            continue  # the built-in plugin hook lists the strategy classes
        assert FLOORS[theirs] <= FLOORS[mine] and (theirs == mine or FLOORS[theirs] < FLOORS[mine]), f"{module} imports {target}"
        if mine == "strategies" and theirs == "strategies" and strategy_of(target):
            assert strategy_of(target) == strategy_of(module), f"{module} imports another strategy: {target}"


@pytest.mark.parametrize("module, path", modules(), ids=lambda value: value if isinstance(value, str) else "")
def test_function_local_imports_are_only_for_heavy_modules(module, path):
    local = [target for target, inner in imports(path) if inner and not target.startswith(HEAVY) and module != "kvpress_rl.strategies"]
    assert not local, f"{module} imports {', '.join(local)} inside a function; import it at the top (or add it to HEAVY, with the reason)"


def test_cli_modules_form_no_cycle():
    cli = {module: {t for t, _ in imports(path) if t.startswith("kvpress_rl.cli")} for module, path in modules() if floor_of(module) == "cli"}
    for module, targets in cli.items():
        for target in targets:
            assert module not in cli.get(target, set()), f"{module} and {target} import each other"
