"""The teacher-forced backward of an RLKV step: micro-batches sized by tokens, activation checkpointing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from kvpress_rl.errors import KvrlError
from kvpress_rl.models import cache_kwargs


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


def pack_groups(prompt_len: list[int], completion_len: list[int], group_size: int, budget: int, shared: bool) -> list[range]:
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


def join_rollouts(parts: list[tuple[torch.Tensor, torch.Tensor, int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
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


def completion_logprobs(model, sequences: torch.Tensor, mask: torch.Tensor, offset: int, copies: int, shared: bool) -> torch.Tensor:
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
        hidden = decoder(input_ids=sequences, attention_mask=mask, position_ids=position, use_cache=False).last_hidden_state
        hidden = hidden[:, offset - 1 : -1]  # the positions that predict the completion tokens
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        prompt = decoder(input_ids=sequences[::copies, :offset], attention_mask=mask[::copies, :offset],
                         position_ids=position[::copies, :offset], **cache_kwargs(decoder, cache), use_cache=True).last_hidden_state
        cache.batch_repeat_interleave(copies)
        first = prompt[:, -1:].repeat_interleave(copies, dim=0)  # predicts the first completion token
        rest = decoder(input_ids=sequences[:, offset:], attention_mask=mask, position_ids=position[:, offset:], **cache_kwargs(decoder, cache),
                       use_cache=True).last_hidden_state
        hidden = torch.cat([first, rest[:, :-1]], dim=1)
    targets = sequences[:, offset:]
    real = mask[:, offset:].bool()
    picked_hidden, picked_targets = hidden[real], targets[real]
    parts = [checkpoint(_head_logprobs, head, picked_hidden[start:start + LOGPROB_CHUNK], picked_targets[start:start + LOGPROB_CHUNK],
                        use_reentrant=False) for start in range(0, len(picked_targets), LOGPROB_CHUNK)]
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        logprobs = logprobs.index_put((real.nonzero(as_tuple=True)), torch.cat(parts))
    return logprobs


def _head_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
