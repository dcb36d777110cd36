"""Two `kvrl eval` outputs of the same grid, one per engine: accuracy of each cell, how many answers are identical,
and the problems whose answers differ (with the first character where they part).

    python benchmarks/compare_engines.py kvrl-eval-transformers kvrl-eval-vllm [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def answers(folder: Path) -> dict[tuple[str, str], dict[int, tuple[str, bool]]]:
    """`{(task, cell): {doc_id: (answer, correct)}}` from a grid's classified samples."""
    found = {}
    for path in sorted((folder / "samples").glob("*/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        found[(path.parent.name, path.stem)] = {row["doc_id"]: (row["filtered_resps"][0], row["classification"] == "correct") for row in rows}
    return found


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    first, second = answers(args.first), answers(args.second)
    print(f"| task | cell | accuracy {args.first.name} | accuracy {args.second.name} | identical answers | differing problems |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in sorted(set(first) & set(second)):
        a, b = first[key], second[key]
        common = sorted(set(a) & set(b))
        same = sum(a[i][0] == b[i][0] for i in common)
        differing = [f"{i} (char {first_difference(a[i][0], b[i][0])})" for i in common if a[i][0] != b[i][0]]
        accuracy = [100 * sum(side[i][1] for i in common) / len(common) for side in (a, b)]
        print(f"| {key[0]} | {key[1]} | {accuracy[0]:.1f} | {accuracy[1]:.1f} | {same} / {len(common)} | {', '.join(differing) or '-'} |")


if __name__ == "__main__":
    main()
