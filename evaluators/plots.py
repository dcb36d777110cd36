"""Plots you can look at: gate heat maps, RL training curves, accuracy against sparsity."""

from __future__ import annotations

import json
from pathlib import Path

from kvpress_rl.io import write_atomic
from kvpress_rl.plan import plan_from_scores
from kvpress_rl.scores import HeadScores


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    written = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"),
                           overwrite=True)
    plt.close(fig)
    return written


def gate_heatmap(scores: HeadScores, path: str | Path, title: str | None = None) -> Path:
    """Layers x KV heads, clipped to [0, 1] as the plan sees them."""
    return gate_heatmaps([(title or f"{scores.strategy} gates ({scores.model_id})", scores)], path)


def gate_heatmaps(panels: list[tuple[str, HeadScores]], path: str | Path, kept_at: float | None = None) -> Path:
    """One heat map per `(title, scores)`, side by side; with `kept_at`, red dots on the heads that
    keep their full cache at that sparsity (the plan's global ranking)."""

    plt = _pyplot()
    layers, heads = panels[0][1].shape
    fig, axes = plt.subplots(1, len(panels),
                             figsize=(len(panels) * max(3.0, 0.5 * heads + 2), max(3.0, 0.22 * layers + 1)),
                             squeeze=False)
    for ax, (title, scores) in zip(axes[0], panels):
        image = ax.imshow(scores.scores.clamp(0, 1).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        if kept_at is not None:
            rows, cols = plan_from_scores(scores, kept_at).full.nonzero(as_tuple=True)
            ax.scatter(cols.numpy(), rows.numpy(), s=12, c="red", label=f"full cache at s = {kept_at}")
        ax.set_xlabel("KV head")
        ax.set_xticks(range(heads))
        ax.set_title(title)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes[0]), label="score (1 = full cache)")
    if kept_at is not None:
        axes[0][0].legend(loc="lower left", fontsize="small")
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
    levels = sorted({r["reward_level"] for r in records if "reward_level" in r})
    # which r_bar the adaptive L1 weight used (batch, group or micro-batch): the curves differ with it
    ax.set_title("RLKV training" + (f" (L1 weight from r_bar per {', '.join(levels)})" if levels else ""))
    return _save(fig, Path(path))
