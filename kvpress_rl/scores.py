"""`HeadScores`: one score per (layer, KV head), higher = keep the full cache, plus provenance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from kvpress_rl.errors import KvrlError
from kvpress_rl.hub import download, is_hub_ref, parse_hub_ref
from kvpress_rl.io import write_atomic
from kvpress_rl.models import ModelShape

_FORMAT = "kvpress_rl.HeadScores/1"

# A head-pattern folder (`kvrl export`): the scores as `save` writes them, its config and its model card.
SCORES_FILE = "head_scores.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


@dataclass
class HeadScores:
    """Scores `[num_layers, num_kv_heads]` (float32) and where they came from.

    Saved as one `.safetensors` file (tensor `scores`, provenance as JSON in the metadata); reads and
    writes the published TSV form too (one row per layer, one tab-separated column per KV head).
    """

    scores: torch.Tensor
    model_id: str = ""
    strategy: str = ""
    strategy_version: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    seed: int | None = None
    wall_time_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = torch.as_tensor(self.scores).detach().to("cpu", torch.float32)
        if scores.ndim != 2 or scores.numel() == 0:
            raise KvrlError("head scores must be a non-empty [layers, kv_heads] matrix, got shape "
                            f"{tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise KvrlError("head scores contain NaN or infinite values")
        self.scores = scores.contiguous()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scores.shape[0], self.scores.shape[1])

    def check_shape(self, shape: ModelShape) -> None:
        """Refuse scores made for another model."""
        shape.check_heads_shape(self.shape, "head scores have")

    def provenance(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "strategy": self.strategy,
            "strategy_version": self.strategy_version,
            "options": self.options,
            "data": self.data,
            "seed": self.seed,
            "wall_time_s": self.wall_time_s,
            "extra": self.extra,
        }

    # --- safetensors -------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        metadata = {"format": _FORMAT, "provenance": json.dumps(self.provenance(), default=str)}
        # the bytes go into the temporary file write_atomic made (safetensors' save_file would replace it with a
        # 0600 file)
        data = safetensors_bytes({"scores": self.scores}, metadata=metadata)
        return write_atomic(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        """Load a `.safetensors` file written by `save`, a published `.tsv` pattern, a head-pattern folder
        (`kvrl export`: its `head_scores.safetensors`) or such a folder on the hub, `hf://OWNER/REPO[@REVISION]`
        (downloaded through the local cache; `extra["hub"]` records the repository and the commit it resolved to)."""
        if is_hub_ref(path):
            return cls.from_hub(str(path))
        path = Path(path)
        if path.is_dir():
            if not (path / SCORES_FILE).is_file():
                raise KvrlError(f"{path} is a folder without {SCORES_FILE}; pass a head-pattern folder (kvrl export), "
                                "a .safetensors or a .tsv file")
            path = path / SCORES_FILE
        if not path.is_file():
            raise KvrlError(f"head scores file not found: {path}")
        if path.suffix in (".tsv", ".txt"):
            return cls.from_tsv(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                scores = handle.get_tensor("scores")
            provenance = json.loads(metadata.get("provenance", "{}"))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise KvrlError(f"{path} is not a readable head-scores file (.safetensors with a 'scores' tensor, or "
                            ".tsv)") from err
        return cls(scores=scores, **_checked_provenance(path, provenance))

    @classmethod
    def from_hub(cls, ref: str) -> HeadScores:
        """A head-pattern folder from the hub, `hf://OWNER/REPO` or `hf://OWNER/REPO@REVISION`."""
        hub = parse_hub_ref(ref)
        folder, revision = download(hub, [SCORES_FILE, CONFIG_FILE, CARD_FILE])
        if not (folder / SCORES_FILE).is_file():
            raise KvrlError(f"{hub} holds no {SCORES_FILE}: it is not a head-pattern folder (made by kvrl export)")
        scores = cls.load(folder / SCORES_FILE)
        scores.extra = {**scores.extra, "hub": {"repo": hub.repo, "revision": revision}}
        return scores

    # --- published TSV form ------------------------------------------------------------------
    @classmethod
    def from_tsv(cls, path: str | Path) -> HeadScores:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise KvrlError(f"{path}: cannot read it ({err.strerror or type(err).__name__})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KvrlError(f"{path}: not a TSV of numbers (not UTF-8 text)") from None
        rows: list[list[float]] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append([float(cell) for cell in line.strip().split("\t")])
            except ValueError:
                raise KvrlError(f"{path}: not a TSV of numbers (line {line_no})") from None
        if not rows:
            raise KvrlError(f"{path}: the head pattern is empty (no row of numbers)")
        if len({len(r) for r in rows}) != 1:
            raise KvrlError(f"{path}: a head pattern needs the same number of columns on every row")
        return cls(scores=torch.tensor(rows), strategy="file", data=str(path))

    def to_tsv(self, path: str | Path, *, overwrite: bool = False) -> Path:
        text = "\n".join("\t".join(_fmt(v) for v in row) for row in self.scores.tolist()) + "\n"
        return write_atomic(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)


# the type each provenance field must have in a file (None is accepted for every field)
_PROVENANCE_TYPES: dict[str, tuple[type, ...]] = {
    "model_id": (str,), "strategy": (str,), "strategy_version": (str,), "options": (dict,), "data": (str,),
    "seed": (int,), "wall_time_s": (int, float), "extra": (dict,),
}


def _checked_provenance(path: Path, provenance: Any) -> dict[str, Any]:
    """The known provenance fields of a file, refused in one line when the metadata is not a JSON object or a
    field has the wrong type."""
    if not isinstance(provenance, dict):
        raise KvrlError(f"{path}: its provenance metadata is not a JSON object (got {type(provenance).__name__})")
    known: dict[str, Any] = {}
    for key, types in _PROVENANCE_TYPES.items():
        if key not in provenance or provenance[key] is None:
            continue
        value = provenance[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise KvrlError(f"{path}: provenance field {key!r} should be {' or '.join(t.__name__ for t in types)}, "
                            f"got {type(value).__name__}")
        known[key] = value
    for key in ("model_id", "strategy", "strategy_version", "data"):  # the dataclass defaults of these are ""
        known.setdefault(key, "")
    known.setdefault("options", {})
    known.setdefault("extra", {})
    return known


def _fmt(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else "0.0"
