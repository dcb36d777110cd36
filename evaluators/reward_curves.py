"""RLKV runs side by side (`kvrl report rewards`), e.g. rollouts in transformers and in vLLM: the reward and mean
gate of every step from each run's training log, each run's totals, and both curves of every run on one figure."""

from __future__ import annotations

from pathlib import Path

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.artifacts import read_training_log
from kvpress_rl.evaluators.plots import _pyplot
from kvpress_rl.io import write_atomic

TrainLog = list[dict]  # one record per step, as `kvrl select --strategy rlkv` logs it


def read_train_log(path: Path) -> TrainLog:
    if not path.is_file():
        raise KvrlError(f"no training log {path}; name the work folder of a `kvrl select --strategy rlkv` "
                        "(OUTPUT.run)")
    log = read_training_log(path)
    if not log:
        raise KvrlError(f"{path} logs no step yet")
    return log


def steps_table(runs: dict[str, TrainLog]) -> str:
    """One row per step: each run's mean reward and mean alpha (blank past a shorter run's last step)."""
    header = " | ".join(f"{name} reward | {name} mean alpha" for name in runs)
    lines = [f"| step | {header} |", "| --- |" + " --- | --- |" * len(runs)]
    for i in range(max(len(log) for log in runs.values())):
        cells = " | ".join(f"{log[i]['mean_reward']:.3f} | {log[i]['mean_alpha']:.3f}" if i < len(log) else " | "
                           for log in runs.values())
        lines.append(f"| {i + 1} | {cells} |")
    return "\n".join(lines)


def run_summary(name: str, log: TrainLog) -> str:
    """A run's mean reward (over all steps and the last 10), final mean alpha, time and rollout speed."""
    rewards = [r["mean_reward"] for r in log]
    last = rewards[-10:]
    rollout = sum(r["rollout_seconds"] for r in log)
    tokens = sum(r["completion_tokens"] for r in log)
    return (f"{name}: mean reward {sum(rewards) / len(rewards):.3f}, last 10 {sum(last) / len(last):.3f}, "
            f"final mean alpha {log[-1]['mean_alpha']:.3f}, steps {sum(r['seconds'] for r in log):.0f} s, "
            f"rollouts {rollout:.0f} s, {tokens / rollout:.1f} rollout tokens/s")


def write_reward_curves(runs: dict[str, TrainLog], output: Path) -> Path:
    """Mean reward (top) and mean gate (bottom) against the step, one line per run; the format from the suffix."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, log in runs.items():
        steps = [r["step"] for r in log]
        top.plot(steps, [r["mean_reward"] for r in log], label=name)
        bottom.plot(steps, [r["mean_alpha"] for r in log], label=name)
    top.set_ylabel("mean reward")
    bottom.set_ylabel("mean gate (alpha)")
    bottom.set_xlabel("step")
    top.legend()
    figure.tight_layout()
    image_format = output.suffix.lstrip(".") or "png"
    try:
        return write_atomic(output, lambda tmp: figure.savefig(tmp, format=image_format, dpi=100), overwrite=True)
    finally:
        plt.close(figure)
