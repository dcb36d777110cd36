"""Compressed heads' one-step prompts through vLLM's CPU kernel (`cpu_full.prompt_attention`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.engines.vllm.steps import DIM, GROUP

pytestmark = pytest.mark.usefixtures("vllm_installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_through_the_cpu_kernel_are_causal_attention(dtype):
    """Compressed heads' one-step prompts through vLLM's CPU kernel (several in one call) equal causal SDPA per
    prompt."""
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
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=DIM**-0.5,
                                                  enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(output[start:end].float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=1e-2)
    assert (output[51:60] == 7.0).all() and (output[200:] == 7.0).all()
