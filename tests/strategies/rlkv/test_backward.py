"""The teacher-forced backward (`backward.py`): shared prompts, micro-batches, activation checkpointing and the
output head in chunks give the gradients of one plain call; the L1 weight at each reward level."""

import math

import pytest
import torch

from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.models import frozen
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions, backward
from kvpress_rl.strategies.rlkv.backward import completion_logprobs
from kvpress_rl.strategies.rlkv.grpo import clipped_surrogate
from tests.strategies.rlkv.helpers import backward_options, random_gates_and_rollouts, sampled_step


def test_the_default_l1_weight_takes_r_bar_over_the_whole_batch_not_per_micro_batch(tiny):
    model, tokenizer = tiny  # a real model's defaults (llama): reward_level left unset
    learner = RLKV(RLKVOptions(max_new_tokens=8, sink=1, window=2, train_mask="token", gradient_checkpointing=False,
                               micro_batch_tokens=1, beta=1.0, tau=0.5))
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    # micro-batches (one group each) at r_bar 1, 0.75, 0.25
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0])
    stats = learner.policy_backward(model, gates, sequences, mask, offset, torch.zeros(12), rewards, 1, 2)
    assert learner.options.reward_level == "batch" and learner.sources["reward_level"] == "official"
    assert stats["micro_batches"] == 3 and stats["mean_reward"] == pytest.approx(8 / 12)
    # per micro-batch it would be ~ (e - 1) and (e^0.75 - 1)
    assert stats["beta_prime"] == pytest.approx(math.exp(8 / 12) - 1)
    torch.testing.assert_close(gates.grad, torch.full_like(gates, stats["beta_prime"] / gates.numel()))


def test_rollouts_of_a_prompt_share_its_forward_in_the_backward_with_the_same_logprobs_and_gradients(tiny):
    model, tokenizer = tiny
    gates, (sequences, mask, offset) = random_gates_and_rollouts(model, tokenizer, RLKVOptions(max_new_tokens=8),
                                                                 seed=0)
    completion = mask[:, offset:]
    assert completion.sum(1).min() < completion.shape[1]  # some rows stop early: right padding is exercised
    results = []
    for shared in (False, True):
        gates.grad = None
        with frozen(model), gated(model, gates, sink=1, window=2):
            if shared:
                logp = completion_logprobs(model, sequences, mask, offset, 4, shared=True)
            else:  # every row through the model on its own: the plain teacher-forced forward
                position = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = model(input_ids=sequences, attention_mask=mask, position_ids=position).logits[:, offset - 1:-1]
                logp = torch.log_softmax(logits.float(), -1).gather(-1, sequences[:, offset:, None]).squeeze(-1)
            (logp * completion).sum().backward()
        results.append((logp.detach() * completion, gates.grad.clone()))
    assert results[0][1].abs().max() > 0
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


@pytest.mark.parametrize("level, expected", [
    ("batch", 1.0 * (math.exp(0.75) - 1)),                                           # r_bar = 9 / 12
    ("group", (0.0 + (math.exp(0.75) - 1) + (math.exp(1.0) - 1)) / 3),             # groups 0.5 (off), 0.75, 1.0
])
def test_the_l1_weight_takes_r_bar_at_the_chosen_level(tiny, level, expected):
    model, tokenizer = tiny
    learner = RLKV(backward_options(reward_level=level, beta=1.0, tau=0.5))
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    stats = learner.policy_backward(model, gates, sequences, mask, offset, torch.zeros(12), rewards, 1, 2)
    assert stats["beta_prime"] == pytest.approx(expected) and stats["reward_level"] == level
    torch.testing.assert_close(gates.grad, torch.full_like(gates, expected / gates.numel()))  # only the L1 term acts


@pytest.mark.parametrize("level", ["batch", "group", "micro-batch"])
def test_with_advantages_the_gradient_is_the_surrogate_s_plus_the_l1_penalty_s(tiny, level):
    model, tokenizer = tiny
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    sequences, mask, offset = sampled_step(model, tokenizer, RLKV(backward_options()), gates)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = torch.linspace(-1.0, 1.0, 12)
    grads, stats = [], []
    for beta in (0.0, 1.0):  # the surrogate alone, then with the L1 term
        learner = RLKV(backward_options(reward_level=level, beta=beta, tau=0.5, micro_batch_tokens=1))
        gates.grad = None
        stats.append(learner.policy_backward(model, gates, sequences, mask, offset, advantages, rewards, 1, 2))
        grads.append(gates.grad.clone())
    tokens = mask[:, offset:].sum(1).reshape(3, 4).sum(1).float()
    weights = torch.tensor([0.0, math.exp(0.75) - 1, math.exp(1.0) - 1])  # groups at r_bar 0.5 (off), 0.75, 1.0
    expected = {"batch": math.exp(0.75) - 1, "group": float(weights.mean()),
                "micro-batch": float((weights * tokens).sum() / tokens.sum())}[level]
    assert stats[0]["beta_prime"] == 0.0 and stats[1]["beta_prime"] == pytest.approx(expected)
    assert grads[0].abs().max() > 0 and stats[1]["micro_batches"] == 3
    torch.testing.assert_close(grads[1], grads[0] + expected / gates.numel(), atol=1e-6, rtol=1e-5)


def test_the_micro_batch_level_weights_each_micro_batch_by_its_tokens(tiny):
    model, tokenizer = tiny
    # one group each
    learner = RLKV(backward_options(reward_level="micro-batch", beta=1.0, tau=0.5, micro_batch_tokens=1))
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    stats = learner.policy_backward(model, gates, sequences, mask, offset, torch.zeros(12), rewards, 1, 2)
    tokens = mask[:, offset:].sum(1).reshape(3, 4).sum(1).float()
    weights = torch.tensor([0.0, math.exp(0.75) - 1, math.exp(1.0) - 1])
    assert stats["micro_batches"] == 3
    assert stats["beta_prime"] == pytest.approx(float((weights * tokens).sum() / tokens.sum()))


def test_activation_checkpointing_gives_the_same_gate_gradients(tiny):
    model, tokenizer = tiny
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    learner = RLKV(backward_options(beta=0.0))
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    advantages = torch.linspace(-1.0, 1.0, 12)
    grads, stats, runs = [], [], []
    calls = []  # the first decoder layer's attention runs: once per forward, and again when a checkpoint recomputes
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for checkpointing, budget in ((False, 10_000), (True, 10_000), (True, 1)):
            learner = RLKV(backward_options(beta=0.0, gradient_checkpointing=checkpointing, micro_batch_tokens=budget))
            gates.grad = None
            calls.clear()
            stats.append(learner.policy_backward(model, gates, sequences, mask, offset, advantages, torch.zeros(12), 1,
                                                 2))
            grads.append(gates.grad.clone())
            runs.append(len(calls))
    finally:
        hook.remove()
    assert grads[0].abs().max() > 0 and [s["micro_batches"] for s in stats] == [1, 1, 3]
    # without checkpointing: the shared prompt, then the completions (2 forwards); with it, each micro-batch's
    # whole sequences once forward and once recomputed in the backward
    assert runs == [2, 2, 6]
    assert stats[1]["forward_tokens"] > stats[0]["forward_tokens"]  # whole sequences: the prompt once per row
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters()) and "forward" not in model.model.layers[0].__dict__


@pytest.mark.parametrize("shared", [False, True])
def test_the_output_head_in_chunks_gives_the_logprobs_and_gradients_of_one_call(tiny, monkeypatch, shared):
    model, tokenizer = tiny
    gates, (sequences, mask, offset) = random_gates_and_rollouts(model, tokenizer, RLKVOptions(max_new_tokens=8),
                                                                 seed=1)
    calls = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    results = []
    try:
        for chunk in (10_000, 3):
            monkeypatch.setattr(backward, "LOGPROB_CHUNK", chunk)
            calls.clear()
            gates.grad = None
            with frozen(model), gated(model, gates, sink=1, window=2):
                logp = backward.completion_logprobs(model, sequences, mask, offset, 4, shared=shared)
                logp.sum().backward()
            results.append((logp.detach(), gates.grad.clone(), list(calls)))
    finally:
        hook.remove()
    real = int(mask[:, offset:].sum())
    # chunks of 3 real tokens, each run again in the backward
    assert max(results[1][2]) <= 3 and sum(results[1][2]) == 2 * real
    assert torch.equal(results[0][0] == 0, mask[:, offset:] == 0)  # padding gets 0, real tokens a log-probability < 0
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6) and results[0][1].abs().max() > 0


def test_groups_whose_advantages_are_all_zero_are_not_run_and_the_gradient_is_unchanged(tiny):
    model, tokenizer = tiny
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    sequences, mask, offset = sampled_step(model, tokenizer, RLKV(backward_options()), gates)
    # the middle group agrees
    advantages = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.2, -0.6, -0.6])
    learner = RLKV(backward_options(beta=0.0))
    gates.grad = None
    stats = learner.policy_backward(model, gates, sequences, mask, offset, advantages, torch.ones(12), 1, 2)
    skipped = gates.grad.clone()
    gates.grad = None
    completion = mask[:, offset:].float()
    with frozen(model), gated(model, gates, sink=1, window=2):  # every row, the middle group included
        logp = completion_logprobs(model, sequences, mask, offset, 4, shared=False)
        (-clipped_surrogate(logp, logp.detach(), advantages, completion, 0.4) / completion.sum()).backward()
    torch.testing.assert_close(skipped, gates.grad, atol=1e-6, rtol=1e-5)
    assert skipped.abs().max() > 0
    prompt = int(mask[::4, :offset].sum(1).max())
    width = int(completion.sum(1).max())
    assert stats["forward_tokens"] <= 2 * (prompt + 4 * width)  # two of the three groups went through the model
