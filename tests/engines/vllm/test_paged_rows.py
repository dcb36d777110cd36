"""A paged cache seen as rows of `[key | value]`: what is written at a slot is what the cache holds there and what is
read back, for one-head caches in one allocation (compressed heads) and for a layer's cache in either block layout
(the gated model)."""

from __future__ import annotations

import pytest
import torch

from kvpress_rl.engines.vllm.paged_rows import PagedRows

BLOCKS, HEADS, BLOCK, DIM = 6, 3, 8, 4


def layer_cache(heads_outer: bool) -> torch.Tensor:
    """`[blocks, heads, block size, 2 D]`, stored heads-outer or slots-outer within a block."""
    if heads_outer:
        return torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM)
    return torch.zeros(BLOCKS, BLOCK, HEADS, 2 * DIM).transpose(1, 2)


def head_caches() -> list[torch.Tensor]:
    """One-head caches at distant places of one allocation (other layers' pages between)."""
    storage = torch.zeros(4 * HEADS * BLOCKS * BLOCK * 2 * DIM)
    page = BLOCK * 2 * DIM
    return [storage.as_strided((BLOCKS, 1, BLOCK, 2 * DIM), (2 * page, page, 2 * DIM, 1), (3 * h + 1) * BLOCKS * page)
            for h in range(HEADS)]


@pytest.mark.parametrize("caches", [[layer_cache(True)], [layer_cache(False)], head_caches()],
                         ids=["heads-outer", "slots-outer", "one-head caches"])
def test_rows_write_and_read_the_slots_of_every_head(caches):
    generator = torch.Generator().manual_seed(0)
    kv = PagedRows.over(caches, "layers.0.attn")
    slots = torch.randperm(BLOCKS * BLOCK, generator=generator)[:10]
    key, value = torch.randn(10, HEADS, DIM, generator=generator), torch.randn(10, HEADS, DIM, generator=generator)
    kv.write(kv.index(slots[None]), key, value)
    heads = [(cache, h) for cache in caches for h in range(cache.shape[1])]
    for i, (cache, h) in enumerate(heads):
        held = cache[slots // BLOCK, h, slots % BLOCK]
        torch.testing.assert_close(held, torch.cat([key[:, i], value[:, i]], dim=-1))
    keys, values = kv.read(kv.index(slots.view(2, 5)[None]))
    assert keys.shape == (HEADS, 2, 5, DIM)
    torch.testing.assert_close(keys.reshape(HEADS, 10, DIM), key.transpose(0, 1))
    torch.testing.assert_close(values.reshape(HEADS, 10, DIM), value.transpose(0, 1))


def test_a_cache_that_is_not_rows_is_refused():
    cache = torch.zeros(BLOCKS, 1, 2 * DIM, BLOCK).transpose(2, 3)  # keys and values not side by side in memory
    with pytest.raises(RuntimeError, match="^layers.0.attn: .*not rows"):
        PagedRows.over([cache], "layers.0.attn")
