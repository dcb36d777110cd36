"""Plots you can look at: gate heat maps, RL training curves, accuracy against sparsity."""

from __future__ import annotations

import json
from pathlib import Path

from kvpress_rl.io import write_atomic
from kvpress_rl.scores import HeadScores


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    written = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"), overwrite=True)
    plt.close(fig)
    return written


def gate_heatmap(scores: HeadScores, path: str | Path, title: str | None = None) -> Path:
    """Layers x KV heads, clipped to [0, 1] as the plan sees them."""
    plt = _pyplot()
    values = scores.scores.clamp(0, 1).numpy()
    layers, heads = values.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * heads + 2), max(3.0, 0.22 * layers + 1)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(title or f"{scores.strategy} gates ({scores.model_id})")
    fig.colorbar(image, ax=ax, label="score (1 = full cache)")
    return _save(fig, Path(path))


def training_curves(log_path: str | Path, path: str | Path) -> Path:
    """Mean reward and mean alpha per step (the paper's figure 4)."""
    plt = _pyplot()
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["mean_reward"] for r in records], label="mean reward", color="tab:blue")
    ax.plot(steps, [r["mean_alpha"] for r in records], label="mean alpha", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("RLKV training")
    return _save(fig, Path(path))
