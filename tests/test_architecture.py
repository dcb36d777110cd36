"""The layering of docs/architecture.md, checked on every import of every module (module level and inside functions)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kvpress_rl": "kvpress_rl", "strategies": "kvpress_rl.strategies", "evaluators": "kvpress_rl.evaluators",
           "engines": "kvpress_rl.engines", "cli": "kvpress_rl.cli"}
FLOORS = {"core": 0, "strategies": 1, "evaluators": 1, "engines": 1, "cli": 2}
INSTALLED_INSIDE = ("strategies", "evaluators", "engines", "cli")  # folders installed as kvpress_rl.<folder>

# Imported inside functions only: heavy modules a command may not need (start-up time), listed in
# docs/architecture.md ("Imports inside functions"; a test checks the two lists agree).
HEAVY = ("lm_eval", "matplotlib", "peft", "math_verify", "accelerate", "datasets", "transformers",
         "kvpress_rl.executor", "kvpress_rl.evaluators.harness", "kvpress_rl.embedded.evaluate",
         # vLLM and the plugin modules built on it: loaded when an engine starts (in vLLM's processes, through
         # `register()`)
         "vllm", "kvpress_rl.engines.vllm.backend", "kvpress_rl.engines.vllm.cache", "kvpress_rl.engines.vllm.models",
         "kvpress_rl.engines.vllm.gated", "kvpress_rl.engines.vllm.heads", "kvpress_rl.engines.vllm.cpu_full",
         "kvpress_rl.engines.vllm.vllm_compat")


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "kvpress_rl" and path.relative_to(ROOT / folder).parts[0] in INSTALLED_INSIDE:
                continue  # each floor is read once, from its own folder
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join([package, *parts]), path))
    return found


def floor_of(module: str) -> str:
    for name in INSTALLED_INSIDE:
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
        assert FLOORS[theirs] <= FLOORS[mine] and (theirs == mine or FLOORS[theirs] < FLOORS[mine]), \
            f"{module} imports {target}"
        if mine == "strategies" and theirs == "strategies" and strategy_of(target):
            assert strategy_of(target) == strategy_of(module), f"{module} imports another strategy: {target}"


@pytest.mark.parametrize("module, path", modules(), ids=lambda value: value if isinstance(value, str) else "")
def test_function_local_imports_are_only_for_heavy_modules(module, path):
    local = [target for target, inner in imports(path)
             if inner and not target.startswith(HEAVY) and module != "kvpress_rl.strategies"]
    assert not local, (f"{module} imports {', '.join(local)} inside a function; import it at the top (or add it to "
                       "HEAVY, with the reason)")


def test_cli_modules_form_no_cycle():
    cli = {module: {t for t, _ in imports(path) if t.startswith("kvpress_rl.cli")}
           for module, path in modules() if floor_of(module) == "cli"}
    for module, targets in cli.items():
        for target in targets:
            assert module not in cli.get(target, set()), f"{module} and {target} import each other"


ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGE_FOLDERS = ("kvpress_rl", *INSTALLED_INSIDE)


def defined_names(path: Path) -> set[str]:
    """The functions and classes a module defines, with `Class.method` (and `Class.attribute`) for their members."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names.add(f"{node.name}.{member.target.id}")
    return names


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_heavy_modules_are_the_ones_the_docs_list():
    paragraph = section(ARCHITECTURE.read_text(), "Imports inside functions")
    listed = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)`", paragraph))
    modules_listed = {name for name in listed if name in HEAVY or name.startswith("kvpress_rl.")}
    assert set(HEAVY) <= listed, f"docs/architecture.md does not list {sorted(set(HEAVY) - listed)}"
    assert modules_listed <= set(HEAVY) | {"kvpress_rl"}, f"not in HEAVY: {sorted(modules_listed - set(HEAVY))}"


def test_every_file_and_function_the_architecture_names_exists():
    """`path.py` names a file from the repository root (a bare `name.py`: a module of some package folder), and
    `path.py` `name` a function, class or `Class.method` defined in that file."""
    text = ARCHITECTURE.read_text()
    missing = []
    for path in set(re.findall(r"`([\w./-]+\.py)`", text)):
        bare_found = any(next((ROOT / folder).rglob(path), None) for folder in PACKAGE_FOLDERS)
        if not ((ROOT / path).is_file() or ("/" not in path and bare_found)):
            missing.append(path)
    for path, name in set(re.findall(r"`([\w/]+\.py)` `([A-Za-z_][\w.]*)", text)):
        if (ROOT / path).is_file() and name not in defined_names(ROOT / path):
            missing.append(f"{path} {name}")
    assert not missing, f"docs/architecture.md names what the code does not have: {sorted(missing)}"
