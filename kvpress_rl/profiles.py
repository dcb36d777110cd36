"""`ModelProfile`: what kvrl knows about a model beyond its config, in one place.

Strategies size their unset options from the profile (`profile.defaults_for("rlkv")`) and build
synthetic haystacks from its words; they never compare model names. `profile_of(model)` returns the
profile the loader attached (`model.config.kvrl_profile`: the embedded loader attaches `embedded`),
else the plain profile of the config's `model_type` (`llama`, `qwen2`, ...), which carries no
overrides, so real models run with each strategy's own (the paper's) defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpress_rl.embedded.task import EMBEDDED_TASK, WORDS
from kvpress_rl.policies import SINK_TOKENS, WINDOW_TOKENS

PROFILE_KEY = "kvrl_profile"  # the config attribute a loader sets to name a registered profile


@dataclass(frozen=True)
class ModelProfile:
    """`family`: the profile's name (a registered one, or the config's `model_type`);
    `strategy_defaults`: per strategy name, option values sized for this model (unset options only);
    `haystack_words`: words whose single tokens build synthetic contexts (empty: the whole vocabulary);
    `default_task`: what `kvrl eval` runs when no `--tasks` is given;
    `select_dtype`: what `kvrl select --dtype auto` runs in on the CPU (None: float32, as every command);
    `eval_dtype`: likewise for `kvrl eval` and `kvrl tune`."""

    family: str
    strategy_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    haystack_words: tuple[str, ...] = ()
    default_task: str = "gsm8k_r1"
    select_dtype: str | None = None
    eval_dtype: str | None = None

    def defaults_for(self, strategy: str) -> dict[str, Any]:
        return dict(self.strategy_defaults.get(strategy, {}))


# RLKV on the embedded model. Its ~270-token problems would fit whole in the official training window (`TRAIN_SINK` +
# `TRAIN_WINDOW` of kvpress_rl/masks.py: no signal), so training uses the token-exact sink + window it is
# evaluated with. With 40 steps instead of 186, beta 1e-3 leaves mean alpha still falling at the last step (0.51); at
# 1e-2 it settles near 0.3 with the reward back at 1.0. Its chains take 51 tokens, so 64 new tokens end only rambling
# rollouts, and the time saved buys 6 prompts a step instead of 4. Every solved problem of a 64-problem pool
# (train_set_size None = the pool size), one generate call a step.
EMBEDDED_RLKV = {
    "steps": 40, "prompts_per_step": 6, "max_new_tokens": 64, "lr": 0.1, "beta": 1e-2, "tau": 0.5,
    "temperature": 1.0, "sink": SINK_TOKENS, "window": WINDOW_TOKENS, "train_mask": "token", "reward_level": "batch",
    "pool_size": 64, "train_set_size": None, "gradient_checkpointing": False, "rollout_batch": None,
    # the paper's per-group z-score: these values were tuned with it (real models: the official batch one)
    "advantage": "group",
}

# Selection and evaluation run in bfloat16 (gated rollouts 1.6x faster than float32 on AVX-512 BF16 / AMX CPUs, decoding
# 1.7x); the task keeps its accuracy in it (`kvrl embedded evaluate --dtype bfloat16`, AMD EPYC): full cache 99.8% of
# 500 link test problems (float32: 100.0%), 98.7% of 300 counted validation problems (float32: 98.7%), within 1 point.
EMBEDDED_PROFILE = ModelProfile(family="embedded", strategy_defaults={"rlkv": EMBEDDED_RLKV},
                                haystack_words=tuple(WORDS), default_task=EMBEDDED_TASK, select_dtype="bfloat16",
                                eval_dtype="bfloat16")
REGISTERED = {EMBEDDED_PROFILE.family: EMBEDDED_PROFILE}  # profiles a loader can attach by name (read-only)


def profile_of(model: Any) -> ModelProfile:
    config = getattr(model, "config", None)
    attached = getattr(config, PROFILE_KEY, None)
    if attached:
        return REGISTERED[attached]
    return ModelProfile(family=str(getattr(config, "model_type", "") or "unknown"))


def attach_profile(model: Any, profile: ModelProfile) -> None:
    """Name `profile` in the model's config (saved with it by `save_pretrained`), for `profile_of`."""
    setattr(model.config, PROFILE_KEY, profile.family)
