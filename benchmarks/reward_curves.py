"""Reward and mean-gate curves of RLKV runs side by side (e.g. rollouts in transformers and in vLLM), from their logs.

    python benchmarks/reward_curves.py transformers=heads-count.run vllm=heads-count-vllm.run \\
        --output benchmarks/results/reward_curves_engines.png

Each NAME=FOLDER is a `kvrl select --strategy rlkv` work folder (`OUTPUT.run/`, its `train_log.jsonl`). Prints a table
per step (reward, mean alpha, rollout seconds) and the sums, and draws the two curves of every run on one figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=WORK_FOLDER")
    parser.add_argument("--output", default="reward_curves.png")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        if not folder:
            parser.error(f"{item!r}: expected NAME=WORK_FOLDER")
        runs[name] = read_log(Path(folder))
    steps = max(len(log) for log in runs.values())
    header = " | ".join(f"{name} reward | {name} mean alpha" for name in runs)
    print(f"| step | {header} |")
    print("| --- |" + " --- | --- |" * len(runs))
    for i in range(steps):
        cells = " | ".join(f"{log[i]['mean_reward']:.3f} | {log[i]['mean_alpha']:.3f}" if i < len(log) else " | " for log in runs.values())
        print(f"| {i + 1} | {cells} |")
    for name, log in runs.items():
        rewards = [r["mean_reward"] for r in log]
        rollout = sum(r["rollout_seconds"] for r in log)
        tokens = sum(r["completion_tokens"] for r in log)
        print(f"{name}: mean reward {sum(rewards) / len(rewards):.3f}, last 10 {sum(rewards[-10:]) / len(rewards[-10:]):.3f}, "
              f"final mean alpha {log[-1]['mean_alpha']:.3f}, steps {sum(r['seconds'] for r in log):.0f} s, rollouts {rollout:.0f} s, "
              f"{tokens / rollout:.1f} rollout tokens/s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, log in runs.items():
        x = [r["step"] for r in log]
        top.plot(x, [r["mean_reward"] for r in log], label=name)
        bottom.plot(x, [r["mean_alpha"] for r in log], label=name)
    top.set_ylabel("mean reward")
    bottom.set_ylabel("mean gate (alpha)")
    bottom.set_xlabel("step")
    top.legend()
    figure.tight_layout()
    output = Path(args.output)
    tmp = output.with_name(output.stem + ".tmp" + output.suffix)
    figure.savefig(tmp, dpi=100)
    tmp.replace(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
