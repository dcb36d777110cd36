"""A head pattern as an artifact people share: one folder with the scores, a `config.json` and a model card.

The folder (written by `write_pattern`, for `kvrl export`):

- `head_scores.safetensors`: the scores and their provenance, as `HeadScores.save` writes them
  (`HeadScores.load(FOLDER)` and `--heads FOLDER` read it);
- `config.json`: model id, layers x KV heads, strategy, its version and options, data, seed, wall time,
  the kvpress-rl version that exported it and the source it was exported from;
- `README.md`: a Hugging Face model card written from the provenance: how it was made, the training
  curve (when a training log lies beside the scores), the gate heat map, and the plan at a few
  sparsities with its KV memory;
- `gates.png` and, with a training log, `training.png`.

It is written into a temporary sibling folder and renamed into place: complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvpress_rl
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.model_card import CARD_DTYPE, CURVE_FILE, HEATMAP_FILE, model_card, pattern_name
from kvpress_rl.evaluators.plots import gate_heatmap, training_curves
from kvpress_rl.hub import is_hub_ref
from kvpress_rl.io import STALE_AFTER_S, check_folder_writable, stale_leftovers
from kvpress_rl.plan import ESTIMATE_HEAD_DIM, ESTIMATE_SEQ_LEN, plan_from_scores
from kvpress_rl.scores import CARD_FILE, CONFIG_FILE, SCORES_FILE, HeadScores

FORMAT = "kvpress_rl.HeadPattern/1"
TRAIN_LOG = "train_log.jsonl"  # in the work folder `kvrl select` keeps beside its output: OUTPUT.run/
SPARSITIES = (0.2, 0.4, 0.5, 0.6, 0.8)


# --- inputs --------------------------------------------------------------------------------------
def training_log_of(heads: str | Path) -> Path | None:
    """`HEADS.run/train_log.jsonl` (the work folder `kvrl select` keeps beside a scores file), if it exists."""
    path = Path(heads)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    log = path.with_suffix(".run") / TRAIN_LOG
    return log if log.is_file() else None


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """The records of a training log, refused in one line where a record is not what `training_curves` plots."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise KvrlError(f"cannot read the training log {path}: "
                        f"{getattr(err, 'strerror', None) or type(err).__name__}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not all(_number(record.get(key))
                                                   for key in ("step", "mean_reward", "mean_alpha")):
            raise KvrlError(f"{path} line {number} is not a training-log record (JSON with numbers step, mean_reward "
                            "and mean_alpha); repair or move the log")
        records.append(record)
    return records


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse an existing `folder` without `overwrite`, a file, a folder that is not a head pattern (it would be
    replaced whole), and a place that cannot be written. Checked before anything is written."""
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise KvrlError(f"{folder} is a file; --output names the folder to write")
        if not overwrite:
            raise KvrlError(f"{folder} exists; pass --overwrite to replace it")
        if any(folder.iterdir()) and not ((folder / CONFIG_FILE).is_file() or (folder / SCORES_FILE).is_file()):
            raise KvrlError(f"{folder} is not a head-pattern folder (no {CONFIG_FILE} or {SCORES_FILE}); --overwrite "
                            "replaces only an earlier export: choose another --output")
    check_folder_writable(folder.parent)


# --- contents ------------------------------------------------------------------------------------
def plan_rows(scores: HeadScores, seq_len: int, head_dim: int,
              sparsities: tuple[float, ...] = SPARSITIES) -> list[dict[str, Any]]:
    """The plan at each sparsity (`plan_from_scores`, the official rule): compressed heads and KV bytes for one
    sequence of `seq_len` tokens against the full cache."""
    rows = []
    for sparsity in sparsities:
        plan = plan_from_scores(scores, sparsity)
        kv, full = plan.kv_bytes(seq_len, head_dim=head_dim), plan.full_kv_bytes(seq_len, head_dim=head_dim)
        rows.append({"sparsity": sparsity, "compressed": plan.num_compressed, "heads": plan.full.numel(),
                     "kv_bytes": kv, "full_kv_bytes": full, "share": kv / full})
    return rows


def pattern_config(scores: HeadScores, source: str, *, seq_len: int, head_dim: int,
                   training_curve: bool) -> dict[str, Any]:
    layers, kv_heads = scores.shape
    return {
        "format": FORMAT,
        "model_id": scores.model_id,
        "layers": layers,
        "kv_heads": kv_heads,
        "strategy": scores.strategy,
        "strategy_version": scores.strategy_version,
        "options": scores.options,
        "kvpress_rl_version": kvpress_rl.__version__,
        "data": scores.data,
        "seed": scores.seed,
        "wall_time_s": scores.wall_time_s,
        "source": source,
        "extra": scores.extra,
        "files": {"scores": SCORES_FILE, "card": CARD_FILE, "gate_heatmap": HEATMAP_FILE,
                  "training_curve": CURVE_FILE if training_curve else None},
        "card": {"seq_len": seq_len, "head_dim": head_dim, "dtype": CARD_DTYPE, "sparsities": list(SPARSITIES)},
    }


# --- the folder ----------------------------------------------------------------------------------
def export_pattern(heads: str, output: str | Path, *, model_id: str | None = None, seq_len: int = ESTIMATE_SEQ_LEN,
                   head_dim: int = ESTIMATE_HEAD_DIM, overwrite: bool = False,
                   reference: str | None = None) -> tuple[Path, HeadScores]:
    """`kvrl export`: load `heads` (a scores file, a `.tsv`, a head-pattern folder or `hf://OWNER/REPO[@REVISION]`),
    set its model id (`model_id`, e.g. for a published TSV, whose provenance is empty) and write the folder
    `output`, with the training curve when `HEADS.run/train_log.jsonl` lies beside a local `heads`.
    Cheap checks come before the load (which may download): a refusal writes nothing."""
    output = Path(output)
    _check_sizes(seq_len, head_dim)
    check_output_folder(output, overwrite)
    if model_id is not None and not model_id.strip():
        raise KvrlError("--model-id is empty; give the model's hub id (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-7B)")
    scores = HeadScores.load(heads)
    if model_id is not None:
        scores = dataclasses.replace(scores, model_id=model_id.strip())
    hub = scores.extra.get("hub") if is_hub_ref(heads) else None
    source = f"hf://{hub['repo']}@{hub['revision']}" if isinstance(hub, dict) else str(heads)
    log = None if is_hub_ref(heads) else training_log_of(heads)
    written = write_pattern(scores, output, source=source, training_log=log, seq_len=seq_len, head_dim=head_dim,
                            overwrite=overwrite, reference=reference or output.name or str(output))
    return written, scores


def _check_sizes(seq_len: int, head_dim: int) -> None:
    for label, value in (("--seq-len", seq_len), ("--head-dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvrlError(f"{label} must be a positive whole number, got {value!r}")


def write_pattern(scores: HeadScores, output: str | Path, *, source: str, training_log: Path | None = None,
                  seq_len: int = ESTIMATE_SEQ_LEN, head_dim: int = ESTIMATE_HEAD_DIM, overwrite: bool = False,
                  reference: str | None = None) -> Path:
    """Write the head-pattern folder `output` (see the module docstring); every input is checked first, so a
    refusal writes nothing. `reference`: how the card names the folder (default: its path)."""
    output = Path(output)
    _check_sizes(seq_len, head_dim)
    training = read_training_log(training_log) if training_log is not None else None
    check_output_folder(output, overwrite)
    rows = plan_rows(scores, seq_len, head_dim)
    config = pattern_config(scores, source, seq_len=seq_len, head_dim=head_dim, training_curve=bool(training))
    card = model_card(scores, config, rows, training=training, training_log=training_log,
                      reference=reference or str(output))

    def write(folder: Path) -> None:
        scores.save(folder / SCORES_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
        gate_heatmap(scores, folder / HEATMAP_FILE,
                     title=f"{pattern_name(scores)} scores ({scores.model_id or 'model not recorded'})")
        if training:
            training_curves(training_log, folder / CURVE_FILE)
        (folder / CARD_FILE).write_text(card)

    return write_folder_atomic(output, write, overwrite=overwrite)


def write_folder_atomic(folder: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp_folder)` on a new sibling `.NAME.PID-RANDOM.tmp/`, then rename it onto `folder`.

    The folder is complete or absent. With `overwrite` an earlier folder is first moved aside
    (`.NAME.PID-RANDOM.old/`), removed once the new one is in place and put back if that fails. Temporary
    folders that killed writers left next to `folder` are removed first (see `kvpress_rl.io`)."""
    folder = Path(folder)
    check_output_folder(folder, overwrite)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_folders(folder)
        tmp = _new_sibling(folder, "tmp")
    except OSError as err:
        raise KvrlError(f"cannot write {folder}: {err.strerror or type(err).__name__}") from None
    old: Path | None = None
    try:
        write(tmp)
        if folder.exists() or folder.is_symlink():
            old = folder.parent / f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.old"
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if old is not None:
                os.rename(old, folder)  # the earlier folder back in place (should that fail, `old` is kept)
            raise
    except OSError as err:
        raise KvrlError(f"cannot write {folder}: {err.strerror or type(err).__name__}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:  # the new folder is in place: the earlier one goes
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def clean_stale_folders(folder: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove `.NAME.PID-RANDOM.tmp/` folders of killed writers (pid gone, or older than `older_than_s`), and their
    `.old/` folders once `folder` exists again (before that, one may hold the only copy). Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(\d+)-[0-9a-f]{{8}}\.(tmp|old)")
    removed = []
    for candidate, match in stale_leftovers(folder.parent, pattern, older_than_s):
        if not candidate.is_dir() or candidate.is_symlink() or (match.group(2) == "old" and not folder.is_dir()):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _new_sibling(folder: Path, kind: str) -> Path:
    """A new empty folder next to `folder`, with the mode a plain `mkdir` gives (it follows the umask)."""
    for _ in range(100):
        candidate = folder.parent / f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise KvrlError(f"cannot create a temporary folder next to {folder}")


# --- checks --------------------------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
