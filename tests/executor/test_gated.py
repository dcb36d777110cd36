import pytest
import torch

from kvpress_rl import KvrlError
from kvpress_rl.executor import gated, new_gates
from kvpress_rl.models import SUPPORTED_ARCHITECTURES, random_model, small_config
from tests.executor.reference import explicit_block_mask, explicit_streaming_mask


def run(model, ids, mask, attention_mask_4d=None):
    if attention_mask_4d is not None:  # a ready 4D mask goes through as-is
        return model(input_ids=ids, attention_mask=attention_mask_4d).logits
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_alpha_one_is_full_attention_and_alpha_zero_is_streaming(arch):
    model = random_model(small_config(arch), seed=3)
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0  # left padding in the second row
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    full = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    streaming_4d = explicit_streaming_mask(mask.bool(), sink=4, window=8)
    # padding queries: give them their own row so nothing is empty (as the gated mask does)
    for b, i in zip(*torch.nonzero(~streaming_4d[:, 0].any(-1), as_tuple=True)):
        streaming_4d[b, 0, i, : i + 1] = True
    streaming = model(input_ids=ids, attention_mask=streaming_4d, position_ids=position).logits

    real = mask.bool()
    with gated(model, new_gates(model, 1.0), sink=4, window=8):
        ones = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    with gated(model, new_gates(model, 0.0), sink=4, window=8):
        zeros = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    torch.testing.assert_close(ones[real], full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zeros[real], streaming[real], rtol=1e-4, atol=1e-4)
    assert (zeros[real] - full[real]).abs().max() > 1e-2  # the two branches really differ


def test_gradient_reaches_the_gates_and_nothing_else():
    model = random_model(small_config("qwen2"), seed=0)
    model.requires_grad_(False)
    gates = new_gates(model, 0.5)
    ids = torch.randint(0, 256, (2, 30))
    with gated(model, gates, sink=2, window=4):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gates_are_clamped_to_the_unit_interval():
    model = random_model(small_config("llama"), seed=0)
    ids = torch.randint(0, 256, (1, 30))
    with gated(model, new_gates(model, 1.7), sink=2, window=4):
        above = model(input_ids=ids).logits
    with gated(model, new_gates(model, 1.0), sink=2, window=4):
        one = model(input_ids=ids).logits
    torch.testing.assert_close(above, one)


def test_generate_samples_from_the_gated_model_and_restores_it():
    model = random_model(small_config("llama"), seed=0)
    ids = torch.randint(0, 256, (2, 50))
    plain = model.generate(ids, max_new_tokens=20, do_sample=False)
    with gated(model, new_gates(model, 1.0), sink=4, window=8):
        same = model.generate(ids, max_new_tokens=20, do_sample=False)
    with gated(model, new_gates(model, 0.0), sink=4, window=8):
        streaming = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(plain, same)
    assert not torch.equal(plain, streaming)
    assert model.config._attn_implementation == "sdpa"


def test_bad_gates_and_windows_are_refused():
    model = random_model(small_config("llama"), seed=0)
    with pytest.raises(KvrlError, match="gates have shape"), gated(model, torch.ones(3, 4)):
        pass
    with pytest.raises(KvrlError, match="window >= 1"), gated(model, new_gates(model), window=0):
        pass


def test_gated_block_mask_at_alpha_zero_is_the_block_streaming_model():
    model = random_model(small_config("llama"), seed=1)
    ids = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :6] = 0
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    reference_4d = explicit_block_mask(mask.bool(), sink=3, window=5, block=4)
    for b, i in zip(*torch.nonzero(~reference_4d[:, 0].any(-1), as_tuple=True)):
        reference_4d[b, 0, i, : i + 1] = True
    reference = model(input_ids=ids, attention_mask=reference_4d, position_ids=position).logits
    with gated(model, new_gates(model, 0.0), sink=3, window=5, mask="block", block_size=4):
        block = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    with gated(model, new_gates(model, 0.0), sink=3, window=5):
        token = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    real = mask.bool()
    torch.testing.assert_close(block[real], reference[real], rtol=1e-4, atol=1e-4)
    assert (block[real] - token[real]).abs().max() > 1e-3
    gates = new_gates(model)
    with pytest.raises(KvrlError, match="mask must be one of token, block"), gated(model, gates, mask="dense"):
        pass


def test_gated_blocks_do_not_nest_and_the_attention_refuses_to_run_outside_one():
    from kvpress_rl.executor.gated import GATED_ATTENTION

    model = random_model(small_config("llama"), seed=0)
    gates = new_gates(model)
    ids = torch.randint(0, 256, (1, 20))
    with gated(model, gates):
        with pytest.raises(KvrlError, match="do not nest"), gated(model, gates):
            pass
    model.set_attn_implementation(GATED_ATTENTION)  # the name stays registered, but its gates are gone
    with pytest.raises(KvrlError, match="only inside"):
        model(input_ids=ids)
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
@pytest.mark.parametrize("mode", ["token", "block"])
def test_decoding_steps_equal_the_teacher_forced_gated_forward(arch, mode):
    """The one-pass decoding path (`mixed_decode`, one score product for both branches) gives the logits of
    the two-SDPA path over the whole sequence, with left padding and gates strictly between 0 and 1."""
    model = random_model(small_config(arch), seed=5)
    gates = torch.rand(new_gates(model).shape, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :6] = 0
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    prompt = 20
    with torch.no_grad(), gated(model, gates, sink=3, window=7, mask=mode, block_size=4):
        whole = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
        out = model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=position[:, :prompt],
                    use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1]):  # one token at a time: the decoding path
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=position[:, t:t + 1],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    decoded = torch.stack(steps[:-1], dim=1)
    torch.testing.assert_close(decoded, whole[:, prompt - 1:-1], rtol=1e-4, atol=1e-4)
    with torch.no_grad(), gated(model, torch.ones_like(gates), sink=3, window=7, mask=mode, block_size=4):
        ones = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
    assert (ones[:, prompt:] - whole[:, prompt:]).abs().max() > 1e-3  # the gates matter at these positions
