"""RLKV's own decoding loop (`rollouts.decode`): greedy tokens are transformers' `generate`'s, and the sampler draws
from
the full softmax."""


import torch

from kvpress_rl.embedded.data import left_pad
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.strategies.rlkv import RLKVOptions
from kvpress_rl.strategies.rlkv.rollouts import decode, end_ids, generate, rollouts, sample_tokens, shared_prefill
from tests.strategies.rlkv.helpers import backward_options


def test_greedy_decoding_gives_the_tokens_of_transformers_generate_with_padding_stops_and_gates(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text)["input_ids"] for text in ("12+0=", "3+0=", "456+1=")]  # unequal lengths: left padding
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    stops = end_ids(tokenizer)
    torch.manual_seed(0)
    gates = torch.rand(new_gates(model).shape)
    with torch.no_grad(), gated(model, gates, sink=1, window=2):
        ours, _ = decode(model, ids, mask, None, 12, None, stops, tokenizer.pad_token_id)
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        shared, _ = decode(model, ids, mask, shared_prefill(model, ids, mask, 1), 12, None, stops,
                           tokenizer.pad_token_id)
    assert torch.equal(ours, theirs)
    assert torch.equal(shared, ours)  # the prompt's cache given (all but its last token) or computed here: the same


def test_sampled_tokens_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    drawn = sample_tokens(logits)
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    expected = torch.softmax(logits[0], dim=-1)
    assert frequencies[3] == 0  # a token of probability 0 is never drawn
    torch.testing.assert_close(frequencies, expected, atol=0.012, rtol=0)  # about 4 standard errors at 20,000 draws


def test_a_finished_row_is_padded_and_decoding_ends_when_every_row_stopped(tiny):
    model, tokenizer = tiny
    ids, mask = left_pad([tokenizer("7+0=")["input_ids"]] * 4, tokenizer.pad_token_id)
    torch.manual_seed(1)
    with torch.no_grad():
        out, _ = decode(model, ids, mask, None, 30, 1.0, end_ids(tokenizer), tokenizer.pad_token_id)
    stops = torch.isin(out, torch.tensor(end_ids(tokenizer)))
    for row, stop in zip(out, stops):
        if stop.any():
            first = int(stop.nonzero()[0])
            assert (row[first + 1:] == tokenizer.pad_token_id).all()
    assert out.shape[1] == 30 or stops.any(1).all()


def test_copies_of_a_prompt_share_one_prefill_and_generate_what_separate_rows_would(tiny):
    model, tokenizer = tiny
    opts = RLKVOptions(max_new_tokens=6)
    prompts = [tokenizer("12+0=")["input_ids"], tokenizer("3+0=")["input_ids"]]  # unequal lengths: left padding
    gates = new_gates(model, 0.5)
    with gated(model, gates, sink=1, window=2):
        separate = generate(model, tokenizer, [p for p in prompts for _ in range(3)], opts, sample=False)
        shared = generate(model, tokenizer, prompts, opts, sample=False, copies=3)
    assert shared[2] == separate[2]
    assert torch.equal(shared[0], separate[0]) and torch.equal(shared[1], separate[1])


def test_rollouts_in_batches_of_prompts_join_into_the_batch_one_call_gives(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=", "456+78=")]
    gates = new_gates(model, 0.5)
    results = []
    for batch in (None, 1):
        with gated(model, gates, sink=1, window=2):
            results.append(rollouts(model, tokenizer, prompts, backward_options(rollout_batch=batch), sample=False,
                                    copies=2))
    (seq_a, mask_a, off_a), (seq_b, mask_b, off_b) = results
    assert off_a == off_b and torch.equal(mask_a, mask_b)
    assert torch.equal(seq_a[mask_a.bool()], seq_b[mask_b.bool()])


def test_the_learners_sampler_gates_the_model_and_reports_its_log_probabilities(tiny):
    """`LearnerSampler` (the learner's `RolloutSampler`): under gates it samples what `generate` samples inside
    `gated`, without them the model as it is; the log-probabilities it reports are the teacher-forced ones."""
    from kvpress_rl.strategies.rlkv.backward import completion_logprobs
    from kvpress_rl.strategies.rlkv.rollouts import LearnerSampler, branch_of, rollout_sampling

    model, tokenizer = tiny
    opts = backward_options(rollout_batch=1)
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=")]
    gates = new_gates(model, 0.3)
    sampler = LearnerSampler(model, opts.rollout_batch)
    torch.manual_seed(2)
    out = sampler.sample(prompts, rollout_sampling(tokenizer, opts, sample=True), gates=gates, branch=branch_of(opts),
                         copies=2, logprobs=True)
    torch.manual_seed(2)
    with gated(model, gates, sink=1, window=2):
        expected = rollouts(model, tokenizer, prompts, opts, sample=True, copies=2)
        teacher = completion_logprobs(model, out.sequences, out.mask, out.offset, copies=1, shared=False)
    assert torch.equal(out.sequences, expected[0]) and torch.equal(out.mask, expected[1])
    real = out.completion_mask.bool()
    assert real.sum() > 4 and (out.logprobs[~real] == 0).all()
    torch.testing.assert_close(out.logprobs[real], teacher[real], atol=1e-4, rtol=0)
    full = sampler.sample(prompts, rollout_sampling(tokenizer, opts, sample=False), gates=None,
                          branch=branch_of(opts))
    assert torch.equal(full.sequences, rollouts(model, tokenizer, prompts, opts, sample=False)[0])
