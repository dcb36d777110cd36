"""The pieces of RLKV's objective (GRPO without KL, plus the adaptive L1 penalty on the gates)."""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's form: z-score within each group. `rewards (prompts, group)`; equal rewards give 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The official code's form: 0/1 rewards mapped to -5/+5, z-scored over the whole batch."""
    scaled = rewards * 10.0 - 5.0
    std = scaled.std(unbiased=False)
    return (scaled - scaled.mean()) / (std + eps) if std > eps else torch.zeros_like(scaled)


def penalty_weight(mean_reward: float, beta: float, tau: float, adaptive: bool = True) -> float:
    """`beta' = 1[r_bar > tau] * beta * (exp(r_bar) - 1)`; with `adaptive=False` a constant `beta`."""
    if not adaptive:
        return beta
    return beta * (math.exp(mean_reward) - 1.0) if mean_reward > tau else 0.0


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Sum over completion tokens of the clipped PPO surrogate (to be divided by the token count).

    `logp`, `old_logp`, `mask`: `(sequences, tokens)`; `advantages`: `(sequences,)`.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * adv)
    return (surrogate * mask).sum()
