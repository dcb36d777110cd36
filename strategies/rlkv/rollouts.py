"""Generation for RLKV: prompts in the chat format, sampled rollouts in groups, and the self-distillation pass.

`LearnerSampler` is the learner's own `RolloutSampler` (`kvpress_rl/sampling.py`): RLKV's decoding loop in
transformers (`decode`), the model gated by `kvpress_rl.executor.gated.gated`. `generate` and `rollouts` run the model
as it is, with the sampling settings of the options passed in (tests and benchmarks wrap them in `gated`).
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from kvpress_rl.distributed import all_gather, world
from kvpress_rl.embedded.data import left_pad
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import gated
from kvpress_rl.models import cache_kwargs
from kvpress_rl.sampling import GatedBranch, Rollouts, RolloutSampler, Sampling
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


def rollout_sampling(tokenizer, options: RLKVOptions, sample: bool) -> Sampling:
    """The options' sampling (`temperature`, None meaning 1.0; `max_new_tokens`), or greedy decoding (`sample`
    False), ended by the tokenizer's `end_ids`."""
    temperature = (1.0 if options.temperature is None else options.temperature) if sample else None
    return Sampling(temperature=temperature, max_new_tokens=options.max_new_tokens, stop_ids=tuple(end_ids(tokenizer)),
                    pad_id=tokenizer.pad_token_id)


def sample_batch(model, prompts: list[list[int]], sampling: Sampling, copies: int = 1,
                 logprobs: bool = False) -> Rollouts:
    """Left-padded prompts, each sampled `copies` times by `decode`.

    The copies of a prompt share one prefill: its cache (all but the last prompt token) is computed
    once and repeated, so a group of G rollouts costs one prompt forward instead of G.
    """
    ids, mask = left_pad(prompts, sampling.pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        cache = None
        if copies > 1:
            cache = shared_prefill(model, ids, mask, copies)
            ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
        completions, sampled = decode(model, ids, mask, cache, sampling.max_new_tokens, sampling.temperature,
                                      list(sampling.stop_ids), sampling.pad_id, record_logprobs=logprobs)
    full_mask = torch.cat([mask, completion_mask(completions, list(sampling.stop_ids))], dim=1)
    if sampled is not None:
        sampled = sampled * full_mask[:, ids.shape[1]:]
    return Rollouts(torch.cat([ids, completions], dim=1), full_mask, ids.shape[1], sampled)


def generate(model, tokenizer, prompts: list[list[int]], options: RLKVOptions, sample: bool,
             copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(sequences, attention_mask, completion_start)` of `sample_batch` at the options' sampling (`sample` False:
    greedy)."""
    out = sample_batch(model, prompts, rollout_sampling(tokenizer, options, sample), copies)
    return out.sequences, out.mask, out.offset


def decode(model, ids: torch.Tensor, mask: torch.Tensor, cache, max_new_tokens: int, temperature: float | None,
           stops: list[int], pad_id: int, record_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New tokens `(rows, <= max_new_tokens)` after left-padded `ids`: sampled at `temperature` from the full
    distribution (no top-k, no top-p), or greedy when it is None; a row that emitted a stop token continues with
    `pad_id`, and decoding ends when every row has stopped. `cache`: the KV cache of `ids[:, :-1]` (None: the whole
    prompt is prefilled here). With `record_logprobs`, also each new token's log-probability under the model's own
    distribution (before temperature, as vLLM reports it); else None.

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
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=feed, attention_mask=mask, position_ids=at, **cache_kwargs(model, cache),
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        token = logits.argmax(-1) if temperature is None else sample_tokens(logits / temperature)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if record_logprobs:
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1))
        tokens.append(token)
        done |= torch.isin(token, stop_ids)
        if bool(done.all()):
            break
        feed, at = token[:, None], at[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    new = torch.stack(tokens, dim=1) if tokens else ids.new_zeros((ids.shape[0], 0))
    if not record_logprobs:
        return new, None
    return new, torch.stack(logprobs, dim=1) if logprobs else torch.zeros(new.shape)


def sample_tokens(logits: torch.Tensor) -> torch.Tensor:
    """One token per row from `softmax(logits)`, by inverting its cumulative distribution at one uniform draw."""
    cumulative = torch.softmax(logits, dim=-1).cumsum(-1)
    draw = torch.rand((logits.shape[0], 1), device=logits.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def join(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Batches of rollouts as one: prompts left-padded to the widest, completions right-padded to the longest."""
    sequences, mask, offset = join_rollouts([(p.sequences, p.mask, p.offset) for p in parts], pad_id)
    if parts[0].logprobs is None:
        return Rollouts(sequences, mask, offset)
    width = sequences.shape[1] - offset
    logprobs = torch.cat([torch.nn.functional.pad(p.logprobs, (0, width - p.logprobs.shape[1])) for p in parts])
    return Rollouts(sequences, mask, offset, logprobs)


class LearnerSampler:
    """The learner's own `RolloutSampler`: `decode` over `batch` prompts at a time (None: all at once), the model
    gated under `gates` by `kvpress_rl.executor.gated.gated` (None: the model as it is, every head full)."""

    name = "transformers"

    def __init__(self, model, batch: int | None = None) -> None:
        self.model, self.batch = model, batch

    def sample(self, prompts: list[list[int]], sampling: Sampling, *, gates: torch.Tensor | None,
               branch: GatedBranch, copies: int = 1, logprobs: bool = False) -> Rollouts:
        batch = self.batch or len(prompts)
        under = nullcontext() if gates is None else gated(self.model, gates, sink=branch.sink, window=branch.window,
                                                           mask=branch.mask, block_size=branch.block_size)
        with under:
            parts = [sample_batch(self.model, prompts[i:i + batch], sampling, copies, logprobs)
                     for i in range(0, len(prompts), batch)]
        return join(parts, sampling.pad_id)

    def close(self) -> None:
        pass


def rollouts(model, tokenizer, prompts: list[list[int]], options: RLKVOptions, sample: bool,
             copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`generate` over `options.rollout_batch` prompts at a time (None: all at once), joined into one
    left/right-padded batch: the model as it is."""
    out = LearnerSampler(model, options.rollout_batch).sample(
        prompts, rollout_sampling(tokenizer, options, sample), gates=None, branch=branch_of(options), copies=copies)
    return out.sequences, out.mask, out.offset


def branch_of(options: RLKVOptions) -> GatedBranch:
    """The streaming branch the options train against."""
    return GatedBranch(sink=options.sink, window=options.window, mask=options.train_mask,
                       block_size=options.block_size)


def self_distill(sampler: RolloutSampler, tokenizer, pool: list[RewardProblem], options: RLKVOptions,
                 rng: random.Random) -> tuple[list[tuple[RewardProblem, int]], float]:
    """The fixed training set: distinct problems the model solves greedily with the full cache (`sampler`, every
    head full), chosen once stratified by the length of its solution (`training_set`), as `(problem, solution
    tokens)` pairs; and the fraction of the pool solved. Under data parallelism each process decodes its share of
    the pool."""
    o = options
    rank, size = world()
    mine: list[tuple[int, int]] = []  # (index in the pool, solution tokens) of what this process solved
    indices = list(range(rank, len(pool), size))
    chunk_size = max(16, (o.rollout_batch or 0) * o.group_size)
    greedy = rollout_sampling(tokenizer, o, sample=False)
    for start in range(0, len(indices), chunk_size):
        chunk = indices[start:start + chunk_size]
        prompts = [chat_ids(tokenizer, pool[i].prompt) for i in chunk]
        out = sampler.sample(prompts, greedy, gates=None, branch=branch_of(o))
        for index, row, row_mask in zip(chunk, out.sequences[:, out.offset:], out.completion_mask):
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
