"""The teacher-forced backward of an RLKV step: micro-batches sized by tokens, activation checkpointing, the L1 term."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from kvpress_rl.distributed import all_sum, world
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import gated
from kvpress_rl.models import cache_kwargs, frozen
from kvpress_rl.strategies.rlkv.grpo import clipped_surrogate, level_weight, penalty_weight
from kvpress_rl.strategies.rlkv.options import RLKVOptions


@contextmanager
def checkpointed_layers(model, enabled: bool = True) -> Iterator[None]:
    """Activation checkpointing of the model's decoder layers while inside (non-reentrant, so it works on a
    frozen model whose inputs need no gradient, and gradients still reach gates used inside attention).

    The layers' forwards are wrapped for the duration and restored on exit. A checkpointed layer runs its
    forward again in the backward: it must not write a KV cache (the replay would append twice), so the
    caller runs whole sequences without one.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise KvrlError(f"gradient checkpointing: no decoder layers found in {type(model).__name__}")
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        forward = layer.forward

        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
    try:
        yield
    finally:
        for layer, previous in zip(layers, saved):
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def pack_groups(prompt_len: list[int], completion_len: list[int], group_size: int, budget: int,
                shared: bool) -> list[range]:
    """Consecutive whole groups per micro-batch, as many as fit in `budget` tokens through the model.

    A micro-batch's cost is counted on its trimmed, padded tensors: with the shared prompt, `groups *
    (P + G * C)`; without, `groups * G * (P + C)` (P, C: its longest prompt and completion). A single
    group over the budget goes alone.
    """
    def cost(start: int, end: int) -> int:
        p, c = max(prompt_len[start:end]), max(completion_len[start:end])
        per_group = p + group_size * c if shared else group_size * (p + c)
        return (end - start) * per_group

    parts, start = [], 0
    while start < len(prompt_len):
        end = start + 1
        while end < len(prompt_len) and cost(start, end + 1) <= budget:
            end += 1
        parts.append(range(start, end))
        start = end
    return parts


def join_rollouts(parts: list[tuple[torch.Tensor, torch.Tensor, int]],
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate `(sequences, mask, prompt_width)` batches of rollouts: prompts left-padded to the widest,
    completions right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    width = max(offset for _, _, offset in parts)
    length = max(seq.shape[1] - offset for seq, _, offset in parts)
    sequences, masks = [], []
    for seq, mask, offset in parts:
        left, right = width - offset, length - (seq.shape[1] - offset)
        sequences.append(torch.nn.functional.pad(seq, (left, right), value=pad_id))
        masks.append(torch.nn.functional.pad(mask, (left, right), value=0))
    return torch.cat(sequences), torch.cat(masks), width


LOGPROB_CHUNK = 1024  # completion tokens per output-head call: bounds the float logits to chunk x vocabulary


def completion_logprobs(model, sequences: torch.Tensor, mask: torch.Tensor, offset: int, copies: int,
                        shared: bool) -> torch.Tensor:
    """Log-probabilities `(rows, completion_tokens)` of the completion tokens under `model` (0 at padding),
    rows in groups of `copies` that share their prompt.

    `shared`: the prompt goes through the model once per group and its cache is repeated for the
    completions (with G = 4 and 220-token prompts under 50-token completions, the backward sees about
    2.5 times fewer tokens; gradients flow through the shared prompt). Otherwise every row runs whole,
    without a cache (what activation checkpointing needs).

    The decoder's hidden states go through the output head in chunks of `LOGPROB_CHUNK` real completion
    tokens, each chunk checkpointed: the full-vocabulary logits of a micro-batch (at a 152k vocabulary
    and 7,680 tokens, 4.7 GB in float32, more with the log-softmax and its gradient) never exist at once.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    if not shared:
        hidden = decoder(input_ids=sequences, attention_mask=mask, position_ids=position,
                         use_cache=False).last_hidden_state
        hidden = hidden[:, offset - 1 : -1]  # the positions that predict the completion tokens
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        prompt = decoder(input_ids=sequences[::copies, :offset], attention_mask=mask[::copies, :offset],
                         position_ids=position[::copies, :offset], **cache_kwargs(decoder, cache),
                         use_cache=True).last_hidden_state
        cache.batch_repeat_interleave(copies)
        first = prompt[:, -1:].repeat_interleave(copies, dim=0)  # predicts the first completion token
        rest = decoder(input_ids=sequences[:, offset:], attention_mask=mask, position_ids=position[:, offset:],
                       **cache_kwargs(decoder, cache), use_cache=True).last_hidden_state
        hidden = torch.cat([first, rest[:, :-1]], dim=1)
    targets = sequences[:, offset:]
    real = mask[:, offset:].bool()
    picked_hidden, picked_targets = hidden[real], targets[real]
    parts = [checkpoint(_head_logprobs, head, picked_hidden[start:start + LOGPROB_CHUNK],
                        picked_targets[start:start + LOGPROB_CHUNK], use_reentrant=False)
             for start in range(0, len(picked_targets), LOGPROB_CHUNK)]
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        logprobs = logprobs.index_put((real.nonzero(as_tuple=True)), torch.cat(parts))
    return logprobs


def _head_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@dataclass(frozen=True)
class MicroBatches:
    """A step's rows cut into micro-batches of whole groups of `copies` rollouts of one prompt."""

    parts: list[range]  # the groups of each micro-batch
    prompt_len: list[int]  # per group: its prompt's tokens
    completion_len: list[int]  # per group: its longest completion's tokens
    copies: int

    @property
    def rows(self) -> list[slice]:
        return [slice(part.start * self.copies, part.stop * self.copies) for part in self.parts]


def micro_batches(mask: torch.Tensor, offset: int, lengths: torch.Tensor, copies: int, budget: int,
                  shared: bool) -> MicroBatches:
    """The micro-batches of at most `budget` tokens through the model (`pack_groups`) of a step's rows."""
    prompt_len = [int(p) for p in mask[::copies, :offset].sum(1).tolist()]
    completion_len = lengths.reshape(-1, copies).max(1).values.long().tolist()
    parts = pack_groups(prompt_len, completion_len, copies, budget, shared)
    return MicroBatches(parts=parts, prompt_len=prompt_len, completion_len=completion_len, copies=copies)


def surrogate_backward(model, sequences: torch.Tensor, mask: torch.Tensor, offset: int, advantages: torch.Tensor,
                       batches: MicroBatches, tokens: float, epsilon: float, shared: bool) -> int:
    """Backward of the clipped surrogate over `tokens` completion tokens, micro-batch by micro-batch; returns the
    padded tokens that went through the model."""
    copies = batches.copies
    comp_mask = mask[:, offset:].float()
    forward_tokens = 0
    for part in batches.parts:
        # a group whose advantages are all 0 adds exactly nothing to the surrogate or its gradient: it is not run
        live = [g for g in part if advantages[g * copies:(g + 1) * copies].any()]
        if not live:
            continue
        row = torch.tensor([g * copies + j for g in live for j in range(copies)])
        prompt = max(batches.prompt_len[g] for g in live)
        width = max(batches.completion_len[g] for g in live)
        seq = sequences[row, offset - prompt:offset + width]
        seq_mask = mask[row, offset - prompt:offset + width]
        forward_tokens += seq.numel() if not shared else seq.shape[0] // copies * prompt + seq.shape[0] * width
        logp = completion_logprobs(model, seq, seq_mask, prompt, copies, shared)
        # one update per batch: the sampling policy is the current one, so old = new (detached)
        surrogate = clipped_surrogate(logp, logp.detach(), advantages[row.to(advantages.device)],
                                      comp_mask[row, :width].to(logp.device), epsilon)
        (-surrogate / tokens).backward()
    return forward_tokens


def l1_weight(rewards: torch.Tensor, options: RLKVOptions, batches: MicroBatches, lengths: torch.Tensor,
              local_tokens: float) -> tuple[float, float]:
    """`(beta_prime, r_bar)`: the L1 weight at `options.reward_level` and the mean reward of the whole batch, the
    same on every process."""
    o = options
    # r_bar of the whole batch, on every process: summed rewards over summed counts
    reward_sum, count = all_sum(torch.tensor([rewards.sum().item(), rewards.numel()], dtype=torch.float64)).tolist()
    mean_reward = reward_sum / max(count, 1.0)
    if o.reward_level == "batch":
        return penalty_weight(mean_reward, o.beta, o.tau, o.adaptive_penalty), mean_reward
    # this process's weighted sum (per group, or per micro-batch token), over the total of every process
    local = level_weight(rewards, o.reward_level, o.beta, o.tau, o.adaptive_penalty, group_size=batches.copies,
                         parts=batches.rows, tokens=lengths.cpu())
    weight = rewards.numel() / batches.copies if o.reward_level == "group" else local_tokens
    total, weights = all_sum(torch.tensor([local * weight, weight], dtype=torch.float64)).tolist()
    return (total / weights if weights else 0.0), mean_reward


def sum_gate_gradients(gates: torch.Tensor) -> None:
    """Sum the gate gradients over data-parallel processes (each already over the global token count)."""
    _, size = world()
    if size > 1:
        if gates.grad is None:
            gates.grad = torch.zeros_like(gates)
        all_sum(gates.grad)


def policy_backward(model, gates: torch.Tensor, sequences: torch.Tensor, mask: torch.Tensor, offset: int,
                    advantages: torch.Tensor, rewards: torch.Tensor, sink: int, window: int, *, options: RLKVOptions,
                    copies: int) -> dict:
    """`RLKV.policy_backward` with resolved `options`: the surrogate's backward, then the L1 term's."""
    o = options
    checkpointing = bool(o.gradient_checkpointing)
    shared = not checkpointing  # a checkpointed layer cannot write the prompt cache (see checkpointed_layers)
    lengths = mask[:, offset:].float().sum(1)
    local_tokens = lengths.sum().item()
    tokens = max(all_sum(torch.tensor([local_tokens], dtype=torch.float64)).item(), 1.0)  # the global loss weight
    batches = micro_batches(mask, offset, lengths, copies, o.micro_batch_tokens, shared)
    with (frozen(model), gated(model, gates, sink=sink, window=window, mask=o.train_mask, block_size=o.block_size),
          checkpointed_layers(model, checkpointing)):
        forward_tokens = surrogate_backward(model, sequences, mask, offset, advantages.flatten().to(sequences.device),
                                            batches, tokens, o.epsilon, shared)
    beta_prime, mean_reward = l1_weight(rewards.flatten().float(), o, batches, lengths, local_tokens)
    sum_gate_gradients(gates)
    # The L1 term goes in after the sum, on every process alike: the summed gradients are identical on
    # every process, so adding the same term to each counts it exactly once per step.
    if beta_prime:
        (beta_prime * gates.clamp(0.0, 1.0).mean()).backward()
    return {"tokens": int(tokens), "micro_batches": len(batches.parts), "forward_tokens": int(forward_tokens),
            "beta_prime": beta_prime, "mean_reward": mean_reward, "reward_level": o.reward_level}
