from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from kvpress_rl import KvrlError, plan_from_scores
from kvpress_rl.executor import HeadwiseCache, compressed
from kvpress_rl.models import SUPPORTED_ARCHITECTURES, ModelShape, cache_kwargs, random_model, small_config
from kvpress_rl.policies import Budget, Streaming, full_head_policy
from tests.executor.reference import left_padded_batch, masked_reference, reference_mask, teacher_forced_logits


def make_model(arch: str, **overrides):
    return random_model(small_config(arch, **overrides), seed=1)


def check_against_reference(model, plan, ids, mask, continuation, sink, window, **full_heads):
    """Teacher-forced logits under the plan equal the masked reference's; returns them and the cache."""
    with masked_reference(model, plan.full, sink, window, **full_heads):
        expected = teacher_forced_logits(model, ids, mask, continuation, DynamicCache())
    with compressed(model, plan) as session:
        cache = session.new_cache()
        actual = teacher_forced_logits(model, ids, mask, continuation, cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    return actual, cache


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_sparsity_zero_matches_the_plain_model(arch):
    model = make_model(arch)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    plain = model.generate(ids, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plan = plan_from_scores(torch.rand(4, 4), 0.0)
    with compressed(model, plan) as session:
        ours = session.generate(ids, max_new_tokens=30, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        assert isinstance(session.last_cache, HeadwiseCache)
    assert torch.equal(plain.sequences, ours.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_compressed_heads_match_the_masked_reference(arch, sparsity, batch):
    model = make_model(arch)
    sink, window = 4, 8
    plan = plan_from_scores(torch.rand(4, 4, generator=torch.Generator().manual_seed(2)), sparsity,
                            Streaming(sink, window))
    ids, mask = left_padded_batch(batch, 30)
    continuation = torch.randint(1, 256, (batch, 100), generator=torch.Generator().manual_seed(3))
    actual, cache = check_against_reference(model, plan, ids, mask, continuation, sink, window)
    for layer in cache.layers:
        assert layer.compressed_keys.shape[2] == (sink + window if layer.has_compressed else 0)
        assert layer.keys.shape[2] == (130 if layer.has_full else 0)
    # and the plan is not a no-op: compression changes the outputs
    if sparsity == 1.0:
        plain = teacher_forced_logits(model, ids, mask, continuation, DynamicCache())
        assert (plain - actual).abs().max() > 1e-2


def test_default_window_with_generate_matches_reference():
    model = make_model("qwen2")
    plan = plan_from_scores(torch.rand(4, 4, generator=torch.Generator().manual_seed(4)), 0.5)
    ids, mask = left_padded_batch(2, 120)
    with masked_reference(model, plan.full, 16, 64):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False)
    with compressed(model, plan) as session:
        actual = session.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False)
    assert torch.equal(actual, expected)


def test_sinks_are_the_first_real_tokens_never_padding():
    model = make_model("llama")
    plan = plan_from_scores(torch.rand(4, 4), 1.0, Streaming(sink=2, window=3))
    ids, mask = left_padded_batch(2, 12)  # row 1 has 3 padding tokens
    with compressed(model, plan) as session:
        cache = session.new_cache()
        teacher_forced_logits(model, ids, mask, torch.randint(1, 256, (2, 4)), cache)
    layer = cache.layers[0]
    assert layer.valid.all()  # the padding was evicted before any real token
    # keys of the sink slots equal the keys the first real tokens produced: re-run the plain model to get them
    plain_cache = DynamicCache()
    teacher_forced_logits(model, ids, mask, torch.zeros(2, 0, dtype=torch.long), plain_cache)
    torch.testing.assert_close(layer.compressed_keys[1, :, :2], plain_cache.layers[0].keys[1, :, 3:5])
    torch.testing.assert_close(layer.compressed_keys[0, :, :2], plain_cache.layers[0].keys[0, :, 0:2])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75])
def test_measured_bytes_equal_the_plan(sparsity):
    model = make_model("llama")
    shape = ModelShape.from_config(model.config)
    plan = plan_from_scores(torch.rand(4, 4), sparsity)
    ids = torch.randint(0, 256, (3, 200))
    with compressed(model, plan) as session:
        cache = session.new_cache()
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        after_prefill = plan.kv_bytes(200, 3, head_dim=shape.head_dim, dtype=torch.float32)
        assert abs(cache.nbytes() - after_prefill) <= 0.01 * after_prefill
        for _ in range(50):
            model(input_ids=ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
        after_decode = plan.kv_bytes(250, 3, head_dim=shape.head_dim, dtype=torch.float32)
        assert abs(cache.nbytes() - after_decode) <= 0.01 * after_decode
        assert cache.kv_nbytes() == after_decode


def test_the_model_is_restored_on_exit_even_after_an_error():
    model = make_model("mistral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    with pytest.raises(RuntimeError), compressed(model, plan_from_scores(torch.rand(4, 4), 0.5)):
        assert model.config._attn_implementation != attention
        raise RuntimeError("interrupted")
    assert model.config._attn_implementation == attention
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_forward_without_cache_is_a_full_attention_prefill():
    model = make_model("qwen3")
    ids = torch.randint(0, 256, (2, 40))
    plain = model(input_ids=ids).logits
    with compressed(model, plan_from_scores(torch.rand(4, 4), 1.0)):
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_plan_of_another_shape_is_refused():
    model = make_model("llama")
    with pytest.raises(KvrlError, match="plan has shape 2 layers x 4 KV heads, the model has 4 x 4"):
        with compressed(model, plan_from_scores(torch.rand(2, 4), 0.5)):
            pass


def test_unsupported_architecture_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2))
    plan = plan_from_scores(torch.rand(1, 2), 0.5)
    with pytest.raises(KvrlError, match="supported: llama, mistral, qwen2, qwen3"), compressed(gpt2, plan):
        pass


def test_first_decode_step_attends_over_sink_held_window_and_the_new_token():
    # sink 2, window 3: the first decode query sees 2 sinks + the 3 held recent keys + itself = 6 keys
    # (RLKV's streaming heads concatenate, attend, then trim); evicting first would give 5
    assert int(reference_mask(torch.ones(1, 12, dtype=torch.bool), torch.tensor([True]), 2, 3).sum()) == 6
    model = make_model("llama")
    plan = plan_from_scores(torch.rand(4, 4), 1.0, Streaming(sink=2, window=3))
    ids = torch.randint(1, 256, (1, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    step = torch.randint(1, 256, (1, 1), generator=torch.Generator().manual_seed(8))
    with masked_reference(model, plan.full, 2, 3):
        expected = teacher_forced_logits(model, ids, mask, step, DynamicCache())
    with compressed(model, plan) as session:
        cache = session.new_cache()
        actual = teacher_forced_logits(model, ids, mask, step, cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert all(layer.compressed_keys.shape[2] == 5 for layer in cache.layers)  # trimmed back after the step


def test_decoding_simulation_is_a_no_op_without_compressed_heads():
    model = make_model("qwen2")
    ids, mask = left_padded_batch(3, 40)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with compressed(model, plan_from_scores(torch.rand(4, 4), 0.0), decoding_simulation=12) as session:
        simulated = session.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(simulated, plain)


def test_decoding_simulation_feeds_the_prompt_tail_one_token_at_a_time():
    model = make_model("llama")
    plan = plan_from_scores(torch.rand(4, 4, generator=torch.Generator().manual_seed(3)), 1.0,
                            Streaming(sink=2, window=3))
    ids, mask = left_padded_batch(2, 30)
    with compressed(model, plan, decoding_simulation=10) as session:
        simulated = session.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
        assert session.last_cache.get_seq_length() == 30 + 14
    with compressed(model, plan) as session:
        plain = session.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert not torch.equal(simulated, plain)
    # the same as prefilling 20 tokens, then teacher-forcing the last 10 (the compressed heads decode them)
    with compressed(model, plan) as session:
        logits = teacher_forced_logits(model, ids[:, :20], mask[:, :20], ids[:, 20:], session.new_cache())
    assert torch.equal(logits[:, -1].argmax(-1), simulated[:, 30])


def test_decoding_simulation_must_not_be_negative():
    model, plan = make_model("llama"), plan_from_scores(torch.rand(4, 4), 0.5)
    with pytest.raises(KvrlError, match="decoding_simulation"), compressed(model, plan, decoding_simulation=-1):
        pass


def test_generate_with_an_explicit_cache_equals_session_generate_and_a_foreign_cache_is_refused():
    model = make_model("llama")
    plan = plan_from_scores(torch.rand(4, 4, generator=torch.Generator().manual_seed(5)), 0.5,
                            Streaming(sink=2, window=3))
    ids = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(6))
    with compressed(model, plan) as session:
        ours = session.generate(ids, max_new_tokens=12, do_sample=False)
        explicit = model.generate(ids, **cache_kwargs(model, session.new_cache()), max_new_tokens=12, do_sample=False)
        # a cache that is not the plan's would keep every token: refused at the first decoding step
        with pytest.raises(KvrlError, match="session.new_cache"):
            model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(ours, explicit)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__  # nothing swapped on the instance


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_hybrid_plan_matches_the_masked_reference(arch, batch):
    # full heads stream too (sink 3 + 9 recent), compressed heads keep 2 + 4: both groups follow the reference
    model = make_model(arch)
    plan = plan_from_scores(torch.rand(4, 4, generator=torch.Generator().manual_seed(9)), 0.5,
                            Streaming(sink=2, window=4))
    plan = replace(plan, full_policy=Streaming(sink=3, budget_spec=Budget(fixed=12)))
    ids, mask = left_padded_batch(batch, 30)
    continuation = torch.randint(1, 256, (batch, 40), generator=torch.Generator().manual_seed(10))
    actual, cache = check_against_reference(model, plan, ids, mask, continuation, 2, 4, full_sink=3, full_window=9)
    for layer in cache.layers:
        assert layer.keys.shape[2] == (12 if layer.has_full else 0)
        assert layer.compressed_keys.shape[2] == (6 if layer.has_compressed else 0)
    with masked_reference(model, plan.full, 2, 4):  # and the full heads' eviction is not a no-op
        heads_only = teacher_forced_logits(model, ids, mask, continuation, DynamicCache())
    assert (heads_only - actual).abs().max() > 1e-3


@pytest.mark.parametrize("full_policy, budget",
                         [("streaming", "0.5"), ("snapkv", "0.25"), ("h2o", "100"), ("streaming", "1.0")])
def test_measured_bytes_equal_a_hybrid_plan(full_policy, budget):
    model = make_model("llama")
    shape = ModelShape.from_config(model.config)
    plan = replace(plan_from_scores(torch.rand(4, 4), 0.5), full_policy=full_head_policy(full_policy, budget))
    ids = torch.randint(0, 256, (2, 300))
    with compressed(model, plan) as session:
        cache = session.new_cache()
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(30):
            model(input_ids=ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
    expected = plan.kv_bytes(330, 2, head_dim=shape.head_dim, dtype=torch.float32)
    assert cache.kv_nbytes() == expected
    full_heads = int(plan.full.sum())
    held = {"0.5": 165, "0.25": 82, "100": 100, "1.0": 330}[budget]  # int(L * f) or the token count
    assert expected == 2 * 2 * shape.head_dim * 4 * (full_heads * held + (16 - full_heads) * 80)
