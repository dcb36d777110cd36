"""RLKV's options, and their validation: ranges when built, choices and the process count once resolved.

Options left at None are filled per model by `presets.resolve_values` (through `RLKV.resolve`);
`check_resolved` then refuses what only the resolved values can show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvpress_rl.errors import KvrlError
from kvpress_rl.masks import BLOCK_SIZE, MASKS, TRAIN_SINK, TRAIN_WINDOW
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS
from kvpress_rl.strategies.rlkv.grpo import ADVANTAGES, REWARD_LEVELS


@dataclass
class RLKVOptions:
    data: str = field(default="embedded", metadata={"help": (
        "training problems: embedded, embedded-mixed (4 to 10 hops), embedded-count (the counted task, 5 to 9 steps), "
        "gsm8k (train split), math500 (with --data-dir) or a .jsonl file (the paper: DeepScaleR)")})
    allow_eval_data: bool = field(default=False, metadata={"help": (
        "allow training on a split an evaluation task scores (math500: math500_r1's test split)")})
    steps: int | None = field(default=None, metadata={"help": (
        "RL steps (default: the official 186 = 2 epochs of 3,000 / 32; 40 on the embedded model)")})
    prompts_per_step: int | None = field(default=None, metadata={"help": (
        "prompts per step (default: the paper's 32; 6 on the embedded model)")})
    group_size: int = field(default=4, metadata={"help": "samples per prompt, G"})
    temperature: float | None = field(default=None, metadata={"help": (
        "sampling temperature of rollouts (default 1.0; 0.6 on Qwen3, the official Qwen3 setting)")})
    max_new_tokens: int | None = field(default=None, metadata={"help": (
        "tokens per rollout (default: the paper's 7,168; 64 on the embedded model, 80 with --data embedded-count)")})
    lr: float | None = field(default=None, metadata={"help": (
        "AdamW learning rate on the gates (default: the paper's 0.01; 0.1 on the embedded model)")})
    weight_decay: float = field(default=0.017, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    epsilon: float = field(default=0.4, metadata={"help": "PPO clip range"})
    beta: float | None = field(default=None, metadata={"help": (
        "L1 weight (default: the paper's 1e-3, 2.5e-3 on Qwen3; 1e-2 on the embedded model)")})
    tau: float | None = field(default=None, metadata={"help": (
        "mean reward above which the L1 penalty is on (default: 0.55 on Qwen2.5, 0.5 otherwise)")})
    adaptive_penalty: bool = field(default=True, metadata={"help": (
        "beta' = beta * (exp(r_bar) - 1) above tau (off: constant beta)")})
    reward_level: str | None = field(default=None, metadata={"help": (
        "where r_bar of the adaptive L1 weight is taken: batch (the whole step, all processes), group (mean of "
        "per-group weights) or micro-batch (per backward micro-batch, token-weighted). Default batch: the official "
        "engine adds the penalty per micro-batch with mb_input['rewards'], but its micro-batch split leaves the "
        "[batch]-shaped rewards tensor whole, so every micro-batch sees the whole batch's rewards")})
    advantage: str | None = field(default=None, metadata={"help": (
        "how rewards become advantages: batch (the official training, AReaL's adv_norm: (r - 0.5) * 10, z-scored over "
        "the step's completion tokens of every process, unbiased std, eps 1e-5; a group whose samples agree still gets "
        "the batch's signal) or group (the paper's text: z-score within each prompt's group). Default batch; group on "
        "the embedded model, whose values were tuned with it")})
    self_distillation: bool = field(default=True, metadata={"help": (
        "train on problems the model solves at full cache, stratified by length")})
    pool_size: int | None = field(default=None, metadata={"help": (
        "problems in the self-distillation pool (default: the paper's DeepScaleR pool, up to 40,315; 64 on the "
        "embedded model)")})
    train_set_size: int | None = field(default=None, metadata={"help": (
        "distinct training problems chosen once and iterated in epochs (default: the paper's 3,000; the whole pool on "
        "the embedded model)")})
    length_bins: tuple[int, ...] = field(default=(0, 2000, 4000, 6000, 8000), metadata={"help": (
        "solution-length bin edges in tokens")})
    bin_proportions: tuple[float, ...] = field(default=(600.0, 600.0, 1000.0, 800.0), metadata={"help": (
        "share of the training set per bin (paper: 600/600/1000/800)")})
    sink: int | None = field(default=None, metadata={"help": (
        f"streaming sink in training (default: the paper's {TRAIN_SINK}; {SINK_TOKENS} on the embedded model)")})
    window: int | None = field(default=None, metadata={"help": (
        f"streaming window in training (default: the paper's {TRAIN_WINDOW}; {WINDOW_TOKENS} on the embedded "
        "model)")})
    train_mask: str | None = field(default=None, metadata={"help": (
        "streaming mask in training: block (the official block-sparse kernel; default) or token (exact sink + window; "
        "the embedded model's default)")})
    block_size: int = field(default=BLOCK_SIZE, metadata={"help": (
        f"block of the block mask, in tokens (official: {BLOCK_SIZE})")})
    micro_batch_tokens: int = field(default=7680, metadata={"help": (
        "tokens per backward micro-batch, whole groups (official: 7,680); memory only")})
    rollout_batch: int | None = field(default=None, metadata={"help": (
        "prompts per generate call (default 8; the whole step on the embedded model); memory only")})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": (
        "activation checkpointing in the backward (default on; off on the embedded model); memory only")})
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
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and accepted(value)):
                raise KvrlError(f"--{flag} must be {text}, got {value!r}")


def check_resolved(options: RLKVOptions, processes: int) -> None:
    """Refuse resolved options `select` cannot run with, on `processes` data-parallel processes."""
    o = options
    if o.advantage not in ADVANTAGES:
        raise KvrlError(f"--advantage must be {' or '.join(ADVANTAGES)}, got {o.advantage!r}")
    if o.reward_level not in REWARD_LEVELS:
        raise KvrlError(f"--reward-level must be one of {', '.join(REWARD_LEVELS)}, got {o.reward_level!r}")
    if o.train_mask not in MASKS:
        raise KvrlError(f"--train-mask must be one of {', '.join(MASKS)}, got {o.train_mask!r}")
    if o.steps < 1 or o.prompts_per_step < 1 or o.group_size < 2:
        raise KvrlError("rlkv needs steps >= 1, prompts_per_step >= 1 and group_size >= 2")
    if o.train_set_size < 1 or o.pool_size < 1 or o.micro_batch_tokens < 1 or o.rollout_batch < 1:
        raise KvrlError("rlkv needs train_set_size, pool_size, micro_batch_tokens and rollout_batch >= 1")
    if o.prompts_per_step % processes:
        raise KvrlError(f"--prompts-per-step {o.prompts_per_step} is not a multiple of the {processes} processes: "
                        "each process samples an equal share of a step's prompts")
