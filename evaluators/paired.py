"""Paired comparisons of two settings on the same problems: how much accuracy one may have lost, with confidence,
and whether two cells differ at all.

`drop_upper_bound` is a one-sided upper confidence bound of the accuracy drop (full cache minus a compressed
setting) from the 2 x 2 table of paired outcomes (`PairedCounts`): Newcombe (1998), *Improved confidence intervals
for the difference between binomial proportions based on paired data*, method 10 (Wilson score intervals of both
accuracies combined with the correlation of the pairs). It is not zero-width when no answer changes, so a handful
of problems cannot prove a setting lossless (`least_bound`, `problems_for`).

`compare_cells` (`kvrl report paired`) is the exact two-sided sign test of two `kvrl eval` cells: the problems only
the first solves against those only the second solves, and the probability of a split at least that uneven if both
were equally good (binomial, p = 1/2, over the discordant problems).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.errors import KvrlError


@dataclass(frozen=True)
class PairedCounts:
    """The problems both settings solve, only the full cache solves, only the compressed one solves, neither.

    Counts may be fractional: a strategy averaged over seeds solves a problem in a share of its seeds."""

    both: float
    only_full: float
    only_compressed: float
    neither: float

    @property
    def problems(self) -> float:
        return self.both + self.only_full + self.only_compressed + self.neither

    @property
    def drop(self) -> float:
        """Full-cache accuracy minus the compressed setting's, as a fraction."""
        return (self.only_full - self.only_compressed) / self.problems


def paired_counts(full: dict[object, bool], compressed: list[dict[object, bool]]) -> PairedCounts:
    """Pair the full cache's per-problem outcomes with the compressed setting's (one dict per seed) on the same
    problems; settings run on other problems are refused."""
    if not full or any(set(seed) != set(full) for seed in compressed):
        raise KvrlError("the full cache and the compressed setting were run on different problems; rerun with the "
                        "same --limit")
    counts = [0.0, 0.0, 0.0, 0.0]
    for problem, full_right in full.items():
        share = statistics.mean(float(seed[problem]) for seed in compressed)
        if full_right:
            counts[0] += share
            counts[1] += 1 - share
        else:
            counts[2] += share
            counts[3] += 1 - share
    both, only_full, only_compressed, neither = counts
    return PairedCounts(both=both, only_full=only_full, only_compressed=only_compressed, neither=neither)


def normal_quantile(confidence: float) -> float:
    """z with P(Z <= z) = confidence."""
    if not 0.5 < confidence < 1.0:
        raise KvrlError(f"--confidence must lie strictly between 0.5 and 1, not {confidence:g}")
    return statistics.NormalDist().inv_cdf(confidence)


def wilson_interval(successes: float, n: float, z: float) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def drop_upper_bound(counts: PairedCounts, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of the paired accuracy drop (full minus compressed), as a fraction.

    Newcombe (1998), method 10: Wilson intervals of both accuracies combined with the correlation of the paired
    outcomes. Unlike a normal interval on the differences it is not zero-width when no problem changes: with
    every one of 50 problems solved both ways it still allows a drop of about 5 points at 95%."""
    n = counts.problems
    z = normal_quantile(confidence)
    full, compressed = counts.both + counts.only_full, counts.both + counts.only_compressed
    p_full, p_compressed = full / n, compressed / n
    _, full_high = wilson_interval(full, n, z)
    compressed_low, _ = wilson_interval(compressed, n, z)
    products = (counts.both + counts.only_full) * (counts.neither + counts.only_compressed) * \
        (counts.both + counts.only_compressed) * (counts.neither + counts.only_full)
    agreement = counts.both * counts.neither - counts.only_full * counts.only_compressed
    if products <= 0:
        phi = 0.0
    else:
        phi = (max(agreement - n / 2, 0.0) if agreement > 0 else agreement) / math.sqrt(products)
    up, down = full_high - p_full, p_compressed - compressed_low
    return counts.drop + math.sqrt(max(0.0, up * up - 2 * phi * up * down + down * down))


def least_bound(problems: int, confidence: float = 0.95) -> float:
    """The smallest drop bound `problems` problems can give: every one solved by both settings."""
    return drop_upper_bound(PairedCounts(problems, 0, 0, 0), confidence)


def problems_for(margin: float, confidence: float = 0.95) -> int:
    """The fewest problems on which a setting that changes no answer holds within `margin` points with its bound."""
    n = 10
    while 100 * least_bound(n, confidence) > margin and n < 10**6:
        n = math.ceil(n * 1.05)
    return n




SOLVED_METRICS = ("acc", "exact_match", "pass_at_1")  # a sample's score, by kind of task


def sample_solved(row: dict) -> bool:
    """Whether a sample `kvrl eval` wrote (`samples/TASK/CELL.jsonl`) is solved: its task's metric is positive."""
    score = next((value for key, value in row.items() if key in SOLVED_METRICS), None)
    if score is None:
        raise KvrlError(f"a sample has none of the scores {', '.join(SOLVED_METRICS)}; its keys: "
                        f"{', '.join(sorted(row))}")
    return score > 0


def solved_problems(path: Path) -> dict[int, bool]:
    """`{doc_id: solved}` of one cell's samples file."""
    if not path.is_file():
        raise KvrlError(f"no samples file {path} (a cell of a `kvrl eval` output: DIR/samples/TASK/CELL.jsonl)")
    with path.open() as handle:
        return {row["doc_id"]: sample_solved(row) for row in map(json.loads, handle)}


@dataclass(frozen=True, kw_only=True)
class SignTest:
    """Two cells on the same problems: how many each solves, how many only one of them solves, and the exact
    two-sided p of that split."""

    problems: int
    first_solved: int
    second_solved: int
    only_first: int
    only_second: int
    p: float


def sign_test_p(only_first: int, only_second: int) -> float:
    """Exact two-sided sign test over the discordant problems (binomial, p = 1/2)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_cells(first: dict[int, bool], second: dict[int, bool], common: bool = False) -> SignTest:
    """The sign test of two cells' `{doc_id: solved}`; cells run on other problems are refused unless `common`
    (then the problems both ran: the first ones of the task when they differ by `--limit`)."""
    if common:
        shared = first.keys() & second.keys()
        first, second = {k: first[k] for k in shared}, {k: second[k] for k in shared}
    if first.keys() != second.keys() or not first:
        raise KvrlError("the two cells were run on different problems (compare the problems both ran with --common)")
    only_first = sum(first[k] and not second[k] for k in first)
    only_second = sum(second[k] and not first[k] for k in first)
    return SignTest(problems=len(first), first_solved=sum(first.values()), second_solved=sum(second.values()),
                    only_first=only_first, only_second=only_second, p=sign_test_p(only_first, only_second))


def p_value_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def sign_test_line(first_name: str, second_name: str, test: SignTest) -> str:
    return (f"{test.problems} problems: {first_name} {test.first_solved}, {second_name} {test.second_solved}; "
            f"only the first {test.only_first}, only the second {test.only_second}; "
            f"exact two-sided {p_value_text(test.p)}")
