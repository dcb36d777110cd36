"""The compressed heads of a layer against dense masked attention: mixed prompt, chunk and decoding steps, two heads
in different KV-cache groups (different block tables) of one shared allocation, and every slot the heads must not read
poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvpress_rl.engines.vllm.layout import kept_history

pytestmark = pytest.mark.usefixtures("vllm_installed")
BLOCK, DIM, GROUP, SINK, WINDOW = 32, 64, 3, 16, 64
# (cached tokens before the step, tokens of the step): a prompt, two decoding steps, a chunk after a prompt
REQUESTS = [(0, 50), (300, 1), (70, 1), (200, 30), (1000, 1)]


@pytest.mark.parametrize("computed", [0, 1, 15, 16, 17, 79, 80, 81, 95, 96, 97, 500])
def test_kept_positions_are_the_kept_history_and_the_token_itself(computed):
    from kvpress_rl.engines.vllm.kept_attention import kept_positions

    positions, valid = kept_positions(torch.tensor([computed]), SINK, WINDOW)
    assert positions[0][valid[0]].tolist() == kept_history(computed, SINK, WINDOW) + [computed]
    assert (positions[0][~valid[0]] == 0).all()


class FakeLayer:
    def __init__(self, kv_cache):
        self.kv_cache = kv_cache


def build(meta_kwargs, table):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from kvpress_rl.engines.vllm.backend import kept_metadata

    return kept_metadata(CommonAttentionMetadata(block_table_tensor=table, **meta_kwargs), BLOCK, SINK, WINDOW)


def test_compressed_heads_attend_exactly_over_the_kept_tokens(monkeypatch):
    from kvpress_rl.engines.vllm import heads

    generator = torch.Generator().manual_seed(0)
    blocks_per_request = max(-(-(c + q) // BLOCK) for c, q in REQUESTS)
    num_blocks = 1 + blocks_per_request * len(REQUESTS)
    # vLLM's single allocation: head 0 at region 1, head 1 at region 3 (other layers' regions between), NaN everywhere
    page = BLOCK * 2 * DIM
    storage = torch.full((5 * num_blocks * page,), float("nan"))
    caches = [storage.as_strided((num_blocks, 1, BLOCK, 2 * DIM), (page, page, 2 * DIM, 1), region * num_blocks * page) for region in (1, 3)]
    tables = []
    for _ in caches:  # each head in its own KV-cache group: its own shuffled block table (block 0: vLLM's null block)
        order = torch.randperm(num_blocks - 1, generator=generator) + 1
        tables.append(order.reshape(len(REQUESTS), blocks_per_request).int())

    keys, values, queries, expected, starts = [], [], [], [], [0]
    slot_maps = [[], []]
    for r, (computed, new) in enumerate(REQUESTS):
        total = computed + new
        k, v = torch.randn(total, 2, DIM, generator=generator), torch.randn(total, 2, DIM, generator=generator)
        q = torch.randn(new, 2 * GROUP, DIM, generator=generator)
        kept = torch.tensor(kept_history(computed), dtype=torch.long)
        for h, (cache, table) in enumerate(zip(caches, tables)):
            slot = table[r, torch.arange(total) // BLOCK].long() * BLOCK + torch.arange(total) % BLOCK
            cache[slot[kept] // BLOCK, 0, slot[kept] % BLOCK] = torch.cat([k[kept, h], v[kept, h]], dim=-1)  # the kept history
            slot_maps[h].append(slot[computed:])
        keys.append(k[computed:]), values.append(v[computed:]), queries.append(q)
        starts.append(starts[-1] + new)
        visible = torch.zeros(new, total, dtype=torch.bool)
        for i in range(new):
            visible[i, kept] = True
            visible[i, computed: computed + i + 1] = True
        dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible,
                                               scale=DIM**-0.5, enable_gqa=True)
        expected.append(dense.transpose(0, 1))
    key, value, query = torch.cat(keys), torch.cat(values), torch.cat(queries)
    lengths = torch.tensor([c + q for c, q in REQUESTS], dtype=torch.int32)
    start_loc = torch.tensor(starts, dtype=torch.int32)
    common = dict(query_start_loc=start_loc, query_start_loc_cpu=start_loc, seq_lens=lengths, num_reqs=len(REQUESTS),
                  num_actual_tokens=int(start_loc[-1]), max_query_len=50, max_seq_len=int(lengths.max()))
    metadata = [build({**common, "slot_mapping": torch.cat(s)}, t) for s, t in zip(slot_maps, tables)]
    context = {f"kvh{h}": (metadata[h], FakeLayer(caches[h]), torch.cat(slot_maps[h])) for h in range(2)}
    monkeypatch.setattr(heads, "layer_context", context.__getitem__)

    output = torch.empty_like(query)
    heads.CompressedHeads(["kvh0", "kvh1"], GROUP, DIM, DIM**-0.5)(query, key, value, output)
    assert not output.isnan().any()
    torch.testing.assert_close(output, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert len(metadata[0].prefills) == 2 and metadata[0].num_decodes == 3


def test_a_decoding_step_builds_without_a_loop_over_requests():
    lengths = torch.tensor([90, 5, 400], dtype=torch.int32)
    start_loc = torch.arange(4, dtype=torch.int32)
    table = torch.arange(1, 1 + 3 * 13, dtype=torch.int32).reshape(3, 13)
    built = build(dict(query_start_loc=start_loc, query_start_loc_cpu=start_loc, seq_lens=lengths, num_reqs=3, num_actual_tokens=3,
                       max_query_len=1, max_seq_len=400, slot_mapping=torch.zeros(3, dtype=torch.long)), table)
    assert built.decode_tokens is None and built.num_decodes == 3 and not built.prefills
    assert built.kept_valid.sum(1).tolist() == [81, 5, 81]  # 16 + 64 + itself; 4 cached + itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_through_the_cpu_kernel_are_causal_attention(dtype):
    """Compressed heads' one-step prompts through vLLM's CPU kernel (several in one call) equal causal SDPA per prompt."""
    from kvpress_rl.engines.vllm.cpu_full import prompt_attention

    generator = torch.Generator().manual_seed(0)
    spans = [(0, 50), (50, 51), (60, 200)]  # tokens 51..59 belong to other requests: left alone
    tokens = 210
    query = torch.randn(tokens, 2 * GROUP, DIM, generator=generator).to(dtype)
    key, value = (torch.randn(tokens, 2, DIM, generator=generator).to(dtype) for _ in range(2))
    output = torch.full_like(query, 7.0)
    prompt_attention(query, key, value, spans, DIM**-0.5, output)
    for start, end in spans:
        q, k, v = (t[start:end].transpose(0, 1).float() for t in (query, key, value))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=DIM**-0.5, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(output[start:end].float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    assert (output[51:60] == 7.0).all() and (output[200:] == 7.0).all()
