"""RLKV's gate learner: GRPO without KL on the model's own reasoning rewards, gates only.

One gate alpha per (layer, KV head) in the executor's gated mixed attention
(`alpha * full + (1 - alpha) * streaming`), initialised to 1 and kept in [0, 1] (projected
after every optimizer step, so every forward sees clamped gates); the model is frozen. Each step
samples `group_size` completions per prompt from the *gated* model, rewards them with the task's verifier, and minimises

    -clipped_surrogate (token-level mean, epsilon 0.4) + beta' * mean(alpha)

with `beta' = 1[r_bar > tau] * beta * (exp(r_bar) - 1)`. The L1 term is part of the loss, not the
reward: a penalty shared by a whole group has zero group-relative advantage. Problems come from a
self-distillation pass: greedy full-cache answers on a pool, keeping what the model solves,
stratified by the length of its own solution.

Why a compact loop rather than TRL's `GRPOTrainer`: rollouts must be sampled inside the gated
attention context, the adaptive L1 term depends on the batch's raw rewards and must enter the loss,
and the self-distillation pass needs the same generation path; expressing those meant overriding
most of the trainer. The loop below is the method and nothing else.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvpress_rl.embedded.data import left_pad
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.models import model_id
from kvpress_rl.scores import HeadScores
from kvpress_rl.selector import HeadSelector, SelectionContext
from kvpress_rl.strategies.rlkv.grpo import batch_advantages, clipped_surrogate, group_advantages, penalty_weight
from kvpress_rl.strategies.rlkv.problems import Problem, load_problems


@dataclass
class RLKVOptions:
    data: str = field(default="embedded", metadata={"help": "training problems: embedded, embedded-mixed (4 to 10 hops), gsm8k, math500 (with --data-dir) or a .jsonl file"})
    steps: int | None = field(default=None, metadata={"help": "RL steps (default: the paper's 185; 40 on the embedded model)"})
    prompts_per_step: int | None = field(default=None, metadata={"help": "prompts per step (default: the paper's 32; 6 on the embedded model)"})
    group_size: int = field(default=4, metadata={"help": "samples per prompt, G"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "tokens per rollout (default: the paper's 7,168; 64 on the embedded model)"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate on the gates (default: the paper's 0.01; 0.1 on the embedded model)"})
    weight_decay: float = field(default=0.017, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    epsilon: float = field(default=0.4, metadata={"help": "PPO clip range"})
    beta: float | None = field(default=None, metadata={"help": "L1 weight (default: the paper's 1e-3; 1e-2 on the embedded model)"})
    tau: float = field(default=0.5, metadata={"help": "mean reward above which the L1 penalty is on"})
    adaptive_penalty: bool = field(default=True, metadata={"help": "beta' = beta * (exp(r_bar) - 1) above tau (off: constant beta)"})
    advantage: str = field(default="group", metadata={"help": "group (paper: per-group z-score) or batch (code: +-5, batch z-score)"})
    self_distillation: bool = field(default=True, metadata={"help": "train on problems the model solves at full cache, stratified by length"})
    pool_size: int = field(default=64, metadata={"help": "problems in the self-distillation pool"})
    length_bins: tuple[int, ...] = field(default=(0, 2000, 4000, 6000, 8000), metadata={"help": "solution-length bin edges in tokens"})
    bin_proportions: tuple[float, ...] = field(default=(600.0, 600.0, 1000.0, 800.0), metadata={"help": "draw per bin (paper: 600/600/1000/800)"})
    sink: int | None = field(default=None, metadata={"help": "streaming sink in training (default: the paper's 128; 16 on the embedded model)"})
    window: int | None = field(default=None, metadata={"help": "streaming window in training (default: the paper's 256; 64 on the embedded model)"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per backward pass, rounded down to whole groups (memory only)"})
    checkpoint_every: int = field(default=4, metadata={"help": "steps between checkpoints"})


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


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over data-parallel processes (identity on one process)."""
    import torch.distributed as dist

    _, size = world()
    if size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= size
    return value


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
    version = "1"
    description = "RLKV: gates learned with RL on the model's own reasoning rewards"
    Options = RLKVOptions

    # Unset options take the paper's values, or on the embedded model values sized for a 2-core CPU
    # and its ~300-token problems (a 256-token window would cover them whole, leaving no signal).
    # With 40 steps instead of 185, beta 1e-3 leaves mean alpha still falling at the last step
    # (0.51); at 1e-2 it settles near 0.3 with the reward back at 1.0. Its chains take 51 tokens, so
    # 64 new tokens end only rambling rollouts, and the time saved buys 6 prompts a step instead of
    # 4: with 640 rollouts the gates at the 0.8 cut depended on the training seed (README, "Results").
    PAPER = {"steps": 185, "prompts_per_step": 32, "max_new_tokens": 7168, "lr": 0.01, "beta": 1e-3, "sink": 128, "window": 256}
    EMBEDDED = {"steps": 40, "prompts_per_step": 6, "max_new_tokens": 64, "lr": 0.1, "beta": 1e-2, "sink": 16, "window": 64}

    def resolve(self, model) -> None:
        """Fill unset options for this model, so provenance records the values actually used."""
        from dataclasses import replace

        defaults = self.EMBEDDED if getattr(model, "name_or_path", "") == "embedded" else self.PAPER
        self.options = replace(self.options, **{k: v for k, v in defaults.items() if getattr(self.options, k) is None})

    def generate(self, model, tokenizer, prompts: list[list[int]], sample: bool, copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`(sequences, attention_mask, completion_start)` for left-padded prompts, each sampled `copies` times.

        The copies of a prompt share one prefill: its cache (all but the last prompt token) is computed
        once and repeated, so a group of G rollouts costs one prompt forward instead of G.
        """
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        kwargs = dict(do_sample=True, temperature=self.options.temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        with torch.no_grad():
            if copies > 1:
                kwargs["cache"] = shared_prefill(model, ids, mask, copies)
                ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.options.max_new_tokens,
                                 eos_token_id=end_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **kwargs)
        completions = out[:, ids.shape[1]:]
        full_mask = torch.cat([mask, completion_mask(completions, end_ids(tokenizer))], dim=1)
        return out, full_mask, ids.shape[1]

    def self_distill(self, model, tokenizer, pool: list[Problem], count: int, rng: random.Random) -> list[Problem]:
        """Problems the model solves greedily with the full cache, drawn stratified by solution length."""
        o = self.options
        solved: list[tuple[Problem, int]] = []
        for start in range(0, len(pool), 16):
            chunk = pool[start:start + 16]
            out, mask, offset = self.generate(model, tokenizer, [chat_ids(tokenizer, p.prompt) for p in chunk], sample=False)
            for problem, row, row_mask in zip(chunk, out[:, offset:], mask[:, offset:]):
                text = tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True)
                if problem.verify(text, problem.answer):
                    solved.append((problem, int(row_mask.sum())))
        if not solved:
            raise KvrlError("self-distillation kept no problem: the model solves none of the pool at full cache; "
                            "use a larger --pool-size or --no-self-distillation")
        edges = list(o.length_bins)
        bins: list[list[Problem]] = [[] for _ in range(len(edges) - 1)]
        for problem, length in solved:
            index = next((i for i in range(len(edges) - 1) if edges[i] <= length < edges[i + 1]), len(edges) - 2)
            bins[index].append(problem)
        weights = [w if bins[i] else 0.0 for i, w in enumerate(o.bin_proportions[: len(bins)])]
        drawn = []
        for _ in range(count):
            index = rng.choices(range(len(bins)), weights=weights)[0]
            drawn.append(rng.choice(bins[index]))
        self.solved_fraction = len(solved) / len(pool)
        return drawn

    def group_logprobs(self, model, sequences: torch.Tensor, mask: torch.Tensor, offset: int, copies: int) -> torch.Tensor:
        """Log-probabilities `(rows, completion_tokens)` of the completion tokens under `model`, for rows in
        groups of `copies` that share their prompt (the rollouts of one prompt).

        The prompt goes through the model once per group and its cache is repeated for the completions,
        instead of once per row: with G = 4 and 220-token prompts under 50-token completions, the
        backward sees about 2.5 times fewer tokens. Gradients flow through the shared prompt.
        """
        from transformers import DynamicCache

        position = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=model.config)
        prompt = model(input_ids=sequences[::copies, :offset], attention_mask=mask[::copies, :offset],
                       position_ids=position[::copies, :offset], cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(copies)
        first = prompt.logits[:, -1:].repeat_interleave(copies, dim=0)  # predicts the first completion token
        rest = model(input_ids=sequences[:, offset:], attention_mask=mask, position_ids=position[:, offset:], cache=cache, use_cache=True).logits
        logits = torch.cat([first, rest[:, :-1]], dim=1)
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, offset:, None]).squeeze(-1)

    # --- the loop -------------------------------------------------------------------------------
    def select(self, model, tokenizer, context: SelectionContext) -> HeadScores:
        self.resolve(model)
        o = self.options
        if tokenizer is None:
            raise KvrlError("rlkv needs a model with a tokenizer (rewards come from decoded answers)")
        if o.advantage not in ("group", "batch"):
            raise KvrlError(f"--advantage must be group or batch, got {o.advantage!r}")
        if o.steps < 1 or o.prompts_per_step < 1 or o.group_size < 2:
            raise KvrlError("rlkv needs steps >= 1, prompts_per_step >= 1 and group_size >= 2")
        started = time.perf_counter()
        rng = random.Random(context.seed)
        torch.manual_seed(context.seed)
        sink, window = o.sink, o.window
        work = Path(context.work_dir) if context.work_dir else None
        needed = o.steps * o.prompts_per_step
        pool = load_problems(o.data, o.pool_size if o.self_distillation else needed, context.seed, context.data_dir)
        self.solved_fraction = None
        train = self.self_distill(model, tokenizer, pool, needed, rng) if o.self_distillation else [pool[i % len(pool)] for i in range(needed)]

        gates = new_gates(model, 1.0)
        optimizer = torch.optim.AdamW([gates], lr=o.lr, betas=(0.9, 0.999), weight_decay=o.weight_decay)
        frozen = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        log: list[dict] = []
        first_step = self._resume(work, gates, optimizer, log) if context.resume and work else 0
        try:
            for step in range(first_step, o.steps):
                record = self._step(model, tokenizer, gates, optimizer, train[step * o.prompts_per_step:(step + 1) * o.prompts_per_step], sink, window)
                record["step"] = step + 1
                log.append(record)
                if work:
                    self._log(work, record)
                    if (step + 1) % o.checkpoint_every == 0 or step + 1 == o.steps:
                        self._checkpoint(work, gates, optimizer, step + 1, log)
                if context.on_step:
                    context.on_step(step + 1, o.steps, record)
        finally:
            for param, flag in zip(model.parameters(), frozen):
                param.requires_grad_(flag)
        rewards = [r["mean_reward"] for r in log]
        return self.scores(gates.detach().clone(), model_id(model), context, time.perf_counter() - started,
                           train_sink=sink, train_window=window, solved_fraction=self.solved_fraction,
                           reward_curve={"first": rewards[:3], "last": rewards[-3:], "mean": sum(rewards) / len(rewards)},
                           mean_alpha_curve=[r["mean_alpha"] for r in log])

    def _step(self, model, tokenizer, gates, optimizer, problems: list[Problem], sink: int, window: int) -> dict:
        o = self.options
        began = time.perf_counter()
        rank, size = world()
        problems = problems[rank::size] or problems[:1]  # data parallel: each process samples its share
        prompts = [chat_ids(tokenizer, p.prompt) for p in problems]
        with gated(model, gates, sink=sink, window=window):  # rollouts come from the gated model
            sequences, mask, offset = self.generate(model, tokenizer, prompts, sample=True, copies=o.group_size)
        completions = sequences[:, offset:]
        comp_mask = mask[:, offset:].float()
        texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completions, comp_mask)]
        rewards = torch.tensor([float(p.verify(t, p.answer)) for p, t in zip((p for p in problems for _ in range(o.group_size)), texts)])
        grouped = rewards.reshape(len(problems), o.group_size)
        advantages = (group_advantages(grouped) if o.advantage == "group" else batch_advantages(grouped)).flatten()
        mean_reward = all_mean(rewards.mean().reshape(1)).item()  # r_bar of the whole batch, on every process
        beta_prime = penalty_weight(mean_reward, o.beta, o.tau, o.adaptive_penalty)
        tokens = comp_mask.sum().clamp_min(1.0)
        optimizer.zero_grad()
        with gated(model, gates, sink=sink, window=window):
            rows = max(1, o.micro_batch // o.group_size) * o.group_size  # whole groups: they share a prompt
            for start in range(0, len(sequences), rows):
                part = slice(start, start + rows)
                if not advantages[part].any():
                    continue  # no learning signal in these groups
                logp = self.group_logprobs(model, sequences[part], mask[part], offset, o.group_size)
                # one update per batch: the sampling policy is the current one, so old = new (detached)
                surrogate = clipped_surrogate(logp, logp.detach(), advantages[part].to(logp.device), comp_mask[part].to(logp.device), o.epsilon)
                (-surrogate / tokens).backward()
        if size > 1:  # all-reduce the gate gradients: every process takes the same optimizer step
            if gates.grad is None:
                gates.grad = torch.zeros_like(gates)
            all_mean(gates.grad)
        penalty = beta_prime * gates.clamp(0.0, 1.0).mean()
        if beta_prime:
            penalty.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([gates], o.grad_clip).item() if gates.grad is not None else 0.0
        if gates.grad is not None:
            optimizer.step()
        with torch.no_grad():
            # Project the gates back onto [0, 1] after every step. Clamping only inside the forward
            # would let a gate drift above 1, where neither the reward nor the L1 term has a
            # gradient any more: it would stay there and keep its head for good.
            gates.clamp_(0.0, 1.0)
        alpha = gates.detach()
        return {"mean_reward": mean_reward, "mean_alpha": alpha.mean().item(), "beta_prime": beta_prime, "grad_norm": grad_norm,
                "gates_below_0.05": (alpha < 0.05).float().mean().item(), "gates_above_0.95": (alpha > 0.95).float().mean().item(),
                "completion_tokens": int(tokens.item()), "seconds": time.perf_counter() - began}

    # --- logs and checkpoints ------------------------------------------------------------------
    def _log(self, work: Path, record: dict) -> None:
        work.mkdir(parents=True, exist_ok=True)
        with (work / "train_log.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _checkpoint(self, work: Path, gates, optimizer, step: int, log: list[dict]) -> None:
        tmp = work / "checkpoint.pt.tmp"
        torch.save({"gates": gates.detach().clone(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
                    "options": asdict(self.options), "rng": torch.get_rng_state()}, tmp)
        tmp.replace(work / "checkpoint.pt")

    def _resume(self, work: Path, gates, optimizer, log: list[dict]) -> int:
        path = work / "checkpoint.pt"
        if not path.is_file():
            return 0
        state = torch.load(path, weights_only=False)
        if state["options"] != asdict(self.options):
            raise KvrlError(f"{path} was made with other options; resume with the same options or start afresh")
        with torch.no_grad():
            gates.copy_(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        log.extend(state["log"])
        lines = [json.dumps(r) for r in state["log"]]
        (work / "train_log.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
        return state["step"]
