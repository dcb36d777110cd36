"""Paired comparison of two `kvrl eval` cells on the same problems (exact two-sided sign test).

    python benchmarks/paired.py DIR/samples/TASK/rlkv-s0.8-seed0.jsonl DIR/samples/TASK/retrieval-s0.8-seed0.jsonl [--common]

`--common` compares two cells run on different numbers of problems (`--limit 500` against `--limit 100`)
on the problems both solved or failed, the first ones of the task.

Counts the problems only the first cell solves and only the second solves, and the probability of
a split at least that uneven if both were equally good (binomial, p = 1/2, over discordant problems).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def solved(path: Path) -> dict[int, bool]:
    with path.open() as handle:
        return {row["doc_id"]: row["acc"] > 0 for row in map(json.loads, handle)}


def sign_test(only_first: int, only_second: int) -> float:
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


def p_value(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def main(first: str, second: str, common: bool = False) -> None:
    a, b = solved(Path(first)), solved(Path(second))
    if common:
        shared = a.keys() & b.keys()
        a, b = {k: a[k] for k in shared}, {k: b[k] for k in shared}
    if a.keys() != b.keys() or not a:
        raise SystemExit("the two cells were run on different problems (compare the problems both ran with --common)")
    only_a = sum(a[k] and not b[k] for k in a)
    only_b = sum(b[k] and not a[k] for k in a)
    print(f"{len(a)} problems: {Path(first).stem} {sum(a.values())}, {Path(second).stem} {sum(b.values())}; "
          f"only the first {only_a}, only the second {only_b}; exact two-sided {p_value(sign_test(only_a, only_b))}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--common"]
    if len(args) != 2:
        raise SystemExit("usage: python benchmarks/paired.py FIRST.jsonl SECOND.jsonl [--common] (samples of two kvrl eval cells)")
    main(args[0], args[1], common="--common" in sys.argv[1:])
