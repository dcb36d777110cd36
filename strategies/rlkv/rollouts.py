"""Generation for RLKV: prompts in the chat format, sampled rollouts in groups, and the self-distillation pass.

`generate` and `rollouts` run the model as it is: a caller that wants the gated model wraps them in
`kvpress_rl.executor.gated.gated`. Their sampling settings (`temperature`, `max_new_tokens`,
`rollout_batch`) come from the options passed in.
"""

from __future__ import annotations

import random

import torch
from transformers import DynamicCache

from kvpress_rl.distributed import all_gather, world
from kvpress_rl.embedded.data import left_pad
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import new_gates
from kvpress_rl.models import cache_kwargs
from kvpress_rl.strategies.rlkv.backward import join_rollouts
from kvpress_rl.strategies.rlkv.options import RLKVOptions
from kvpress_rl.strategies.rlkv.problems import RewardProblem, training_set


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as a user turn of the tokenizer's chat template (plain ids without one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def end_ids(tokenizer) -> list[int]:
    """Token ids that end a completion: the tokenizer's end of sequence and, where it has one, `<|im_end|>`."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return [i for i in ids | {im_end} if i is not None]


def completion_mask(completions: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first stop token."""
    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return (~after).long()


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of `ids[:, :-1]`, each row repeated `copies` times (`generate` then feeds the last token)."""
    cache = DynamicCache(config=model.config)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position[:, :-1],
          **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(copies)
    return cache


def generate(model, tokenizer, prompts: list[list[int]], options: RLKVOptions, sample: bool,
             copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(sequences, attention_mask, completion_start)` for left-padded prompts, each sampled `copies` times
    (`options.temperature`, None meaning 1.0) or decoded greedily, `options.max_new_tokens` at most.

    The copies of a prompt share one prefill: its cache (all but the last prompt token) is computed
    once and repeated, so a group of G rollouts costs one prompt forward instead of G.
    """
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    temperature = (1.0 if options.temperature is None else options.temperature) if sample else None
    with torch.no_grad():
        cache = None
        if copies > 1:
            cache = shared_prefill(model, ids, mask, copies)
            ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
        completions = decode(model, ids, mask, cache, options.max_new_tokens, temperature, end_ids(tokenizer),
                             tokenizer.pad_token_id)
    full_mask = torch.cat([mask, completion_mask(completions, end_ids(tokenizer))], dim=1)
    return torch.cat([ids, completions], dim=1), full_mask, ids.shape[1]


def decode(model, ids: torch.Tensor, mask: torch.Tensor, cache, max_new_tokens: int, temperature: float | None,
           stops: list[int], pad_id: int) -> torch.Tensor:
    """New tokens `(rows, <= max_new_tokens)` after left-padded `ids`: sampled at `temperature` from the full
    distribution (no top-k, no top-p), or greedy when it is None; a row that emitted a stop token continues with
    `pad_id`, and decoding ends when every row has stopped. `cache`: the KV cache of `ids[:, :-1]` (None: the whole
    prompt is prefilled here).

    transformers' `generate` with the same settings, minus what a rollout does not need: its sampler draws one
    exponential per vocabulary entry per row and step (`torch.multinomial`: a fifth of a bfloat16 rollout on the
    embedded model); `sample_tokens` draws one uniform per row.
    """
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    if cache is None:
        cache = DynamicCache(config=model.config)
        feed, at = ids, position
    else:
        feed, at = ids[:, -1:], position[:, -1:]
    stop_ids = torch.tensor(stops, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=feed, attention_mask=mask, position_ids=at, **cache_kwargs(model, cache),
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        token = logits.argmax(-1) if temperature is None else sample_tokens(logits / temperature)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done |= torch.isin(token, stop_ids)
        if bool(done.all()):
            break
        feed, at = token[:, None], at[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    return torch.stack(tokens, dim=1) if tokens else ids.new_zeros((ids.shape[0], 0))


def sample_tokens(logits: torch.Tensor) -> torch.Tensor:
    """One token per row from `softmax(logits)`, by inverting its cumulative distribution at one uniform draw."""
    cumulative = torch.softmax(logits, dim=-1).cumsum(-1)
    draw = torch.rand((logits.shape[0], 1), device=logits.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def rollouts(model, tokenizer, prompts: list[list[int]], options: RLKVOptions, sample: bool,
             copies: int = 1, *, engine=None,
             gates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`generate` over `options.rollout_batch` prompts at a time (None: all at once), joined into one
    left/right-padded batch. With an `engine` (`SelectionContext.rollout_engine`), the engine samples them all
    from the gated model under `gates` and `model` is not used."""
    if engine is not None:
        temperature = (1.0 if options.temperature is None else options.temperature) if sample else None
        return engine.generate(gates, prompts, copies=copies, temperature=temperature,
                               max_new_tokens=options.max_new_tokens, stop_ids=end_ids(tokenizer),
                               pad_id=tokenizer.pad_token_id)
    batch = options.rollout_batch or len(prompts)
    parts = [generate(model, tokenizer, prompts[i:i + batch], options, sample, copies)
             for i in range(0, len(prompts), batch)]
    return join_rollouts(parts, tokenizer.pad_token_id)


def self_distill(model, tokenizer, pool: list[RewardProblem], options: RLKVOptions,
                 rng: random.Random, engine=None) -> tuple[list[tuple[RewardProblem, int]], float]:
    """The fixed training set: distinct problems the model solves greedily with the full cache, chosen once
    stratified by the length of its solution (`training_set`), as `(problem, solution tokens)` pairs; and
    the fraction of the pool solved. Under data parallelism each process decodes its share of the pool.
    With an `engine`, it decodes them (every gate at 1: the full cache)."""
    o = options
    rank, size = world()
    mine: list[tuple[int, int]] = []  # (index in the pool, solution tokens) of what this process solved
    indices = list(range(rank, len(pool), size))
    chunk_size = max(16, (o.rollout_batch or 0) * o.group_size)
    for start in range(0, len(indices), chunk_size):
        chunk = indices[start:start + chunk_size]
        prompts = [chat_ids(tokenizer, pool[i].prompt) for i in chunk]
        if engine is not None:
            out, mask, offset = rollouts(model, tokenizer, prompts, o, sample=False, engine=engine,
                                         gates=new_gates(model, 1.0).detach())
        else:
            out, mask, offset = generate(model, tokenizer, prompts, o, sample=False)
        for index, row, row_mask in zip(chunk, out[:, offset:], mask[:, offset:]):
            text = tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True)
            if pool[index].verify(text, pool[index].answer):
                mine.append((index, int(row_mask.sum())))
    solved = [(pool[index], length) for index, length in sorted(pair for part in all_gather(mine) for pair in part)]
    if not solved:
        raise KvrlError("self-distillation kept no problem: the model solves none of the pool at full cache; "
                        "use a larger --pool-size or --no-self-distillation")
    lengths = {id(problem): length for problem, length in solved}
    chosen = training_set(solved, o.train_set_size, tuple(o.length_bins), tuple(o.bin_proportions), rng)
    return [(problem, lengths[id(problem)]) for problem in chosen], len(solved) / len(pool)
