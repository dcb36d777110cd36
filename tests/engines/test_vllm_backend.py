"""The compressed-head attention backend against dense masked attention: mixed prompt, chunk and decoding steps,
shuffled block tables, and every slot the head must not read poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvpress_rl.engines.vllm.layout import kept_history

pytestmark = pytest.mark.usefixtures("vllm_installed")
BLOCK, DIM, GROUP = 32, 64, 3
# (cached tokens before the step, tokens of the step): a prompt, two decoding steps, a chunk after a prompt
REQUESTS = [(0, 50), (300, 1), (70, 1), (200, 30), (1000, 1)]


def test_attention_is_exactly_over_the_kept_tokens():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from kvpress_rl.engines.vllm.backend import SinkWindowImpl, SinkWindowMetadataBuilder
    from kvpress_rl.engines.vllm.cache import SinkWindowSpec

    generator = torch.Generator().manual_seed(0)
    spec = SinkWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=DIM, dtype=torch.float32)
    blocks_per_request = max(-(-(c + q) // BLOCK) for c, q in REQUESTS)
    num_blocks = 1 + blocks_per_request * len(REQUESTS)
    order = torch.randperm(num_blocks - 1, generator=generator) + 1  # block 0 is vLLM's null block
    tables = order.reshape(len(REQUESTS), blocks_per_request).int()
    cache = torch.full((num_blocks, 1, BLOCK, 2 * DIM), float("nan"))
    impl = SinkWindowImpl(GROUP, DIM, DIM**-0.5, num_kv_heads=1)

    keys, values, queries, slots, starts, expected = [], [], [], [], [0], []
    for r, (computed, new) in enumerate(REQUESTS):
        total = computed + new
        k, v = torch.randn(total, DIM, generator=generator), torch.randn(total, DIM, generator=generator)
        q = torch.randn(new, GROUP, DIM, generator=generator)
        slot = tables[r, torch.arange(total) // BLOCK].long() * BLOCK + torch.arange(total) % BLOCK
        kept = torch.tensor(kept_history(computed), dtype=torch.long)
        # the history the head keeps is in the cache; everything else there stays NaN
        impl.do_kv_cache_update(None, k[kept, None], v[kept, None], cache, slot[kept])
        keys.append(k[computed:, None]), values.append(v[computed:, None]), queries.append(q), slots.append(slot[computed:])
        starts.append(starts[-1] + new)
        visible = torch.zeros(new, total, dtype=torch.bool)
        for i in range(new):
            visible[i, kept] = True
            visible[i, computed : computed + i + 1] = True
        dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.expand(GROUP, -1, -1), v.expand(GROUP, -1, -1),
                                               attn_mask=visible, scale=DIM**-0.5)
        expected.append(dense.transpose(0, 1))
    key, value, query, slot_mapping = torch.cat(keys), torch.cat(values), torch.cat(queries), torch.cat(slots)
    impl.do_kv_cache_update(None, key, value, cache, slot_mapping)  # vLLM writes the step's own tokens first

    lengths = torch.tensor([c + q for c, q in REQUESTS], dtype=torch.int32)
    start_loc = torch.tensor(starts, dtype=torch.int32)
    metadata = CommonAttentionMetadata(query_start_loc=start_loc, query_start_loc_cpu=start_loc, seq_lens=lengths,
                                       num_reqs=len(REQUESTS), num_actual_tokens=int(start_loc[-1]), max_query_len=50,
                                       max_seq_len=int(lengths.max()), block_table_tensor=tables, slot_mapping=slot_mapping)
    built = SinkWindowMetadataBuilder(spec, ["layer"], None, torch.device("cpu")).build(0, metadata)
    output = torch.empty_like(query)
    impl.forward(None, query, key, value, cache, built, output)
    assert not output.isnan().any()
    torch.testing.assert_close(output, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert len(built.prefills) == 2 and built.decode_tokens.numel() == 3
