"""RLKV's gate learner: GRPO without KL on the model's own reasoning rewards, gates only.

One gate alpha per (layer, KV head) in the executor's gated mixed attention
(`alpha * full + (1 - alpha) * streaming`), initialised to 1 and kept in [0, 1] (projected
after every optimizer step, so every forward sees clamped gates); the model is frozen. Each step
samples `group_size` completions per prompt from the *gated* model, rewards them with the task's
verifier, and minimises

    -clipped_surrogate (token-level mean, epsilon 0.4) + beta' * mean(alpha)

with `beta' = 1[r_bar > tau] * beta * (exp(r_bar) - 1)`. The L1 term is part of the loss, not the
reward: a penalty shared by a whole group has zero group-relative advantage. Problems come from a
self-distillation pass: greedy full-cache answers on a pool, keeping what the model solves; a fixed
set of distinct problems is chosen once from them, stratified by the length of the model's own
solution, and iterated epoch by epoch in a seeded shuffle. The chosen set is written to the work folder
(`train_set.jsonl`); `--resume` reads it back (checked against the checkpoint's hash) instead of
distilling again.

Defaults. Options left unset (None) resolve per model (`presets.py`), and `resolved_options_text()`
says which value came from where:

- real models: the official training (the paper and its AReaL fork): 186 steps = 2 epochs of 3,000
  problems (600 / 600 / 1,000 / 800 by solution length) from a 40,315-problem DeepScaleR pool at 32
  prompts x 4 samples, 7,168 new tokens, lr 0.01, beta 1e-3 and tau 0.5 (Llama and others), tau 0.55
  (Qwen2.5, `model_type` qwen2), beta 2.5e-3 and tau 0.5 with rollout temperature 0.6 (Qwen3); the
  block-sparse streaming mask (sink 128 / window 256 in blocks of 128); the whole batch's r_bar in the
  L1 weight; activation checkpointing; micro-batches of 7,680 tokens; rollouts 8 prompts per call.
- the embedded model (`name_or_path == "embedded"`, a llama): values sized for its task and a 2-core CPU:
  40 steps of 6 prompts, 64 new tokens, lr 0.1, beta 1e-2, a token-exact 16 + 64 window (the one it is
  evaluated with), every solved problem of a 64-problem pool, no checkpointing, one generate call a step.

Kept from the paper rather than the code: `advantage="group"` (per-group z-score); `--advantage batch`
is the official code's form.

Why a compact loop rather than TRL's `GRPOTrainer`: rollouts must be sampled inside the gated
attention context, the adaptive L1 term depends on the batch's raw rewards and must enter the loss,
and the self-distillation pass needs the same generation path; expressing those meant overriding
most of the trainer. The loop below is the method and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from kvpress_rl.embedded.data import left_pad
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import MASKS, gated, new_gates
from kvpress_rl.io import write_atomic
from kvpress_rl.models import model_id
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext
from kvpress_rl.strategies.rlkv import presets
from kvpress_rl.strategies.rlkv.backward import checkpointed_layers, completion_logprobs, join_rollouts, pack_groups
from kvpress_rl.strategies.rlkv.grpo import REWARD_LEVELS, batch_advantages, clipped_surrogate, group_advantages, level_weight, penalty_weight
from kvpress_rl.strategies.rlkv.problems import VERIFIERS, Problem, check_not_eval_data, load_problems, step_batch, training_set

TRAIN_SET = "train_set.jsonl"  # the chosen training set, in the work folder: a resumed run reads it back


@dataclass
class RLKVOptions:
    data: str = field(default="embedded", metadata={"help": "training problems: embedded, embedded-mixed (4 to 10 hops), gsm8k (train split), math500 (with --data-dir) or a .jsonl file (the paper: DeepScaleR)"})
    allow_eval_data: bool = field(default=False, metadata={"help": "allow training on a split an evaluation task scores (math500: math500_r1's test split)"})
    steps: int | None = field(default=None, metadata={"help": "RL steps (default: the official 186 = 2 epochs of 3,000 / 32; 40 on the embedded model)"})
    prompts_per_step: int | None = field(default=None, metadata={"help": "prompts per step (default: the paper's 32; 6 on the embedded model)"})
    group_size: int = field(default=4, metadata={"help": "samples per prompt, G"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature of rollouts (default 1.0; 0.6 on Qwen3, the official Qwen3 setting)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "tokens per rollout (default: the paper's 7,168; 64 on the embedded model)"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate on the gates (default: the paper's 0.01; 0.1 on the embedded model)"})
    weight_decay: float = field(default=0.017, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    epsilon: float = field(default=0.4, metadata={"help": "PPO clip range"})
    beta: float | None = field(default=None, metadata={"help": "L1 weight (default: the paper's 1e-3, 2.5e-3 on Qwen3; 1e-2 on the embedded model)"})
    tau: float | None = field(default=None, metadata={"help": "mean reward above which the L1 penalty is on (default: 0.55 on Qwen2.5, 0.5 otherwise)"})
    adaptive_penalty: bool = field(default=True, metadata={"help": "beta' = beta * (exp(r_bar) - 1) above tau (off: constant beta)"})
    reward_level: str | None = field(default=None, metadata={"help": (
        "where r_bar of the adaptive L1 weight is taken: batch (the whole step, all processes), group (mean of "
        "per-group weights) or micro-batch (per backward micro-batch, token-weighted). Default batch: the official "
        "engine adds the penalty per micro-batch with mb_input['rewards'], but its micro-batch split leaves the "
        "[batch]-shaped rewards tensor whole, so every micro-batch sees the whole batch's rewards")})
    advantage: str = field(default="group", metadata={"help": "group (paper: per-group z-score) or batch (code: +-5, token-weighted batch z-score)"})
    self_distillation: bool = field(default=True, metadata={"help": "train on problems the model solves at full cache, stratified by length"})
    pool_size: int | None = field(default=None, metadata={"help": "problems in the self-distillation pool (default: the paper's DeepScaleR pool, up to 40,315; 64 on the embedded model)"})
    train_set_size: int | None = field(default=None, metadata={"help": "distinct training problems chosen once and iterated in epochs (default: the paper's 3,000; the whole pool on the embedded model)"})
    length_bins: tuple[int, ...] = field(default=(0, 2000, 4000, 6000, 8000), metadata={"help": "solution-length bin edges in tokens"})
    bin_proportions: tuple[float, ...] = field(default=(600.0, 600.0, 1000.0, 800.0), metadata={"help": "share of the training set per bin (paper: 600/600/1000/800)"})
    sink: int | None = field(default=None, metadata={"help": "streaming sink in training (default: the paper's 128; 16 on the embedded model)"})
    window: int | None = field(default=None, metadata={"help": "streaming window in training (default: the paper's 256; 64 on the embedded model)"})
    train_mask: str | None = field(default=None, metadata={"help": "streaming mask in training: block (the official block-sparse kernel; default) or token (exact sink + window; the embedded model's default)"})
    block_size: int = field(default=128, metadata={"help": "block of the block mask, in tokens (official: 128)"})
    micro_batch_tokens: int = field(default=7680, metadata={"help": "tokens per backward micro-batch, whole groups (official: 7,680); memory only"})
    rollout_batch: int | None = field(default=None, metadata={"help": "prompts per generate call (default 8; the whole step on the embedded model); memory only"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "activation checkpointing in the backward (default on; off on the embedded model); memory only"})
    checkpoint_every: int = field(default=4, metadata={"help": "steps between checkpoints"})

    def __post_init__(self) -> None:
        """Refuse values outside their range as soon as the options are built (before any model loads)."""
        ranges = (  # (option, value, is it accepted, the accepted range)
            ("checkpoint-every", self.checkpoint_every, lambda v: v >= 1, ">= 1"),
            ("temperature", self.temperature, lambda v: v > 0 and math.isfinite(v), "> 0"),
            ("group-size", self.group_size, lambda v: v >= 2, ">= 2"),
            ("steps", self.steps, lambda v: v >= 1, ">= 1"),
            ("prompts-per-step", self.prompts_per_step, lambda v: v >= 1, ">= 1"),
            ("max-new-tokens", self.max_new_tokens, lambda v: v >= 1, ">= 1"),
            ("lr", self.lr, lambda v: v > 0 and math.isfinite(v), "> 0"),
            ("weight-decay", self.weight_decay, lambda v: v >= 0 and math.isfinite(v), ">= 0"),
            ("grad-clip", self.grad_clip, lambda v: v > 0, "> 0"),
            ("epsilon", self.epsilon, lambda v: v > 0 and math.isfinite(v), "> 0"),
            ("beta", self.beta, lambda v: v >= 0 and math.isfinite(v), ">= 0"),
            ("tau", self.tau, lambda v: math.isfinite(v), "a finite number"),
            ("sink", self.sink, lambda v: v >= 0, ">= 0"),
            ("window", self.window, lambda v: v >= 1, ">= 1"),
            ("block-size", self.block_size, lambda v: v >= 1, ">= 1"),
        )
        for flag, value, accepted, text in ranges:
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and accepted(value)):
                raise KvrlError(f"--{flag} must be {text}, got {value!r}")


def chat_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return tokenizer(prompt)["input_ids"]


def end_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return [i for i in ids | {im_end} if i is not None]


def completion_mask(completions: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first stop token."""
    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return (~after).long()


def world() -> tuple[int, int]:
    """`(rank, world_size)` under torch.distributed (e.g. `accelerate launch`), else `(0, 1)`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over data-parallel processes, in place (identity on one process). NCCL reduces on the
    current GPU, so a tensor elsewhere goes there and back."""
    import torch.distributed as dist

    _, size = world()
    if size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = value.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not value:
            value.copy_(moved)
    return value


def all_gather(obj) -> list:
    """`obj` of every process, by rank (`[obj]` on one process)."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return [obj]
    gathered = [None] * size
    dist.all_gather_object(gathered, obj)
    return gathered


def rng_state() -> dict:
    """This process's torch RNG states: the CPU one and, where CUDA is available, every GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_set_text(chosen: list[tuple[Problem, int | None]]) -> str:
    """The training set as JSON Lines: prompt, answer, source, verifier and the model's solution length
    (tokens; null without self-distillation)."""
    rows = []
    for problem, length in chosen:
        verify = getattr(problem.verify, "__name__", "")
        if VERIFIERS.get(verify) is not problem.verify:
            raise KvrlError(f"training problem {problem.source!r}: its verifier {verify!r} cannot be saved for --resume")
        rows.append(json.dumps({"prompt": problem.prompt, "answer": problem.answer, "source": problem.source,
                                "verify": verify, "solution_tokens": length}))
    return "".join(row + "\n" for row in rows)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of `ids[:, :-1]`, each row repeated `copies` times (`generate` then feeds the last token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(copies)
    return cache


class RLKV(HeadSelector):
    __doc__ = __doc__
    name = "rlkv"
    kind = "head"
    version = "2"
    description = "RLKV: gates learned with RL on the model's own reasoning rewards"
    Options = RLKVOptions

    OFFICIAL = presets.OFFICIAL
    FAMILIES = presets.FAMILIES
    EMBEDDED = presets.EMBEDDED

    def resolve(self, model) -> None:
        """Fill unset options for this model, so provenance records the values actually used."""
        family, values, sources = presets.resolve_values(model, self.options)
        self.options = replace(self.options, **values)
        self.family = family
        self.sources = {**getattr(self, "sources", {}), **sources}

    def resolved_options(self, model) -> str:
        self.resolve(model)
        return self.resolved_options_text()

    def resolved_options_text(self) -> str:
        """The options as resolved by `resolve` (one line each: value, and where an unset one came from)."""
        sources = getattr(self, "sources", {})
        lines = [f"rlkv options (model family: {getattr(self, 'family', '?')}):"]
        for name, value in asdict(self.options).items():
            lines.append(f"  {name} = {value!r}" + (f"  [{sources[name]}]" if name in sources else ""))
        return "\n".join(lines)

    def generate(self, model, tokenizer, prompts: list[list[int]], sample: bool, copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`(sequences, attention_mask, completion_start)` for left-padded prompts, each sampled `copies` times.

        The copies of a prompt share one prefill: its cache (all but the last prompt token) is computed
        once and repeated, so a group of G rollouts costs one prompt forward instead of G.
        """
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        temperature = 1.0 if self.options.temperature is None else self.options.temperature
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        with torch.no_grad():
            if copies > 1:
                kwargs["cache"] = shared_prefill(model, ids, mask, copies)
                ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.options.max_new_tokens,
                                 eos_token_id=end_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **kwargs)
        completions = out[:, ids.shape[1]:]
        full_mask = torch.cat([mask, completion_mask(completions, end_ids(tokenizer))], dim=1)
        return out, full_mask, ids.shape[1]

    def rollouts(self, model, tokenizer, prompts: list[list[int]], sample: bool, copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`generate` over `rollout_batch` prompts at a time, joined into one left/right-padded batch."""
        batch = self.options.rollout_batch or len(prompts)
        parts = [self.generate(model, tokenizer, prompts[i:i + batch], sample, copies) for i in range(0, len(prompts), batch)]
        return join_rollouts(parts, tokenizer.pad_token_id)

    def self_distill(self, model, tokenizer, pool: list[Problem], rng: random.Random) -> list[tuple[Problem, int]]:
        """The fixed training set: distinct problems the model solves greedily with the full cache, chosen once
        stratified by the length of its solution (`training_set`); `(problem, solution tokens)` pairs."""
        o = self.options
        rank, size = world()
        mine: list[tuple[int, int]] = []  # (index in the pool, solution tokens) of what this process solved
        indices = list(range(rank, len(pool), size))  # data parallel: each process decodes its share of the pool
        chunk_size = max(16, (o.rollout_batch or 0) * o.group_size)
        for start in range(0, len(indices), chunk_size):
            chunk = indices[start:start + chunk_size]
            out, mask, offset = self.generate(model, tokenizer, [chat_ids(tokenizer, pool[i].prompt) for i in chunk], sample=False)
            for index, row, row_mask in zip(chunk, out[:, offset:], mask[:, offset:]):
                text = tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True)
                if pool[index].verify(text, pool[index].answer):
                    mine.append((index, int(row_mask.sum())))
        solved = [(pool[index], length) for index, length in sorted(pair for part in all_gather(mine) for pair in part)]
        if not solved:
            raise KvrlError("self-distillation kept no problem: the model solves none of the pool at full cache; "
                            "use a larger --pool-size or --no-self-distillation")
        self.solved_fraction = len(solved) / len(pool)
        lengths = {id(problem): length for problem, length in solved}
        chosen = training_set(solved, o.train_set_size, tuple(o.length_bins), tuple(o.bin_proportions), rng)
        return [(problem, lengths[id(problem)]) for problem in chosen]

    def group_logprobs(self, model, sequences: torch.Tensor, mask: torch.Tensor, offset: int, copies: int) -> torch.Tensor:
        """Log-probabilities `(rows, completion_tokens)` of the completion tokens, the prompt of each group of
        `copies` rows through the model once (see `completion_logprobs`)."""
        return completion_logprobs(model, sequences, mask, offset, copies, shared=True)

    def _check(self) -> None:
        o = self.options
        if o.advantage not in ("group", "batch"):
            raise KvrlError(f"--advantage must be group or batch, got {o.advantage!r}")
        if o.reward_level not in REWARD_LEVELS:
            raise KvrlError(f"--reward-level must be one of {', '.join(REWARD_LEVELS)}, got {o.reward_level!r}")
        if o.train_mask not in MASKS:
            raise KvrlError(f"--train-mask must be one of {', '.join(MASKS)}, got {o.train_mask!r}")
        if o.steps < 1 or o.prompts_per_step < 1 or o.group_size < 2:
            raise KvrlError("rlkv needs steps >= 1, prompts_per_step >= 1 and group_size >= 2")
        if o.train_set_size < 1 or o.pool_size < 1 or o.micro_batch_tokens < 1 or o.rollout_batch < 1:
            raise KvrlError("rlkv needs train_set_size, pool_size, micro_batch_tokens and rollout_batch >= 1")
        _, size = world()
        if o.prompts_per_step % size:
            raise KvrlError(f"--prompts-per-step {o.prompts_per_step} is not a multiple of the {size} processes: "
                            "each process samples an equal share of a step's prompts")

    # --- the loop -------------------------------------------------------------------------------
    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        self.resolve(model)
        o = self.options
        if tokenizer is None:
            raise KvrlError("rlkv needs a model with a tokenizer (rewards come from decoded answers)")
        self._check()
        check_not_eval_data(o.data, o.allow_eval_data)
        started = time.perf_counter()
        rank, _ = world()
        rng = random.Random(context.seed)  # the training set and the problem order: the same on every process
        torch.manual_seed(context.seed + rank)  # rollout sampling: different on every process
        work = Path(context.work_dir) if context.work_dir else None
        # a resume checks the checkpoint's options before anything costly, and reads the training set back
        state = self._load_checkpoint(work) if context.resume and work else None
        if state is not None:
            train, text = self._load_train_set(work, state)
            self.solved_fraction = state.get("solved_fraction")
            started -= float(state.get("elapsed_s", 0.0))  # wall time counts the run before the resume too
        else:
            if work and rank == 0:
                self._clear_work(work)  # a fresh run: no log, checkpoint or training set of an earlier one
            self.solved_fraction = None
            if o.self_distillation:
                pool = load_problems(o.data, o.pool_size, context.seed, context.data_dir)
                chosen = self.self_distill(model, tokenizer, pool, rng)
            else:
                chosen = [(p, None) for p in load_problems(o.data, o.train_set_size, context.seed, context.data_dir)]
            train, text = [p for p, _ in chosen], train_set_text(chosen)
            if work and rank == 0:
                write_atomic(work / TRAIN_SET, lambda path: path.write_text(text), overwrite=True)
        self.train_set_sha256 = text_hash(text)
        step_batch(len(train), o.prompts_per_step, 0, context.seed)  # refuses a set smaller than one step

        gates = new_gates(model, 1.0)
        optimizer = torch.optim.AdamW([gates], lr=o.lr, betas=(0.9, 0.999), weight_decay=o.weight_decay)
        log: list[dict] = []
        first_step = self._resume(work, state, gates, optimizer, log) if state is not None else 0
        self._started = started
        for step in range(first_step, o.steps):
            batch = [train[i] for i in step_batch(len(train), o.prompts_per_step, step, context.seed)]
            record = self._step(model, tokenizer, gates, optimizer, batch)
            record["step"] = step + 1
            record["epoch"] = step // (len(train) // o.prompts_per_step) + 1
            log.append(record)
            if work:
                if rank == 0:
                    self._log(work, record)
                if (step + 1) % o.checkpoint_every == 0 or step + 1 == o.steps:
                    self._checkpoint(work, gates, optimizer, step + 1, log)  # every process: it gathers RNG states
            if context.on_step:
                context.on_step(step + 1, o.steps, record)
        rewards = [r["mean_reward"] for r in log]
        return self.scores(gates.detach().clone(), model_id(model), context, time.perf_counter() - started,
                           train_sink=o.sink, train_window=o.window, solved_fraction=self.solved_fraction,
                           train_set=len(train), model_family=self.family, resolved_from=dict(self.sources),
                           reward_curve={"first": rewards[:3], "last": rewards[-3:], "mean": sum(rewards) / len(rewards)},
                           mean_alpha_curve=[r["mean_alpha"] for r in log])

    def policy_backward(self, model, gates: torch.Tensor, sequences: torch.Tensor, mask: torch.Tensor, offset: int,
                        advantages: torch.Tensor, rewards: torch.Tensor, sink: int, window: int, *,
                        group_size: int | None = None) -> dict:
        """The teacher-forced backward of one step: the clipped surrogate (token-level mean over the step's
        completion tokens) over micro-batches of at most `micro_batch_tokens`, then the L1 term at
        `reward_level`; gradients accumulate into `gates.grad` (the model is frozen while inside).

        `sequences`, `mask`: `(rows, offset + completion)`, prompts left-padded, completions right-padded,
        rows in groups of `group_size` rollouts of one prompt; `advantages`, `rewards` (raw 0/1): `(rows,)`.
        Under data parallelism the loss is the official engine's: every micro-batch's surrogate sum is divided
        by the completion tokens of the whole step on *every* process (all-reduced), and the gate gradients
        are summed over processes, so the gradient is that of one process running the union of the batches.

        Returns `tokens` (completion tokens of every process), `micro_batches`, `forward_tokens` (padded tokens through the
        model), `beta_prime` (the L1 weight applied) and `mean_reward` (r_bar of the whole batch).
        """
        if any(getattr(self.options, name) is None for name in presets.OFFICIAL):
            self.resolve(model)
        o = self.options
        copies = group_size or o.group_size
        checkpointing = bool(o.gradient_checkpointing)
        shared = not checkpointing  # a checkpointed layer cannot write the prompt cache (see checkpointed_layers)
        comp_mask = mask[:, offset:].float()
        lengths = comp_mask.sum(1)
        local_tokens = lengths.sum().item()
        tokens = max(all_sum(torch.tensor([local_tokens], dtype=torch.float64)).item(), 1.0)  # the global loss weight
        prompt_len = mask[::copies, :offset].sum(1).tolist()
        completion_len = lengths.reshape(-1, copies).max(1).values.long().tolist()
        parts = pack_groups([int(p) for p in prompt_len], completion_len, copies, o.micro_batch_tokens, shared)
        rows = [slice(p.start * copies, p.stop * copies) for p in parts]
        advantages = advantages.flatten().to(sequences.device)
        frozen = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        forward_tokens = 0
        try:
            with gated(model, gates, sink=sink, window=window, mask=o.train_mask, block_size=o.block_size), checkpointed_layers(model, checkpointing):
                for part, row in zip(parts, rows):
                    if not advantages[row].any():
                        continue  # no learning signal in these groups
                    prompt = max(prompt_len[part.start:part.stop])
                    width = max(completion_len[part.start:part.stop])
                    seq = sequences[row, offset - prompt:offset + width]
                    seq_mask = mask[row, offset - prompt:offset + width]
                    forward_tokens += seq.numel() if not shared else seq.shape[0] // copies * prompt + seq.shape[0] * width
                    logp = completion_logprobs(model, seq, seq_mask, prompt, copies, shared)
                    # one update per batch: the sampling policy is the current one, so old = new (detached)
                    surrogate = clipped_surrogate(logp, logp.detach(), advantages[row], comp_mask[row, :width].to(logp.device), o.epsilon)
                    (-surrogate / tokens).backward()
        finally:
            for param, flag in zip(model.parameters(), frozen):
                param.requires_grad_(flag)
        rewards = rewards.flatten().float()
        # r_bar of the whole batch, on every process: summed rewards over summed counts
        reward_sum, count = all_sum(torch.tensor([rewards.sum().item(), rewards.numel()], dtype=torch.float64)).tolist()
        mean_reward = reward_sum / max(count, 1.0)
        if o.reward_level == "batch":
            beta_prime = penalty_weight(mean_reward, o.beta, o.tau, o.adaptive_penalty)
        else:  # this process's weighted sum (per group, or per micro-batch token), over the total of every process
            local = level_weight(rewards, o.reward_level, o.beta, o.tau, o.adaptive_penalty, group_size=copies,
                                 parts=rows, tokens=lengths.cpu())
            weight = rewards.numel() / copies if o.reward_level == "group" else local_tokens
            total, weights = all_sum(torch.tensor([local * weight, weight], dtype=torch.float64)).tolist()
            beta_prime = total / weights if weights else 0.0
        _, size = world()
        if size > 1:  # sum the gate gradients (each already over the global token count): the same step everywhere
            if gates.grad is None:
                gates.grad = torch.zeros_like(gates)
            all_sum(gates.grad)
        # The L1 term goes in after the sum, on every process alike: the summed gradients are identical on
        # every process, so adding the same term to each counts it exactly once per step.
        if beta_prime:
            (beta_prime * gates.clamp(0.0, 1.0).mean()).backward()
        return {"tokens": int(tokens), "micro_batches": len(parts), "forward_tokens": int(forward_tokens),
                "beta_prime": beta_prime, "mean_reward": mean_reward, "reward_level": o.reward_level}

    def _step(self, model, tokenizer, gates, optimizer, problems: list[Problem]) -> dict:
        o = self.options
        began = time.perf_counter()
        rank, size = world()
        problems = problems[rank::size]  # data parallel: each process samples its share (`_check`: an equal one)
        prompts = [chat_ids(tokenizer, p.prompt) for p in problems]
        with gated(model, gates, sink=o.sink, window=o.window, mask=o.train_mask, block_size=o.block_size):
            sequences, mask, offset = self.rollouts(model, tokenizer, prompts, sample=True, copies=o.group_size)  # from the gated model
        generated = time.perf_counter()
        completions = sequences[:, offset:]
        comp_mask = mask[:, offset:]
        texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completions, comp_mask)]
        rewards = torch.tensor([float(p.verify(t, p.answer)) for p, t in zip((p for p in problems for _ in range(o.group_size)), texts)])
        if o.advantage == "group":
            advantages = group_advantages(rewards.reshape(len(problems), o.group_size)).flatten()
        else:
            advantages = batch_advantages(rewards, comp_mask.sum(1).cpu(), reduce=all_sum)
        optimizer.zero_grad()
        stats = self.policy_backward(model, gates, sequences, mask, offset, advantages, rewards, o.sink, o.window)
        grad_norm = torch.nn.utils.clip_grad_norm_([gates], o.grad_clip).item() if gates.grad is not None else 0.0
        if gates.grad is not None:
            optimizer.step()
        with torch.no_grad():
            # Project the gates back onto [0, 1] after every step. Clamping only inside the forward
            # would let a gate drift above 1, where neither the reward nor the L1 term has a
            # gradient any more: it would stay there and keep its head for good.
            gates.clamp_(0.0, 1.0)
        alpha = gates.detach()
        return {"mean_reward": stats["mean_reward"], "mean_alpha": alpha.mean().item(), "beta_prime": stats["beta_prime"],
                "reward_level": stats["reward_level"], "grad_norm": grad_norm,
                "gates_below_0.05": (alpha < 0.05).float().mean().item(), "gates_above_0.95": (alpha > 0.95).float().mean().item(),
                "completion_tokens": stats["tokens"], "micro_batches": stats["micro_batches"],
                "rollout_seconds": generated - began, "seconds": time.perf_counter() - began}

    # --- logs and checkpoints ------------------------------------------------------------------
    WORK_FILES = ("train_log.jsonl", "checkpoint.pt", "checkpoint.pt.tmp", TRAIN_SET, "training.png", "gates.png")

    def _clear_work(self, work: Path) -> None:
        """Remove what an earlier run left in the work folder, so that a fresh run's log starts at step 1."""
        for name in self.WORK_FILES:
            try:
                os.unlink(work / name)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise KvrlError(f"cannot remove {work / name} of an earlier run: {err.strerror or type(err).__name__}") from None

    def _log(self, work: Path, record: dict) -> None:
        work.mkdir(parents=True, exist_ok=True)
        with (work / "train_log.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _checkpoint(self, work: Path, gates, optimizer, step: int, log: list[dict]) -> None:
        rngs = all_gather(rng_state())  # collective: every process calls this; rank 0 writes
        if world()[0] != 0:
            return
        tmp = work / "checkpoint.pt.tmp"
        torch.save({"gates": gates.detach().clone(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
                    "options": asdict(self.options), "rng": rngs, "train_set_sha256": self.train_set_sha256,
                    "solved_fraction": self.solved_fraction,
                    "elapsed_s": time.perf_counter() - getattr(self, "_started", time.perf_counter())}, tmp)
        tmp.replace(work / "checkpoint.pt")

    def _load_checkpoint(self, work: Path) -> dict | None:
        """The checkpoint to resume from (None: there is none), refused if made with other options or by
        another number of processes."""
        path = work / "checkpoint.pt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, weights_only=False)
        except Exception as err:  # a truncated or overwritten file: torch raises several types
            raise KvrlError(f"{path} is damaged and cannot be read ({type(err).__name__}); start afresh without --resume") from None
        required = ("gates", "optimizer", "step", "log", "options")
        if not isinstance(state, dict) or any(key not in state for key in required) or not isinstance(state["options"], dict):
            raise KvrlError(f"{path} is damaged (not an rlkv checkpoint); start afresh without --resume")
        if state["options"] != asdict(self.options):
            changed = sorted(k for k, v in asdict(self.options).items() if state["options"].get(k) != v)
            raise KvrlError(f"{path} was made with other options ({', '.join(changed)}); resume with the same options or start afresh")
        _, size = world()
        if not isinstance(state.get("rng"), list) or len(state["rng"]) != size or "train_set_sha256" not in state:
            made = len(state["rng"]) if isinstance(state.get("rng"), list) else "an older version"
            raise KvrlError(f"{path} was made by {made} process(es) or an older version; resume with {size} or start afresh")
        return state

    def _load_train_set(self, work: Path, state: dict) -> tuple[list[Problem], str]:
        """The training set the checkpointed run chose, read back from the work folder (checked by hash)."""
        path = work / TRAIN_SET
        if not path.is_file():
            raise KvrlError(f"{path} is missing: the checkpoint's training set cannot be recovered; start afresh")
        text = path.read_text()
        if text_hash(text) != state["train_set_sha256"]:
            raise KvrlError(f"{path} is not the training set of {work / 'checkpoint.pt'} (hash mismatch); start afresh")
        train = []
        for line in text.splitlines():
            row = json.loads(line)
            if row["verify"] not in VERIFIERS:
                raise KvrlError(f"{path}: unknown verifier {row['verify']!r}")
            train.append(Problem(row["prompt"], row["answer"], VERIFIERS[row["verify"]], row["source"]))
        return train, text

    def _resume(self, work: Path, state: dict, gates, optimizer, log: list[dict]) -> int:
        rank, _ = world()
        with torch.no_grad():
            gates.copy_(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank])
        log.extend(state["log"])
        if rank == 0:
            lines = [json.dumps(r) for r in state["log"]]
            (work / "train_log.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
        return state["step"]
