"""The executor on real pretrained weights: SmolLM2-135M-Instruct from its GGUF (30 layers, 9 query
heads, 3 KV heads, Llama architecture)."""

import pytest
import torch
from transformers import DynamicCache

from kvpress_rl.embedded.data import left_pad
from kvpress_rl.executor import compressed, generate
from kvpress_rl.plan import plan_from_scores
from kvpress_rl.policies import Streaming
from tests.executor.reference import masked_reference, teacher_forced_logits

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a prime number is in one sentence."]


def chat_batch(tokenizer, prompts=PROMPTS):
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] for p in prompts]
    return left_pad([list(i) for i in ids], tokenizer.pad_token_id)


def greedy(model, tokenizer, ids, mask, new_tokens, plan=None):
    return generate(model, plan, ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)


def test_the_gguf_loads_as_the_published_layout(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids, mask = chat_batch(tokenizer, PROMPTS[:1])
    answer = tokenizer.decode(greedy(model, tokenizer, ids, mask, 12)[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # the real weights, not random ones


def test_sparsity_zero_reproduces_the_plain_answers(smollm2):
    model, tokenizer = smollm2
    ids, mask = chat_batch(tokenizer)
    plain = greedy(model, tokenizer, ids, mask, 40)
    ours = greedy(model, tokenizer, ids, mask, 40, plan_from_scores(torch.rand(30, 3), 0.0))
    assert torch.equal(ours, plain)


def test_nothing_is_evicted_while_the_sequence_fits_sink_plus_window(smollm2):
    model, tokenizer = smollm2
    ids, mask = chat_batch(tokenizer, ["Hi!"])
    new_tokens = 80 - ids.shape[1]  # prompt + answer never exceed 16 + 64 tokens
    assert new_tokens > 10
    plain = greedy(model, tokenizer, ids, mask, new_tokens)
    for sparsity in (0.5, 1.0):
        plan = plan_from_scores(torch.rand(30, 3, generator=torch.Generator().manual_seed(1)), sparsity)
        assert torch.equal(greedy(model, tokenizer, ids, mask, new_tokens, plan), plain)


def test_compressed_heads_match_the_masked_reference_at_half_sparsity(smollm2):
    model, tokenizer = smollm2
    sink, window = 4, 16
    plan = plan_from_scores(torch.rand(30, 3, generator=torch.Generator().manual_seed(2)), 0.5, Streaming(sink, window))
    ids, mask = chat_batch(tokenizer, PROMPTS[:2])
    continuation = torch.randint(100, 5000, (2, 40), generator=torch.Generator().manual_seed(3))
    with masked_reference(model, plan.full, sink, window):
        expected = teacher_forced_logits(model, ids, mask, continuation, DynamicCache())
    with compressed(model, plan) as session:
        actual = teacher_forced_logits(model, ids, mask, continuation, session.new_cache())
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    plain = teacher_forced_logits(model, ids, mask, continuation, DynamicCache())
    assert (plain - actual).abs().max() > 1e-2  # and compression did change something
