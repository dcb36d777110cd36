"""The compressed heads of a layer against dense masked attention: mixed prompt, chunk and decoding steps, two heads
in different KV-cache groups (different block tables) of one shared allocation, and every slot the heads must not read
poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvpress_rl.engines.vllm.layout import kept_history
from tests.engines.vllm.steps import BLOCK, DIM, GROUP, SINK, WINDOW, build

pytestmark = pytest.mark.usefixtures("vllm_installed")
# (cached tokens before the step, tokens of the step): a prompt, three decoding steps, a chunk after a prompt
REQUESTS = [(0, 50), (300, 1), (70, 1), (200, 30), (1000, 1)]
DECODING = [(300, 1), (70, 1), (1000, 1), (5, 1), (16, 1)]  # every request decodes one token


class FakeLayer:
    def __init__(self, kv_cache, sink=SINK, window=WINDOW, block=0):
        self.kv_cache, self.sink, self.window, self.block = kv_cache, sink, window, block


@pytest.mark.parametrize("requests, prefills, decodes", [(REQUESTS, 2, 3), (DECODING, 0, 5)])
def test_compressed_heads_attend_exactly_over_the_kept_tokens(monkeypatch, requests, prefills, decodes):
    """Decoding rows are attended two at a time (`max_requests`), in a mixed step and in a decoding step."""
    from kvpress_rl.engines.vllm import heads

    generator = torch.Generator().manual_seed(0)
    blocks_per_request = max(-(-(c + q) // BLOCK) for c, q in requests)
    num_blocks = 1 + blocks_per_request * len(requests)
    # vLLM's single allocation: head 0 at region 1, head 1 at region 3 (other layers' regions between), NaN everywhere
    page = BLOCK * 2 * DIM
    storage = torch.full((5 * num_blocks * page,), float("nan"))
    caches = [storage.as_strided((num_blocks, 1, BLOCK, 2 * DIM), (page, page, 2 * DIM, 1),
                                 region * num_blocks * page) for region in (1, 3)]
    tables = []
    for _ in caches:  # each head in its own KV-cache group: its own shuffled block table (block 0: vLLM's null block)
        order = torch.randperm(num_blocks - 1, generator=generator) + 1
        tables.append(order.reshape(len(requests), blocks_per_request).int())

    keys, values, queries, expected, starts = [], [], [], [], [0]
    slot_maps = [[], []]
    for r, (computed, new) in enumerate(requests):
        total = computed + new
        k, v = torch.randn(total, 2, DIM, generator=generator), torch.randn(total, 2, DIM, generator=generator)
        q = torch.randn(new, 2 * GROUP, DIM, generator=generator)
        kept = torch.tensor(kept_history(computed), dtype=torch.long)
        for h, (cache, table) in enumerate(zip(caches, tables)):
            slot = table[r, torch.arange(total) // BLOCK].long() * BLOCK + torch.arange(total) % BLOCK
            # the kept history
            cache[slot[kept] // BLOCK, 0, slot[kept] % BLOCK] = torch.cat([k[kept, h], v[kept, h]], dim=-1)
            slot_maps[h].append(slot[computed:])
        keys.append(k[computed:]), values.append(v[computed:]), queries.append(q)
        starts.append(starts[-1] + new)
        visible = torch.zeros(new, total, dtype=torch.bool)
        for i in range(new):
            visible[i, kept] = True
            visible[i, computed: computed + i + 1] = True
        dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               attn_mask=visible,
                                               scale=DIM**-0.5, enable_gqa=True)
        expected.append(dense.transpose(0, 1))
    key, value, query = torch.cat(keys), torch.cat(values), torch.cat(queries)
    lengths = torch.tensor([c + q for c, q in requests], dtype=torch.int32)
    start_loc = torch.tensor(starts, dtype=torch.int32)
    common = dict(query_start_loc=start_loc, query_start_loc_cpu=start_loc, seq_lens=lengths, num_reqs=len(requests),
                  num_actual_tokens=int(start_loc[-1]), max_query_len=max(q for _, q in requests),
                  max_seq_len=int(lengths.max()))
    metadata = [build({**common, "slot_mapping": torch.cat(s)}, t) for s, t in zip(slot_maps, tables)]
    context = {f"kvh{h}": (metadata[h], FakeLayer(caches[h]), torch.cat(slot_maps[h])) for h in range(2)}
    monkeypatch.setattr(heads, "layer_context", context.__getitem__)

    output = torch.empty_like(query)
    heads.CompressedHeads(["kvh0", "kvh1"], GROUP, DIM, DIM**-0.5, max_requests=2)(query, key, value, output)
    assert not output.isnan().any()
    torch.testing.assert_close(output, torch.cat(expected), atol=1e-5, rtol=1e-5)
    assert len(metadata[0].prefills) == prefills and metadata[0].num_decodes == decodes


@pytest.mark.parametrize("windowed_prompts", [False, True])
def test_vllms_profile_run_attends_on_the_largest_step(monkeypatch, windowed_prompts):
    """vLLM sizes the cache from the peak memory of a forward without metadata or cache: there a layer's compressed
    heads attend as the largest step of its tokens would (decoding rows up to `max_num_seqs`; then, for the gated
    model, the most prompt bands), so their temporaries are counted. Warm-up runs, after the cache is bound, attend
    nothing."""
    from kvpress_rl.engines.vllm import heads, kept_attention
    from kvpress_rl.engines.vllm.kept_attention import most_prompt_blocks

    tokens, max_requests, kept = 300, 8, SINK + WINDOW
    seen = {}

    def spy(name, shapes):
        real = getattr(kept_attention, name)

        def call(*args):
            seen[name] = shapes(*args)
            return real(*args)

        monkeypatch.setattr(kept_attention, name, call)

    spy("decode_over_kept", lambda keys, values, query, *rest: (keys.shape, values.shape, query.shape))
    spy("banded_prompt_attention", lambda q, k, v, history, bands, *rest: (history[0].shape, bands.allowed.shape))
    layer = FakeLayer(torch.tensor([]))
    monkeypatch.setattr(heads, "layer_context", lambda name: (None, layer, None))
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, 2 * GROUP, DIM, generator=generator)
    key, value = torch.randn(2, tokens, 2, DIM, generator=generator)
    compressed = heads.CompressedHeads(["kvh0", "kvh1"], GROUP, DIM, DIM**-0.5, max_requests,
                                       windowed_prompts=windowed_prompts)
    compressed(query, key, value, torch.empty_like(query))
    rows = (max_requests, 2, kept + 1, DIM)
    assert seen.pop("decode_over_kept") == (rows, rows, (max_requests, 2 * GROUP, DIM))
    if windowed_prompts:
        bands = (most_prompt_blocks(tokens, max_requests), 64, kept + 64)
        assert seen.pop("banded_prompt_attention") == ((max_requests, 2, kept, DIM), bands)
    assert not seen
    layer.kv_cache = torch.zeros(1)  # bound: a warm-up run
    compressed(query, key, value, torch.empty_like(query))
    assert not seen
