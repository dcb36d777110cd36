"""vLLM's paged KV cache seen as rows of `[key | value]`, one row per (KV head, cache slot), in plain torch.

vLLM puts every layer's cache in one backing allocation; a layer's (or a sub-layer's) cache is a strided view of it,
`[blocks, heads, block size, 2 D]` with keys and values side by side in the last dimension. Seen as one tensor of rows
`[N, 2 D]` over that allocation, the row of head `h` at slot `s` is
`base[h] + (s // block size) * block_rows[h] + (s % block size) * slot_rows`, whatever the layout of the blocks, so
one `index_copy_` writes a step's keys and values of many heads and one gather reads them back. The heads kvpress-rl
writes itself use it: a layer's compressed heads and the gated model's streaming branch (`heads.CompressedHeads`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedRows:
    rows: torch.Tensor  # [N, 2 D]: the whole allocation
    base: torch.Tensor  # [heads]: row of each head's slot 0 in block 0
    block_rows: torch.Tensor  # [heads]: rows from one block of a head to its next
    slot_rows: int  # rows from one slot of a block to the next
    block_size: int
    plain: bool  # slot s of a head is row base + s (layer-outer layouts): known once, never synced per step

    @classmethod
    def over(cls, caches: list[torch.Tensor], layer: str) -> PagedRows:
        """The rows of caches `[blocks, heads, block size, 2 D]` that are views of one allocation, heads in order
        (`layer` names them in an error)."""
        first = caches[0]
        width = first.shape[-1]
        for cache in caches:
            strides = (*cache.stride()[:-1], cache.storage_offset())
            same = cache.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            same = same and cache.stride(2) == first.stride(2)
            if not same or cache.stride(-1) != 1 or any(x % width for x in strides):
                raise RuntimeError(f"{layer}: a KV cache written by kvpress-rl is not rows of [key | value] in one "
                                   "allocation")
        storage = torch.empty(0, dtype=first.dtype, device=first.device).set_(first.untyped_storage())
        heads = [(cache, h) for cache in caches for h in range(cache.shape[1])]
        base = [(cache.storage_offset() + h * cache.stride(1)) // width for cache, h in heads]
        block_rows = [cache.stride(0) // width for cache, _ in heads]
        slot_rows, block_size = first.stride(2) // width, first.shape[2]
        return cls(rows=storage[: storage.numel() // width * width].view(-1, width),
                   base=torch.tensor(base, device=first.device),
                   block_rows=torch.tensor(block_rows, device=first.device), slot_rows=slot_rows,
                   block_size=block_size, plain=slot_rows == 1 and all(rows == block_size for rows in block_rows))

    @property
    def head_size(self) -> int:
        return self.rows.shape[-1] // 2

    def index(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of cache slots `[heads or 1, ...]` (>= 0), for every head: `[heads, ...]`."""
        shape = (-1,) + (1,) * (slots.dim() - 1)
        base = self.base.view(shape)
        if self.plain:
            return base + slots
        block, offset = slots // self.block_size, slots % self.block_size
        return base + block * self.block_rows.view(shape) + offset * self.slot_rows

    def write(self, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keys and values `[T, heads, D]` into their rows `index` `[heads, T]`."""
        entries = torch.cat([key, value], dim=-1).to(self.rows.dtype)  # [T, heads, 2 D]
        # the index is transposed (small ints), not the entries: no second copy of the step's keys and values
        self.rows.index_copy_(0, index.transpose(0, 1).reshape(-1), entries.reshape(-1, entries.shape[-1]))

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(keys, values)` `[*index.shape, D]` of rows `index`, in the cache's dtype."""
        entries = self.rows.index_select(0, index.reshape(-1)).view(*index.shape, self.rows.shape[-1])
        return entries[..., : self.head_size], entries[..., self.head_size:]
