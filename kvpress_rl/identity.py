"""What made a result: an identity of the model's weights and of kvpress-rl's code.

Every grid cell records both (`kvrl eval` resumes a cell only when they are today's), and so does the key of
the heads a grid selects itself. A name is not an identity: the embedded model is `embedded` whatever adapter
it carries, a folder keeps its name when its weights are replaced, a hub id moves with its main branch.

- weights: the embedded model -> its adapter's and its GGUF's content hashes; a local folder -> a hash of
  its files (weights, config, tokenizer); a `.gguf` file -> its content hash; a hub id -> the commit it
  resolves to; `random:ARCH` -> itself (built by the code from a fixed seed).
- code: the package version and, in a git checkout, the commit and a hash of uncommitted changes to the
  package's sources (a release build: its version alone).

Content hashes of large files are cached by (path, size, mtime) in `KVRL_CACHE_DIR/digests.json`, so a
16 GB folder is read once, not at every command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

import kvpress_rl
from kvpress_rl.embedded import model as embedded
from kvpress_rl.errors import KvrlError
from kvpress_rl.hub import model_commit

DIGEST_CACHE = "digests.json"
RANDOM_PREFIX = "random:"
# what makes results; docs and tests do not
SOURCE_PATHS = ("kvpress_rl", "strategies", "evaluators", "engines", "cli", "pyproject.toml")
SKIPPED_SUFFIXES = (".md",)  # a model folder's card does not change what the model computes


def _cache_file() -> Path:
    return embedded.cache_root() / DIGEST_CACHE


def _read_cache() -> dict[str, list]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: str, entry: list) -> None:
    """Add one digest to the cache file (best effort: a read-only cache costs a re-hash, nothing else)."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


CACHED_FROM_BYTES = 1 << 20  # smaller files hash faster than the cache file is read


@functools.lru_cache(maxsize=1024)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    large = size >= CACHED_FROM_BYTES
    cached = _read_cache().get(path) if large else None
    if cached and cached[:2] == [size, mtime_ns]:
        return cached[2]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()[:16]
    if large:
        _remember(path, [size, mtime_ns, value])
    return value


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (first 16 hex digits), cached per (path, size, mtime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _hash_file(str(resolved), stat.st_size, stat.st_mtime_ns)


def folder_digest(folder: str | Path) -> str:
    """A hash of a model folder: the name and content hash of every file in it (sub-folders included; hidden
    files and `.md` cards left out)."""
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and p.suffix not in SKIPPED_SUFFIXES)
    if not files:
        raise KvrlError(f"model folder {root} holds no files")
    listing = [(p.relative_to(root).as_posix(), file_digest(p)) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def embedded_identity() -> str:
    """The embedded model: the hashes of the shipped adapter and of the GGUF it is merged into."""
    adapter = embedded.ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter.is_file():
        raise KvrlError(f"no trained adapter at {embedded.ADAPTER_DIR}; train one with `kvrl embedded train`")
    return f"embedded:adapter={file_digest(adapter)},gguf={file_digest(embedded.smollm2_gguf())}"


def weights_identity(model: str) -> str:
    """What identifies the weights behind a `--model` value (see the module docstring)."""
    if model == embedded.EMBEDDED_MODEL:
        return embedded_identity()
    if model.startswith(RANDOM_PREFIX):
        return model
    path = Path(model).expanduser()
    if path.is_file():
        return f"file:{file_digest(path)}"
    if path.is_dir():
        return f"folder:{folder_digest(path)}"
    commit = model_commit(model)
    return f"hub:{model}@{commit}" if commit else f"hub:{model}@unresolved"


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode(errors="replace") if done.returncode == 0 else None


def source_root() -> Path | None:
    """The git checkout the package runs from (an editable install), or None (a release build)."""
    root = Path(kvpress_rl.__file__).resolve().parent.parent
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def git_identity(root: Path) -> str | None:
    """`git:COMMIT` of a checkout, with `+dirty:HASH` when the package's sources differ from it (the hash of the
    diff and of untracked source files, so two different uncommitted states never look the same); None if git
    cannot tell."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *SOURCE_PATHS)
    if commit is None or status is None:
        return None
    identity = f"git:{commit.strip()[:12]}"
    if status.strip():
        digest = hashlib.sha256((_git(root, "diff", "HEAD", "--", *SOURCE_PATHS) or "").encode())
        for line in sorted(status.splitlines()):
            if line.startswith("??"):
                untracked = root / line[3:].strip()
                digest.update(line.encode())
                if untracked.is_file():
                    digest.update(untracked.read_bytes())
        identity += f"+dirty:{digest.hexdigest()[:8]}"
    return identity


@functools.lru_cache(maxsize=1)
def _checkout_identity() -> str | None:
    root = source_root()
    return git_identity(root) if root is not None else None


def code_identity() -> str:
    """`VERSION` for a release build, `VERSION+git:COMMIT[+dirty:HASH]` in a checkout (git asked once per process)."""
    git = _checkout_identity()
    return f"{kvpress_rl.__version__}+{git}" if git else kvpress_rl.__version__
