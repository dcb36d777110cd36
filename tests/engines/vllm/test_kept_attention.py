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
