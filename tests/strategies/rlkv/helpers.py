"""What the RLKV test modules share: options of a tiny run, sampled rollouts under gates."""


import torch

from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.strategies.rlkv import RLKVOptions
from kvpress_rl.strategies.rlkv.rollouts import generate, rollouts


def options(path, **extra):
    base = dict(data=str(path), steps=3, prompts_per_step=2, group_size=4, max_new_tokens=3, self_distillation=False,
                lr=0.05, checkpoint_every=1, micro_batch_tokens=40, sink=1, window=2, train_mask="token",
                gradient_checkpointing=False)
    base.update(extra)
    return RLKVOptions(**base)


def random_gates_and_rollouts(model, tokenizer, opts, seed: int):
    """Gates drawn uniformly in [0, 1] and 4 sampled rollouts of each of 3 prompts under them (sink 1, window 2)."""
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=", "456+78=")]
    torch.manual_seed(seed)
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.0, 1.0)
    with gated(model, gates, sink=1, window=2):
        return gates, generate(model, tokenizer, prompts, opts, sample=True, copies=4)


def sampled_step(model, tokenizer, learner, gates):
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=", "456+78=")]
    torch.manual_seed(0)
    with gated(model, gates, sink=1, window=2):
        return rollouts(model, tokenizer, prompts, learner.options, sample=True, copies=4)


def backward_options(**extra):
    base = dict(max_new_tokens=8, sink=1, window=2, train_mask="token", gradient_checkpointing=False,
                micro_batch_tokens=10_000)
    base.update(extra)
    return RLKVOptions(**base)


class Interrupted(Exception):
    pass
