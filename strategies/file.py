"""`file`: head scores read from a `.safetensors` file or a published TSV pattern."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvpress_rl.errors import KvrlError
from kvpress_rl.models import ModelShape, model_id
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext


@dataclass
class FileOptions:
    path: str = field(default="", metadata={"help": (
        "scores file: .safetensors written by kvrl, or a .tsv head pattern")})


class FileScores(HeadSelector):
    """Scores from a file, e.g. the RLKV or DuoAttention gates published with arXiv 2510.08525.

    Assumes the file was made for a model with the same (layers, KV heads) layout; any other shape
    is refused.
    """

    name = "file"
    kind = "head"
    description = "scores read from a .safetensors file or a published .tsv head pattern"
    Options = FileOptions

    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        if not self.options.path:
            raise KvrlError("strategy 'file' needs --path FILE (.safetensors or .tsv)")
        start = time.perf_counter()
        loaded = HeadScores.load(self.options.path)
        loaded.check_shape(ModelShape.from_config(model.config))
        return self.scores(loaded.scores, model_id(model), context, time.perf_counter() - start,
                           source=loaded.provenance())
