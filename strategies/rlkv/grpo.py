"""The pieces of RLKV's objective (GRPO without KL, plus the adaptive L1 penalty on the gates)."""

from __future__ import annotations

import math

import torch

REWARD_LEVELS = ("batch", "group", "micro-batch")

# How a step's 0/1 rewards become advantages (`RLKVOptions.advantage`), as `kvrl select` prints them.
ADVANTAGES = {
    "group": "z-score within each prompt's group, the paper's text",
    "batch": "token-weighted batch z-score of (r - 0.5) * 10, the official training's adv_norm",
}

# The official training (AReaL fork, examples/rlkv/*_grpo.yaml and AReaL's NormConfig): `reward_bias: -0.5`,
# `reward_scaling: 10`, `adv_norm: {mean_level: batch, std_level: batch}` with the unbiased std and eps 1e-5.
REWARD_BIAS = -0.5
REWARD_SCALING = 10.0
BATCH_EPS = 1e-5


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's form: z-score within each group. `rewards (prompts, group)`; equal rewards give 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def batch_advantages(rewards: torch.Tensor, lengths: torch.Tensor, eps: float = BATCH_EPS, reduce=None) -> torch.Tensor:
    """The official code's form (AReaL's `adv_norm` over the batch): per sequence, `(r - 0.5) * 10` (0/1 to
    -5/+5) carried by each of its completion tokens; normalised with the token-weighted mean and the
    unbiased token std of the whole batch, `(x - mean) / (std + eps)`. A group whose samples agree still
    gets the batch's signal (`(x - mean) / std`, not 0) unless the whole batch agrees.

    `rewards`, `lengths` (completion tokens): `(sequences,)` or any shape, flattened; returns `(sequences,)`.
    `reduce`, if given, sums a float64 tensor over data-parallel processes (the official code
    normalises over the whole batch of every process).
    """
    x = (rewards.flatten().double() + REWARD_BIAS) * REWARD_SCALING
    n = lengths.flatten().double()
    sums = torch.stack([n.sum(), (n * x).sum(), (n * x * x).sum()])
    if reduce is not None:
        sums = reduce(sums)
    count, total, squares = sums.tolist()
    if count <= 1:
        return torch.zeros_like(x, dtype=torch.float32)
    mean = total / count
    var = max(squares / count - mean * mean, 0.0) * count / (count - 1)
    return ((x - mean) / (math.sqrt(var) + eps)).float()


def step_advantages(kind: str, rewards: torch.Tensor, lengths: torch.Tensor, group_size: int,
                    reduce=None) -> torch.Tensor:
    """Advantages `(sequences,)` of one step's raw 0/1 `rewards (sequences,)`, rows in groups of `group_size`
    rollouts of one prompt, by `kind` (`ADVANTAGES`): `batch` weighs each sequence by its completion `lengths`
    and normalises over every process (`reduce`); `group` needs neither."""
    if kind == "batch":
        return batch_advantages(rewards, lengths, reduce=reduce)
    if kind == "group":
        return group_advantages(rewards.reshape(-1, group_size)).flatten()
    raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {kind!r}")


def penalty_weight(mean_reward: float, beta: float, tau: float, adaptive: bool = True) -> float:
    """`beta' = 1[r_bar > tau] * beta * (exp(r_bar) - 1)`; with `adaptive=False` a constant `beta`."""
    if not adaptive:
        return beta
    return beta * (math.exp(mean_reward) - 1.0) if mean_reward > tau else 0.0


def level_weight(rewards: torch.Tensor, level: str, beta: float, tau: float, adaptive: bool = True, *,
                 group_size: int = 1, parts: list[slice] | None = None, tokens: torch.Tensor | None = None) -> float:
    """The L1 weight of one step for this process's raw 0/1 `rewards (sequences,)`, by where `r_bar` is taken.

    - `batch`: `beta'(mean of all rewards)` (the caller passes the batch of every process).
    - `group`: the mean over prompt groups of `beta'(r_bar of the group)`.
    - `micro-batch`: per backward micro-batch (`parts`, slices of sequences), `beta'(r_bar of the micro-batch)`
      weighted by the micro-batch's share of the completion `tokens (sequences,)`, so the total weight
      stays comparable to the other levels.
    """
    rewards = rewards.flatten().float()
    if level == "batch":
        return penalty_weight(rewards.mean().item(), beta, tau, adaptive)
    if level == "group":
        groups = rewards.reshape(-1, group_size).mean(dim=1)
        return sum(penalty_weight(r, beta, tau, adaptive) for r in groups.tolist()) / len(groups)
    if level == "micro-batch":
        if parts is None or tokens is None:
            raise ValueError("the micro-batch level needs the micro-batches and their tokens")
        total = float(tokens.sum()) or 1.0
        return sum(penalty_weight(rewards[p].mean().item(), beta, tau, adaptive) * float(tokens[p].sum()) / total
                   for p in parts)
    raise ValueError(f"reward level must be one of {', '.join(REWARD_LEVELS)}, got {level!r}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      epsilon: float) -> torch.Tensor:
    """Sum over completion tokens of the clipped PPO surrogate (to be divided by the token count).

    `logp`, `old_logp`, `mask`: `(sequences, tokens)`; `advantages`: `(sequences,)`.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * adv)
    return (surrogate * mask).sum()
