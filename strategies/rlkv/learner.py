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
says which value came from where: a model whose profile carries RLKV values takes those (the embedded
model: `kvpress_rl.profiles.EMBEDDED_RLKV`, sized for its task and a CPU); any other takes the official
training (the paper and its AReaL fork: 186 steps = 2 epochs of 3,000 problems from a DeepScaleR pool at
32 prompts x 4 samples, 7,168 new tokens, lr 0.01, block-sparse streaming 128 + 256, ...) with its
family's beta, tau and temperature (Qwen2.5, Qwen3).

Advantages: the official training's by default (`advantage="batch"`: `(r - 0.5) * 10` z-scored over the
completion tokens of the whole step, every process, so a group whose samples agree still moves the gates);
`--advantage group` is the paper's per-group z-score, and the embedded model's default (its values were
tuned with it).

Why a compact loop rather than TRL's `GRPOTrainer`: rollouts must be sampled inside the gated
attention context, the adaptive L1 term depends on the batch's raw rewards and must enter the loss,
and the self-distillation pass needs the same generation path; expressing those meant overriding
most of the trainer. The loop below is the method and nothing else; the rest lives beside it:
`options.py` (the options and their checks), `rollouts.py` (generation and self-distillation),
`checkpoints.py` (the work folder: log, checkpoints, training set), `backward.py` (micro-batches,
activation checkpointing), `grpo.py` (advantages, surrogate, L1 weight), `problems.py` (data, verifiers).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kvpress_rl.distributed import all_sum, is_main_process, world
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import new_gates
from kvpress_rl.models import model_id
from kvpress_rl.sampling import RolloutSampler
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext
from kvpress_rl.strategies.rlkv import backward, presets
from kvpress_rl.strategies.rlkv.checkpoints import (
    TrainingRun,
    append_log,
    clear_work,
    load_checkpoint,
    load_train_set,
    resume,
    save_checkpoint,
    save_train_set,
    text_hash,
    train_set_text,
)
from kvpress_rl.strategies.rlkv.grpo import ADVANTAGES, step_advantages
from kvpress_rl.strategies.rlkv.options import RLKVOptions, check_resolved
from kvpress_rl.strategies.rlkv.problems import RewardProblem, check_not_eval_data, load_problems, step_batch
from kvpress_rl.strategies.rlkv.rollouts import LearnerSampler, branch_of, chat_ids, rollout_sampling, self_distill


class RLKV(HeadSelector):
    __doc__ = __doc__
    name = "rlkv"
    version = "3"  # in every scores file's provenance: raised whenever the same options give other gates
    trains = True
    samples_rollouts = True
    description = "RLKV: gates learned with RL on the model's own reasoning rewards"
    Options = RLKVOptions

    OFFICIAL = presets.OFFICIAL
    FAMILIES = presets.FAMILIES

    def __init__(self, options: RLKVOptions | None = None) -> None:
        super().__init__(options)
        self.family: str | None = None  # set by `resolve`: the preset family the unset options came from
        self.sources: dict[str, str] = {}  # set by `resolve`: option -> where its value came from

    def resolve(self, model) -> None:
        """Fill unset options for this model, so provenance records the values actually used."""
        family, values, sources = presets.resolve_values(model, self.options)
        self.options = replace(self.options, **values)
        self.family = family
        self.sources = {**self.sources, **sources}

    def resolved_options(self, model) -> str:
        self.resolve(model)
        return self.resolved_options_text()

    def resolved_options_text(self) -> str:
        """The options as resolved by `resolve` (one line each: value, and where an unset one came from)."""
        lines = [f"rlkv options (model family: {self.family or '?'}):"]
        for name, value in asdict(self.options).items():
            source = f"  [{self.sources[name]}]" if name in self.sources else ""
            meaning = f"  ({ADVANTAGES[value]})" if name == "advantage" and value in ADVANTAGES else ""
            lines.append(f"  {name} = {value!r}{source}{meaning}")
        return "\n".join(lines)

    # --- the loop -------------------------------------------------------------------------------
    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        self.resolve(model)
        o = self.options
        if tokenizer is None:
            raise KvrlError("rlkv needs a model with a tokenizer (rewards come from decoded answers)")
        rank, size = world()
        check_resolved(o, size)
        check_not_eval_data(o.data, o.allow_eval_data)
        run = TrainingRun(o, Path(context.work_dir) if context.work_dir else None, started=time.perf_counter())
        rng = random.Random(context.seed)  # the training set and the problem order: the same on every process
        torch.manual_seed(context.seed + rank)  # rollout sampling: different on every process
        # a resume checks the checkpoint's options before anything costly, and reads the training set back
        state = load_checkpoint(run.work, o) if context.resume and run.work else None
        # the caller's sampler (it closes it), or the learner's own loop
        sampler = context.sampler or LearnerSampler(model, o.rollout_batch)
        return self._train(model, tokenizer, context, run, rng, state, sampler)

    def _train(self, model, tokenizer, context: SelectionContext, run: TrainingRun, rng: random.Random, state,
               sampler: RolloutSampler) -> HeadScores:
        o = self.options
        if state is not None:
            train, text = load_train_set(run.work, state)
        else:
            if run.work and is_main_process():
                clear_work(run.work)  # a fresh run: no log, checkpoint or training set of an earlier one
            if o.self_distillation:
                pool = load_problems(o.data, o.pool_size, context.seed, context.data_dir)
                chosen, run.solved_fraction = self_distill(sampler, tokenizer, pool, o, rng)
            else:
                chosen = [(p, None) for p in load_problems(o.data, o.train_set_size, context.seed, context.data_dir)]
            train, text = [p for p, _ in chosen], train_set_text(chosen)
            if run.work and is_main_process():
                save_train_set(run.work, text)
        run.train_set_sha256 = text_hash(text)
        step_batch(len(train), o.prompts_per_step, 0, context.seed)  # refuses a set smaller than one step

        gates = new_gates(model, 1.0)
        optimizer = torch.optim.AdamW([gates], lr=o.lr, betas=(0.9, 0.999), weight_decay=o.weight_decay)
        first_step = resume(run, state, gates, optimizer) if state is not None else 0
        for step in range(first_step, o.steps):
            batch = [train[i] for i in step_batch(len(train), o.prompts_per_step, step, context.seed)]
            record = self._step(model, tokenizer, gates, optimizer, batch, sampler)
            record["step"] = step + 1
            record["epoch"] = step // (len(train) // o.prompts_per_step) + 1
            run.log.append(record)
            if run.work:
                if is_main_process():
                    append_log(run.work, record)
                if (step + 1) % o.checkpoint_every == 0 or step + 1 == o.steps:
                    save_checkpoint(run, gates, optimizer, step + 1)  # every process: it gathers RNG states
            if context.on_step:
                context.on_step(step + 1, o.steps, record)
        rewards = [r["mean_reward"] for r in run.log]
        return self.scores(gates.detach().clone(), model_id(model), context, run.elapsed(),
                           train_sink=o.sink, train_window=o.window, solved_fraction=run.solved_fraction,
                           train_set=len(train), model_family=self.family, resolved_from=dict(self.sources),
                           reward_curve={"first": rewards[:3], "last": rewards[-3:],
                                         "mean": sum(rewards) / len(rewards)},
                           rollout_engine=sampler.name,
                           mean_alpha_curve=[r["mean_alpha"] for r in run.log])

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

        Returns `tokens` (completion tokens of every process), `micro_batches`, `forward_tokens` (padded tokens through
        the
        model), `beta_prime` (the L1 weight applied) and `mean_reward` (r_bar of the whole batch).
        """
        if any(getattr(self.options, name) is None for name in presets.OFFICIAL):
            self.resolve(model)
        return backward.policy_backward(model, gates, sequences, mask, offset, advantages, rewards, sink, window,
                                        options=self.options, copies=group_size or self.options.group_size)

    def _step(self, model, tokenizer, gates, optimizer, problems: list[RewardProblem],
              sampler: RolloutSampler) -> dict:
        o = self.options
        began = time.perf_counter()
        rank, size = world()
        # data parallel: each process samples its share (`check_resolved`: an equal one)
        problems = problems[rank::size]
        prompts = [chat_ids(tokenizer, p.prompt) for p in problems]
        out = sampler.sample(prompts, rollout_sampling(tokenizer, o, sample=True), gates=gates.detach(),
                             branch=branch_of(o), copies=o.group_size)  # from the gated model
        sequences, mask, offset = out.sequences, out.mask, out.offset
        generated = time.perf_counter()
        completions = sequences[:, offset:]
        comp_mask = mask[:, offset:]
        texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completions, comp_mask)]
        rollout_problems = (p for p in problems for _ in range(o.group_size))
        rewards = torch.tensor([float(p.verify(t, p.answer)) for p, t in zip(rollout_problems, texts)])
        # over the whole step (every process), before the backward splits it into micro-batches
        advantages = step_advantages(o.advantage, rewards, comp_mask.sum(1).cpu(), o.group_size, reduce=all_sum)
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
        return {"mean_reward": stats["mean_reward"], "mean_alpha": alpha.mean().item(),
                "beta_prime": stats["beta_prime"],
                "reward_level": stats["reward_level"], "grad_norm": grad_norm,
                "gates_below_0.05": (alpha < 0.05).float().mean().item(),
                "gates_above_0.95": (alpha > 0.95).float().mean().item(),
                "completion_tokens": stats["tokens"], "micro_batches": stats["micro_batches"],
                "rollout_seconds": generated - began, "seconds": time.perf_counter() - began}
