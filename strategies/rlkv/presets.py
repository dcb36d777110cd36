"""Values of RLKV's unset options, per model: its profile's, or the official training's.

`resolve_values(model, options)` fills every option left at None from, in order: the RLKV defaults of
the model's profile (`kvpress_rl.profiles.profile_of(model).defaults_for("rlkv")`: the embedded model's
are `EMBEDDED_RLKV`, sized for its task and a CPU), or the per-family values of the paper (chosen from
`config.model_type`) over the official training's common values. It also says where each value came from,
for the printed table and provenance.
"""

from __future__ import annotations

from typing import Any

from kvpress_rl.masks import TRAIN_SINK, TRAIN_WINDOW
from kvpress_rl.profiles import EMBEDDED_PROFILE, profile_of
from kvpress_rl.strategies.rlkv.problems import EMBEDDED_ROLLOUT_TOKENS

# The official training (the paper and its AReaL fork): 2 epochs over 3,000 problems at 32 prompts a step
# (floor(3000 / 32) = 93 steps an epoch, so 186; the paper rounds to 185), the block-sparse streaming
# kernel, the whole batch's r_bar in the L1 weight (see RLKVOptions.reward_level), the batch advantage of
# examples/rlkv/*_grpo.yaml (reward_bias -0.5, reward_scaling 10, adv_norm batch/batch; see
# RLKVOptions.advantage), a DeepScaleR pool of 40,315 problems, activation checkpointing, rollouts
# generated 8 prompts (x G) at a time.
OFFICIAL: dict[str, Any] = {
    "steps": 186, "prompts_per_step": 32, "max_new_tokens": 7168, "lr": 0.01, "beta": 1e-3, "tau": 0.5,
    "temperature": 1.0, "sink": TRAIN_SINK, "window": TRAIN_WINDOW, "train_mask": "block",
    "reward_level": "batch", "advantage": "batch", "pool_size": 40315, "train_set_size": 3000,
    "gradient_checkpointing": True, "rollout_batch": 8,
}

# Per model family (config.model_type), from the paper's hyperparameter table; Qwen3's temperature is
# the official Qwen3 rollout setting (0.6; the paper's text says 1.0 for all).
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2": {"tau": 0.55},
    "qwen3": {"beta": 2.5e-3, "tau": 0.5, "temperature": 0.6},
}


def preset_of(model) -> tuple[str, dict[str, tuple[Any, str]]]:
    """`(family, {option: (value, source)})` for this model: its profile's RLKV defaults where it has any
    (family: the profile's name), else the official values with those of its `model_type` over them.

    A profile's value None is derived in `resolve_values`: `train_set_size` the pool size (every solved
    problem), `rollout_batch` the prompts of a step (one generate call a step)."""
    profile = profile_of(model)
    defaults = profile.defaults_for("rlkv")
    if defaults:
        return profile.family, {k: (v, f"profile {profile.family}") for k, v in defaults.items()}
    family = str(getattr(getattr(model, "config", None), "model_type", "") or "unknown")
    values = {k: (v, "official") for k, v in OFFICIAL.items()}
    values.update({k: (v, f"official {family}") for k, v in FAMILIES.get(family, {}).items()})
    return family, values


def resolve_values(model, options) -> tuple[str, dict[str, Any], dict[str, str]]:
    """`(family, {option: value to set}, {option: source})` for every option of `options` left at None."""
    family, preset = preset_of(model)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (value, source) in preset.items():
        if getattr(options, name) is None:
            values[name], sources[name] = value, source
    # derived from a preset's None: every solved problem of the pool, one generate call a step
    pool = values.get("pool_size", options.pool_size)
    steps_prompts = values.get("prompts_per_step", options.prompts_per_step)
    if "train_set_size" in values and values["train_set_size"] is None:
        values["train_set_size"] = pool
        sources["train_set_size"] += ": the whole pool"
    if "max_new_tokens" in values and family == EMBEDDED_PROFILE.family and options.data in EMBEDDED_ROLLOUT_TOKENS:
        values["max_new_tokens"] = EMBEDDED_ROLLOUT_TOKENS[options.data]
        sources["max_new_tokens"] += f": the {options.data} chains"
    if "rollout_batch" in values and values["rollout_batch"] is None:
        values["rollout_batch"] = steps_prompts
        sources["rollout_batch"] += ": the whole step"
    return family, values, sources
