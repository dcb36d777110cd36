"""The model card of a head-pattern folder (`README.md`): front matter, how the pattern was made, its training
curve and gates, its plans with their KV memory, and how to use it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kvpress_rl.policies import BUDGET_BASE, SINK_TOKENS, WINDOW_TOKENS
from kvpress_rl.scores import CONFIG_FILE, SCORES_FILE, HeadScores

HEATMAP_FILE = "gates.png"
CURVE_FILE = "training.png"
CARD_DTYPE = "bfloat16"  # the dtype of keys and values in the card's memory table (the plan's default)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_PLAIN_YAML = re.compile(r"[A-Za-z0-9][\w./-]*")


def model_card(scores: HeadScores, config: dict[str, Any], rows: list[dict[str, Any]], *,
               training: list[dict[str, Any]] | None, training_log: Path | None, reference: str) -> str:
    """The README: YAML front matter, then how the pattern was made, its training curve and gates, and its plans.

    `training`: the log's records (None: no log found); `reference`: how a reader names this folder
    (`hf://OWNER/REPO` or a path)."""
    seq_len, head_dim = config["card"]["seq_len"], config["card"]["head_dim"]
    lines = [*_front_matter(scores), "", *_provenance_section(scores, config),
             *_training_section(training, training_log),
             *_plans_section(scores, rows, seq_len, head_dim), *_use_section(scores, reference, seq_len, head_dim),
             *_files_section(scores, training), ""]
    return "\n".join(lines)


def _front_matter(scores: HeadScores) -> list[str]:
    front = ["---", "library_name: kvpress-rl", "tags:", "- kv-cache", "- head-pattern",
             f"- {_yaml(scores.strategy or 'unknown')}"]
    if _HUB_ID.fullmatch(scores.model_id) and ".." not in scores.model_id:
        front.append(f"base_model: {_yaml(scores.model_id)}")
    return [*front, "---"]


def _provenance_section(scores: HeadScores, config: dict[str, Any]) -> list[str]:
    """The title, what the scores mean, and the table of how they were made."""
    layers, kv_heads = scores.shape
    model = scores.model_id
    strategy = scores.strategy or "unknown"
    version = f", version {_code(scores.strategy_version)}" if scores.strategy_version else ""
    options = _code(json.dumps(scores.options, sort_keys=True, default=str)) if scores.options else "none recorded"
    lines = [
        f"# Head pattern: {_text(pattern_name(scores))} for {_text(model or 'an unnamed model')}", "",
        f"One score per (layer, KV head) of {_code(model) if model else 'the model'}: {layers} layers x {kv_heads} "
        f"KV heads = {layers * kv_heads} KV heads. A higher score keeps the head's full KV cache. At sparsity s, "
        "kvpress-rl (head-wise KV-cache compression after RLKV, [arXiv 2510.08525](https://arxiv.org/abs/2510.08525)) "
        "ranks all KV heads of the model together and compresses the "
        f"lowest-scoring fraction s: each of those keeps {BUDGET_BASE} tokens ({SINK_TOKENS} sink + {WINDOW_TOKENS} "
        "recent), the others their whole history.", "",
        "## How it was made", "",
        "| | |", "| --- | --- |",
        f"| model | {_code(model) if model else 'not recorded'} |",
        f"| layers x KV heads | {layers} x {kv_heads} |",
        f"| strategy | {_code(strategy)}{version} |",
        f"| options | {options} |",
        f"| data | {_code(scores.data) if scores.data else 'not recorded'} |",
        f"| seed | {scores.seed if scores.seed is not None else 'not recorded'} |",
        f"| wall time | {_duration(scores.wall_time_s)} |",
        f"| exported from | {_code(config['source'])} |",
        f"| exported by | kvpress-rl {_text(config['kvpress_rl_version'])} |",
        "",
    ]
    if _published(scores):
        lines += [f"Imported from a published TSV pattern ({_code(Path(scores.data).name)}): the file records no "
                  "training provenance (who trained it, on what data, with which options and seed, for how long); see "
                  "where it was published." + (" The model id was set at export (`--model-id`)." if model else ""), ""]
    return lines


def _training_section(training: list[dict[str, Any]] | None, training_log: Path | None) -> list[str]:
    lines = ["## Training", ""]
    if training:
        first, last = training[0], training[-1]
        lines += [f"![training curve]({CURVE_FILE})", "",
                  f"{len(training)} logged steps (last step {last['step']:g}): mean reward "
                  f"{first['mean_reward']:.3f} -> {last['mean_reward']:.3f}, mean gate (alpha) "
                  f"{first['mean_alpha']:.3f} -> {last['mean_alpha']:.3f}.", ""]
    elif training_log is not None:
        lines += [f"The training log found beside the scores ({_code(training_log.name)}) holds no step, so there is "
                  "no training curve.", ""]
    else:
        lines += ["No training log was found beside the scores (`HEADS.run/train_log.jsonl`, the work folder of "
                  "`kvrl select`), so there is no training curve.", ""]
    return lines


def _plans_section(scores: HeadScores, rows: list[dict[str, Any]], seq_len: int, head_dim: int) -> list[str]:
    """The gate heat map, then the KV memory of each exported plan beside the full cache."""
    layers, kv_heads = scores.shape
    lines = ["## Gates", "", f"![gate heat map]({HEATMAP_FILE})", "",
             "Scores clipped to [0, 1] as the plan sees them: rows are layers, columns KV heads.", "",
             "## Plans and KV memory", "",
             f"For one sequence of {seq_len} tokens (`--seq-len`), keys and values in {CARD_DTYPE}, head dim "
             f"{head_dim} (`--head-dim` at export: the scores do not record it; check it against the model's config). "
             "Plans follow the official rule (`kvpress_rl.plan.plan_from_scores`).", "",
             "| sparsity s | compressed KV heads | full KV heads | KV cache (MiB) | of the full cache |",
             "| --- | --- | --- | --- | --- |"]
    full_bytes = rows[0]["full_kv_bytes"] if rows else 0
    lines.append(f"| 0 (full cache) | 0 / {layers * kv_heads} | {layers * kv_heads} | {full_bytes / 2**20:.1f} | "
                 "100.0% |")
    for row in rows:
        lines.append(f"| {row['sparsity']:g} | {row['compressed']} / {row['heads']} | "
                     f"{row['heads'] - row['compressed']} | {row['kv_bytes'] / 2**20:.1f} | "
                     f"{100 * row['share']:.1f}% |")
    return lines


def _use_section(scores: HeadScores, reference: str, seq_len: int, head_dim: int) -> list[str]:
    lines = ["", "## Use it", "", "With kvpress-rl installed:", "", "```bash",
             f"kvrl plan --heads {reference} --sparsity 0.5 --seq-len {seq_len} --head-dim {head_dim}"]
    if scores.model_id:
        lines.append(f"kvrl eval --model {scores.model_id} --strategy {scores.strategy or 'unknown'} "
                     f"--heads {reference} --sparsity 0.5")
    return [*lines, "```", "", "```python", "from kvpress_rl import HeadScores, plan_from_scores", "",
            f"scores = HeadScores.load({json.dumps(reference)})", "plan = plan_from_scores(scores, 0.5)", "```", ""]


def _files_section(scores: HeadScores, training: list[dict[str, Any]] | None) -> list[str]:
    layers, kv_heads = scores.shape
    lines = ["## Files", "",
             f"- `{SCORES_FILE}`: the scores, a float32 `[{layers}, {kv_heads}]` tensor `scores`, with their "
             "provenance (`HeadScores.load` reads it, or this folder)",
             f"- `{CONFIG_FILE}`: the provenance and shape as JSON",
             f"- `{HEATMAP_FILE}`: the gate heat map"]
    if training:
        lines.append(f"- `{CURVE_FILE}`: the training curve (mean reward and mean alpha per step)")
    return lines


def pattern_name(scores: HeadScores) -> str:
    """What the card and the heat map call the pattern: its strategy, and the file name of a published TSV."""
    strategy = scores.strategy or "unknown"
    return f"{Path(scores.data).name} ({strategy})" if _published(scores) else strategy


def _published(scores: HeadScores) -> bool:
    """A pattern read from a TSV file (`HeadScores.from_tsv`, or the `file` strategy on one)."""
    return scores.strategy == "file" and str(scores.data).endswith((".tsv", ".txt"))


def _yaml(value: str) -> str:
    """A YAML scalar: plain when it is a simple name, else double-quoted (a JSON string is valid YAML)."""
    return value if _PLAIN_YAML.fullmatch(value) else json.dumps(value)


def _text(value: Any) -> str:
    """One line of user text for Markdown (a table cell or a heading)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    spelled = f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"
    return f"{spelled} ({seconds:.0f} s)" if hours or minutes else spelled
