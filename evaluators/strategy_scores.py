"""Where a strategy's head scores come from in an evaluation: a `--heads` file, an earlier `select` cached in the
output folder, or the strategy's `select` (strategies that do not train; evaluation never trains)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kvpress_rl.distributed import is_main_process
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.grid_spec import GridSpec
from kvpress_rl.evaluators.tasks import data_dir_from
from kvpress_rl.hub import is_hub_ref
from kvpress_rl.identity import code_identity, file_digest
from kvpress_rl.models import ModelShape, model_id
from kvpress_rl.plugins import StrategyEntry
from kvpress_rl.scores import SCORES_FILE, HeadScores
from kvpress_rl.selector import SelectionContext


def training_refusal(name: str, heads_argument: str) -> KvrlError:
    """A strategy whose `select` is a training run, asked for scores without a scores file. `heads_argument` is how
    the caller takes one: `--heads NAME=` on the command line, `heads=` as an lm-eval model argument."""
    return KvrlError(f"strategy {name!r} trains its scores (minutes to hours, with progress and checkpoints in "
                     f"`kvrl select`): run `kvrl select --strategy {name} --output heads-{name}.safetensors` first, "
                     f"then pass {heads_argument}heads-{name}.safetensors")


def strategy_scores(entry: StrategyEntry, name: str, model: Any, tokenizer: Any, *, heads: str | None = None,
                    seed: int = 0, data_dir: str | None = None, cache: Path | None = None,
                    heads_argument: str | None = None) -> HeadScores:
    """The scores of strategy `name` for `model`: from the file `heads`, else from `cache` when an earlier run wrote
    it, else by running its `select` (written to `cache`); a strategy that trains is refused without `heads`."""
    if heads:
        scores = HeadScores.load(heads)
    elif cache is not None and cache.is_file():
        scores = HeadScores.load(cache)
    elif entry.cls.trains:
        raise training_refusal(name, heads_argument or f"--heads {name}=")
    else:
        context = SelectionContext(seed=seed, data_dir=data_dir, model_id=model_id(model))
        scores = entry.cls().select(model, tokenizer, context)
        if cache is not None and is_main_process():
            scores.save(cache, overwrite=True)
    check_fits(name, scores, model)
    return scores


def check_fits(name: str, scores: HeadScores, model: Any) -> None:
    try:
        scores.check_shape(ModelShape.from_config(model.config))
    except KvrlError as err:
        raise KvrlError(f"heads of {name!r} do not fit this model: {err}") from None


def load_heads(spec: GridSpec) -> dict[str, HeadScores]:
    """Every `--heads` file loaded (exists, readable) before the model loads."""
    return {name: HeadScores.load(path) for name, path in spec.heads.items()}


def check_head_shapes(spec: GridSpec, model: Any) -> None:
    """`--heads` files made for another model shape: refused after the model loads, before any cell runs."""
    for name, scores in load_heads(spec).items():
        check_fits(name, scores, model)


def heads_identity(heads: str) -> str:
    """What identifies a `--heads` value in a cell's definition: the content hash of the scores file (a folder's
    `head_scores.safetensors`), or the `hf://` reference itself (pin a revision with `@REV` to make it exact)."""
    if is_hub_ref(heads):
        return str(heads)
    path = Path(heads)
    return f"file:{file_digest(path / SCORES_FILE if path.is_dir() else path)}"


def short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def selection_key(spec: GridSpec, name: str, entry: StrategyEntry, seed: int) -> str:
    """What a `select` run inside the grid depends on: its cached scores are kept per key (so per model)."""
    data_dir = data_dir_from(spec.data_dir)
    return short_hash({"model": spec.model, "weights": spec.weights, "dtype": spec.dtype, "strategy": name,
                       "strategy_version": entry.cls.version, "seed": seed,
                       "data_dir": str(data_dir.resolve()) if data_dir else None, "kvrl": code_identity()})


def scores_path(spec: GridSpec, out: Path, *, name: str, entry: StrategyEntry, seed: int) -> str:
    """Where a strategy's scores come from: its `--heads`, else the file a grid in `out` caches its `select` in."""
    if name in spec.heads:
        return spec.heads[name]
    return str(out / "heads" / f"{name}-seed{seed}-{selection_key(spec, name, entry, seed)}.safetensors")


def scores_for(spec: GridSpec, out: Path, *, name: str, entry: StrategyEntry, seed: int, model: Any,
               tokenizer: Any) -> HeadScores:
    """`strategy_scores` in a grid writing to `out`: `--heads`, else the `select` cached there for this model."""
    cache = None if name in spec.heads else Path(scores_path(spec, out, name=name, entry=entry, seed=seed))
    return strategy_scores(entry, name, model, tokenizer, heads=spec.heads.get(name), seed=seed,
                           data_dir=spec.data_dir, cache=cache)
