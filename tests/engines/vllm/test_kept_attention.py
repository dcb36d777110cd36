"""What a compressed head reads in a step: its kept positions and the token itself."""

from __future__ import annotations

import pytest
import torch

from kvpress_rl.engines.vllm.layout import kept_history
from tests.engines.vllm.steps import SINK, WINDOW

pytestmark = pytest.mark.usefixtures("vllm_installed")


@pytest.mark.parametrize("computed", [0, 1, 15, 16, 17, 79, 80, 81, 95, 96, 97, 500])
def test_kept_positions_are_the_kept_history_and_the_token_itself(computed):
    from kvpress_rl.engines.vllm.kept_attention import kept_positions

    positions, valid = kept_positions(torch.tensor([computed]), SINK, WINDOW)
    assert positions[0][valid[0]].tolist() == kept_history(computed, SINK, WINDOW) + [computed]
    assert (positions[0][~valid[0]] == 0).all()


@pytest.mark.parametrize("query_block", [16, 64])
@pytest.mark.parametrize("mask, sink, window, block", [("token", 16, 64, 128), ("block", 32, 64, 32)])
def test_prompt_bands_attend_as_the_learners_streaming_branch(mask, sink, window, block, query_block):
    """A step's prompt chunks, two going on from 96 and 64 cached tokens and three from position 0 (one shorter than
    the sinks, one longer than sinks and window): in blocks of queries over their kept history (as a step reads it
    from the cache) and their own keys, every token of the step is the learner's streaming branch over the whole
    prompt (`masks.streaming_mask`) at that token."""
    from kvpress_rl.engines.vllm.backend import kept_slots
    from kvpress_rl.engines.vllm.gated import streaming_cache
    from kvpress_rl.engines.vllm.kept_attention import banded_prompt_attention, prompt_bands
    from kvpress_rl.masks import streaming_mask
    from kvpress_rl.sampling import GatedBranch

    rule = streaming_cache(GatedBranch(sink=sink, window=window, mask=mask, block_size=block))
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, scale = 4, 2, 32, 0.2
    prompts = [(150, 96), (130, 0), (97, 64), (5, 0), (300, 0)]
    full = [[torch.randn(n, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads)] for n, _ in prompts]
    query, key, value = (torch.cat([p[i][c:] for p, (_, c) in zip(full, prompts)]) for i in range(3))
    chunks, start = [], 0
    for n, c in prompts:
        chunks.append((start, start + n - c, c))
        start += n - c
    computed = torch.tensor([c for _, c in prompts])
    identity = torch.arange(int(computed.max()) + 1).expand(len(prompts), -1)  # one-token blocks: slot = position
    positions, valid = kept_slots(identity, computed, 1, *rule)  # each chunk's history, as a step reads it
    positions, valid = positions[:, :-1], valid[:, :-1]
    history = tuple(torch.stack([p[i][pos].transpose(0, 1) for p, pos in zip(full, positions)]) for i in (1, 2))
    bands = prompt_bands(chunks, valid, rule, query_block)
    output = torch.full_like(query, float("nan"))
    banded_prompt_attention(query, key, value, history, bands, scale, output)
    for (n, c), (q, k, v), (begin, end, _) in zip(prompts, full, chunks):
        allowed = streaming_mask(None, n, n, sink, window, "cpu", mode=mask, block_size=block)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=allowed, scale=scale,
            enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(output[begin:end], expected[c:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_block", [16, 64])
def test_no_step_makes_more_bands_than_the_profile_run_attends_on(query_block):
    """vLLM's profile run attends on `worst_prompt_bands` of its tokens: every step of at most that many prompt tokens
    in at most `max_num_seqs` chunks (random lengths, some going on from a cached prefix) makes no larger bands, and
    chunks of `query_block + 1` tokens make exactly as many blocks."""
    from kvpress_rl.engines.vllm.kept_attention import most_prompt_blocks, prompt_bands, worst_prompt_bands

    rule, tokens, max_chunks = (SINK, WINDOW, 0), 700, 9
    worst, worst_chunks = worst_prompt_bands(tokens, max_chunks, rule, torch.device("cpu"), query_block)
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        count = int(torch.randint(1, max_chunks + 1, (1,), generator=generator))
        cuts = torch.randint(0, tokens - 2 * count + 1, (count - 1,), generator=generator).sort().values.tolist()
        spare = [b - a for a, b in zip([0, *cuts], [*cuts, tokens - 2 * count])]  # what each chunk has beyond 2
        if trial % 2:
            spare[-1] -= int(torch.randint(0, spare[-1] + 1, (1,), generator=generator))  # a step with fewer tokens
        chunks, start = [], 0
        for extra in spare:
            computed = int(torch.randint(0, 300, (1,), generator=generator))
            chunks.append((start, start + 2 + extra, computed))
            start += 2 + extra
        valid = torch.ones((count, SINK + WINDOW), dtype=torch.bool)
        bands = prompt_bands(chunks, valid, rule, query_block)
        assert count <= worst_chunks
        for name in ("query_tokens", "key_index", "allowed", "real_queries", "tokens"):
            shape, most = getattr(bands, name).shape, getattr(worst, name).shape
            assert len(shape) == len(most) and all(n <= m for n, m in zip(shape, most)), (chunks, name)
    exact = [(i * (query_block + 1), (i + 1) * (query_block + 1), 0) for i in range(max_chunks - 1)]
    exact.append((exact[-1][1], tokens, 0))
    blocks = prompt_bands(exact, torch.ones((max_chunks, SINK + WINDOW), dtype=torch.bool), rule, query_block)
    assert blocks.allowed.shape[0] == most_prompt_blocks(tokens, max_chunks, query_block) == worst.allowed.shape[0]


def peak_bytes(attend) -> int:
    """The most bytes of tensors alive at once while `attend` runs, beyond those alive before (torch's MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        attend()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_the_profile_run_peaks_above_every_step_of_as_many_tokens():
    """Measured on the CPU: the peak memory of `worst_step_attention` over `T` tokens, what vLLM's profile run sees,
    is at least the gated model's streaming branch over steps of `T` tokens: short prompts, one long prompt, chunks
    going on from a cached prefix, decoding rows beside them (their kept rows read from the cache, bands built)."""
    from kvpress_rl.engines.vllm.kept_attention import (
        banded_prompt_attention,
        decode_over_kept,
        prompt_bands,
        worst_step_attention,
    )

    heads, group, dim, tokens, max_requests, scale = 2, 3, 32, 600, 8, 0.2
    rule, kept = (SINK, WINDOW - 1, 0), SINK + WINDOW - 1
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, heads * group, dim, generator=generator, dtype=torch.bfloat16)
    key, value = torch.randn(2, tokens, heads, dim, generator=generator, dtype=torch.bfloat16)
    output = torch.empty_like(query)

    def step(decodes: int, lengths: list[int], computed: int):
        chunks, start = [], decodes
        for n in lengths:
            chunks.append((start, start + n, computed))
            start += n
        assert start <= tokens

        def cache_rows(*shape):  # what the kept rows' gather from the cache gives
            return tuple(torch.zeros((*shape, dim), dtype=key.dtype) for _ in range(2))

        def attend():  # as `heads.CompressedHeads` does: the decoding rows, then the bands
            if decodes:
                valid = torch.ones((decodes, kept + 1), dtype=torch.bool)
                decode_over_kept(*cache_rows(decodes, heads, kept + 1), query[:decodes], valid, scale, group)
            bands = prompt_bands(chunks, torch.ones((len(chunks), kept), dtype=torch.bool), rule)
            banded_prompt_attention(query, key, value, cache_rows(len(chunks), heads, kept), bands, scale, output)

        return attend

    most = peak_bytes(lambda: worst_step_attention(query, key, value, output, rule, scale, max_requests, True))
    steps = {"short prompts": step(0, [65] * 7 + [145], 0), "one long prompt": step(0, [600], 0),
             "continued chunks": step(0, [150] * 4, 300), "decodes beside chunks": step(4, [2] * 3 + [590], 100),
             "tiny chunks": step(0, [2] * 8, 0)}
    for name, attend in steps.items():
        assert 0 < peak_bytes(attend) <= most, name
