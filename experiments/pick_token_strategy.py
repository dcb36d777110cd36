"""Which token strategy to put in a grid: each one's accuracy on validation problems of an embedded task,
so the pick never looks at the test split.

    python experiments/pick_token_strategy.py --task embedded_count --sparsity 0.6 --limit 50

Prints one row per strategy (accuracy, generated tokens per second) and the best by accuracy.
"""

from __future__ import annotations

import argparse

from kvpress_rl.embedded.evaluate import evaluate
from kvpress_rl.embedded.model import load_embedded
from kvpress_rl.embedded.task import ANSWER_LIMITS, EVAL_TASKS, task_problems
from kvpress_rl.models import model_id
from kvpress_rl.plan import build_plan
from kvpress_rl.plugins import get_strategy
from kvpress_rl.selector import SelectionContext

TOKEN_STRATEGIES = ("streaming", "snapkv", "h2o", "rkv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="embedded_count", choices=list(EVAL_TASKS))
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--strategies", default=",".join(TOKEN_STRATEGIES))
    parser.add_argument("--batch-size", type=int, default=25)
    args = parser.parse_args()
    model, tokenizer = load_embedded()
    items = task_problems(args.task, "validation", args.limit)
    rows = []
    print("| strategy | accuracy (%) | generated tokens/s |\n| --- | --- | --- |", flush=True)
    for name in args.strategies.split(","):
        selector = get_strategy(name).cls()
        if selector.kind != "token":
            raise SystemExit(f"{name} is not a token strategy; token strategies: {', '.join(TOKEN_STRATEGIES)}")
        scores = selector.select(model, tokenizer, SelectionContext(seed=0, model_id=model_id(model)))
        plan = build_plan(selector, scores, args.sparsity)
        result = evaluate(model, tokenizer, items, plan=plan, batch_size=args.batch_size,
                          max_new_tokens=ANSWER_LIMITS[args.task])
        rows.append((name, result.accuracy, result.tokens_per_second))
        print(f"| {name} | {100 * result.accuracy:.1f} | {result.tokens_per_second:.0f} |", flush=True)
    best = max(rows, key=lambda row: row[1])
    print(f"best on {args.limit} validation problems of {args.task} at sparsity {args.sparsity:g}: "
          f"{best[0]} ({100 * best[1]:.1f}%)")


if __name__ == "__main__":
    main()
