"""Paired comparison of two settings on the same problems: how much accuracy one may have lost, with confidence.

`drop_upper_bound` is a one-sided upper confidence bound of the accuracy drop (full cache minus a compressed
setting) from the 2 x 2 table of paired outcomes (`PairedCounts`): Newcombe (1998), *Improved confidence intervals
for the difference between binomial proportions based on paired data*, method 10 (Wilson score intervals of both
accuracies combined with the correlation of the pairs). It is not zero-width when no answer changes, so a handful
of problems cannot prove a setting lossless (`least_bound`, `problems_for`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

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
    return PairedCounts(*counts)


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


