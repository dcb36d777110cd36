"""What `kvrl tune` writes: its table, each ladder, DIR/tune.md, tune.json, tune.csv and the plot tune.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvpress_rl.evaluators.plots import _pyplot, _save
from kvpress_rl.evaluators.tune import Choice, Outcome
from kvpress_rl.io import write_atomic


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def outcome_table(outcomes_: list[Outcome]) -> str:
    """One row per task and strategy: the choice, how it was reached and what it gives."""
    lines = ["| task | strategy | full (val) | largest holding (observed) | largest holding (bound) | monotonic | "
             "**chosen** | test: full / chosen | KV saved | ideal gain |", "|" + " --- |" * 10]
    for o in outcomes_:
        c = o.choice
        saved = f"{100 * (1 - o.kv_bytes_plan / o.kv_bytes_full):.0f}%" if o.kv_bytes_full else "-"
        test = f"{percent(o.test_full)} / {percent(o.test_accuracy)}" if o.test_accuracy is not None else "not measured"
        lines.append(f"| {c.task} | {c.strategy} | {percent(c.full_accuracy)} | {c.largest('observed'):g} | "
                     f"{c.largest('bound'):g} | "
                     f"{'yes' if c.monotonic else '**no**: safe ' + format(c.safe('observed'), 'g')} | "
                     f"**{c.chosen:g}** | {test} | {saved} | {o.gain:.2f}x |")
    return "\n".join(lines)


def ladder_table(choice: Choice) -> str:
    lines = [f"{choice.task}, {choice.strategy} ({choice.problems} validation problems; full cache "
             f"{percent(choice.full_accuracy)}%)", "",
             "| sparsity | accuracy | drop | drop bound | holds (observed / bound) |",
             "| --- | --- | --- | --- | --- |"]
    for p in choice.points:
        lines.append(f"| {p.sparsity:g} | {percent(p.accuracy)} | {100 * p.drop:+.1f} | {100 * p.drop_bound:.1f} "
                     f"| {'yes' if p.holds else 'no'} / {'yes' if p.holds_bound else 'no'} |")
    return "\n".join(lines)


def tune_markdown(outcomes_: list[Outcome], margin: float, confidence: float) -> str:
    parts = [f"# Near-lossless sparsity (margin {margin:g} points, {100 * confidence:g}% paired bound)", "",
             "Chosen on the validation split (the largest sparsity below which every tested one holds with its "
             "confidence bound), then measured once on the test split.", "", outcome_table(outcomes_), ""]
    for o in outcomes_:
        parts += [ladder_table(o.choice), ""]
        if o.serve_command:
            parts += [f"Serve it: `{o.serve_command}`", ""]
        parts += [f"- {note}" for note in o.notes] + ([""] if o.notes else [])
    return "\n".join(parts)


def tune_figure(outcomes_: list[Outcome], margin: float):
    plt = _pyplot()
    tasks = sorted({o.choice.task for o in outcomes_})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [o for o in outcomes_ if o.choice.task == task]
        full = 100 * mine[0].choice.full_accuracy
        ax.axhspan(full - margin, full, color="tab:green", alpha=0.15, label=f"within {margin:g} points of full")
        ax.axhline(full, color="black", lw=1, label=f"full cache {full:.1f}%")
        for o in mine:
            xs = [p.sparsity for p in o.choice.points]
            line, = ax.plot(xs, [100 * p.accuracy for p in o.choice.points], marker="o", ms=4, label=o.choice.strategy)
            if o.choice.chosen:
                chosen = next(p for p in o.choice.points if abs(p.sparsity - o.choice.chosen) < 1e-9)
                ax.plot([chosen.sparsity], [100 * chosen.accuracy], marker="*", ms=16, color=line.get_color(),
                        mec="black")
        ax.set_title(f"{task} (validation; star: chosen)")
        ax.set_xlabel("sparsity (share of KV heads compressed)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    return fig


CSV_FIELDS = ("task", "strategy", "problems", "full_accuracy", "largest_observed", "largest_bound", "safe_observed",
              "safe_bound", "monotonic", "chosen", "test_full_accuracy", "test_accuracy", "test_problems",
              "mean_sequence_tokens", "kv_saved", "ideal_throughput_gain")


def csv_row(outcome: Outcome) -> dict:
    row = outcome.as_dict()
    row["kv_saved"] = 1 - outcome.kv_bytes_plan / outcome.kv_bytes_full if outcome.kv_bytes_full else 0.0
    row["monotonic"] = "yes" if outcome.choice.monotonic else ""
    return {key: "" if row[key] is None else row[key] for key in CSV_FIELDS}


def write_csv(tmp: Path, outcomes_: list[Outcome]) -> None:
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_row(o) for o in outcomes_)


def write_tune(directory: Path, outcomes_: list[Outcome], margin: float, confidence: float) -> tuple[Path, Path, Path]:
    """DIR/tune.md, DIR/tune.json (and its rows as DIR/tune.csv) and DIR/tune.png, each written whole or not at all."""
    write_atomic(directory / "tune.csv", lambda tmp: write_csv(tmp, outcomes_), overwrite=True)
    md = write_atomic(directory / "tune.md", lambda tmp: tmp.write_text(tune_markdown(outcomes_, margin, confidence)),
                      overwrite=True)
    data = {"margin_points": margin, "confidence": confidence, "results": [o.as_dict() for o in outcomes_]}
    js = write_atomic(directory / "tune.json", lambda tmp: tmp.write_text(json.dumps(data, indent=2)), overwrite=True)
    png = _save(tune_figure(outcomes_, margin), directory / "tune.png")
    return md, js, png


