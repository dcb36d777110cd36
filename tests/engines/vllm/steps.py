"""One step of compressed heads for the engine's unit tests: the block size, head size, group and plan they share,
and the step's kept slots as the compressed groups' builder makes them (`backend.kept_metadata`)."""

from __future__ import annotations

BLOCK, DIM, GROUP, SINK, WINDOW = 32, 64, 3, 16, 64


def build(meta_kwargs, table):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from kvpress_rl.engines.vllm.backend import kept_metadata

    return kept_metadata(CommonAttentionMetadata(block_table_tensor=table, **meta_kwargs), BLOCK, SINK, WINDOW)
