"""Training problems and their verifiers: the embedded task, GSM8K-style JSON Lines, MATH answers."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvpress_rl.answers import embedded_equal, gsm8k_gold, math_equal
from kvpress_rl.embedded.task import COUNTED_SELECT, counted_problem, make_problem, mixed_problem, training_seed
from kvpress_rl.errors import KvrlError


@dataclass(frozen=True)
class RewardProblem:
    prompt: str
    answer: str
    verify: Callable[[str, str], bool]
    source: str = ""


# The verifiers keep their own names: a saved training set records its verifier by name (VERIFIERS).
def verify_embedded(text: str, answer: str) -> bool:
    """The embedded task's answer check (`kvpress_rl.answers.embedded_equal`)."""
    return embedded_equal(text, answer)


def verify_math(text: str, answer: str) -> bool:
    """The math answer check that evaluation uses too (`kvpress_rl.answers.math_equal`)."""
    return math_equal(text, answer)


# Every embedded training set draws from training stream 1 + seed (`training_seed`): streams start above every
# evaluation split's seeds, whatever the seed, and stream 0 is the adapter's own.
def embedded_problems(count: int, seed: int) -> list[RewardProblem]:
    drawn = (make_problem(training_seed(i, 1 + seed)) for i in range(count))
    return [RewardProblem(p.prompt(), p.answer, verify_embedded, f"embedded:{p.seed}") for p in drawn]


def embedded_mixed_problems(count: int, seed: int) -> list[RewardProblem]:
    """The embedded task at the difficulties the embedded model was trained on (4 to 10 hops, 20 to
    40 links), so its solutions vary in length and self-distillation has lengths to stratify."""
    drawn = (mixed_problem(i, 1 + seed) for i in range(count))  # streams 1, 2, ...: disjoint from the adapter's own (0)
    return [RewardProblem(p.prompt(), p.answer, verify_embedded, f"embedded-mixed:{p.seed}") for p in drawn]


def embedded_counted_problems(count: int, seed: int) -> list[RewardProblem]:
    """The embedded counted task at 5 to 9 steps (`COUNTED_SELECT`), from training streams 1, 2, ...: the
    adapter learned on stream 0, and the test split spans 5 to 16 steps, lengths the heads are not chosen on."""
    drawn = (counted_problem(training_seed(i, 1 + seed), COUNTED_SELECT) for i in range(count))
    return [RewardProblem(p.prompt(), p.answer, verify_embedded, f"embedded-count:{p.seed}") for p in drawn]


# Rollout lengths of the embedded data sets: the profile's 64 tokens fit the links chains (51 tokens); the
# counted chains of 9 steps take 63, so their rollouts get room for the answer and a little more.
EMBEDDED_ROLLOUT_TOKENS = {"embedded-count": 80}


R1_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def jsonl_problems(path: Path, count: int) -> list[RewardProblem]:
    """A JSON Lines file with `question` (or `problem`) and `answer` fields; GSM8K's `#### n` is understood."""
    if not path.is_file():
        raise KvrlError(f"training data not found: {path}")
    rows = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question = row.get("question") or row["problem"]
                answer = str(row["answer"])
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise KvrlError(f"{path}:{line_no}: expected a JSON object with 'question' (or 'problem') and "
                                "'answer'") from None
            if "####" in answer:
                answer = gsm8k_gold(answer)
            rows.append(RewardProblem(question + R1_SUFFIX, answer, verify_math, f"{path.name}:{line_no}"))
            if len(rows) == count:
                break
    return rows


VERIFIERS = {"verify_embedded": verify_embedded, "verify_math": verify_math}  # by name, for a saved training set

NAMED_SETS = {"gsm8k": "gsm8k/train.jsonl", "math500": "math500/test.jsonl"}


# Splits that an evaluation task scores (evaluators/tasks.py; strategies do not import evaluators):
# training on them would leak the test problems into the gates.
EVAL_SETS = {"math500": "math500_r1 and minerva_math500"}
EVAL_FILES = {"math500/test.jsonl": "math500_r1", "gsm8k/test.jsonl": "gsm8k_r1", "aime24/test.jsonl": "aime24_r1",
              "mbpp/test.jsonl": "mbpp_r1"}


def check_not_eval_data(data: str, allow: bool) -> None:
    """Refuse a training set that an evaluation task evaluates, unless `allow` (`--allow-eval-data`)."""
    if allow:
        return
    task = EVAL_SETS.get(data) or next((t for f, t in EVAL_FILES.items() if data.replace("\\", "/").endswith(f)), None)
    if task:
        raise KvrlError(f"--data {data} is a test split that the evaluation task {task} scores: training on it leaks "
                        "the test problems into the gates. Train on DeepScaleR problems (what the paper trained on) "
                        "with --data FILE.jsonl, or pass --allow-eval-data to train on it anyway")


def bin_quotas(available: list[int], weights: list[float], total: int) -> list[int]:
    """Problems to take per bin: `total` (at most what there is) split in proportion to `weights`; a bin
    with too few gives all it has and its shortfall goes to the other bins, in proportion again."""
    quotas = [0] * len(available)
    remaining = min(total, sum(a for a, w in zip(available, weights) if w > 0))
    open_bins = [i for i, (a, w) in enumerate(zip(available, weights)) if a > 0 and w > 0]
    while remaining > 0 and open_bins:
        weight_sum = sum(weights[i] for i in open_bins)
        share = {i: remaining * weights[i] / weight_sum for i in open_bins}
        short = [i for i in open_bins if share[i] >= available[i] - quotas[i]]
        if short:  # these bins give everything; the rest is shared again
            for i in short:
                remaining -= available[i] - quotas[i]
                quotas[i] = available[i]
            open_bins = [i for i in open_bins if i not in short]
            continue
        floors = {i: int(share[i]) for i in open_bins}  # largest remainders take the leftover units
        leftover = remaining - sum(floors.values())
        for i in sorted(open_bins, key=lambda i: (floors[i] - share[i], i))[:leftover]:
            floors[i] += 1
        for i in open_bins:
            quotas[i] += floors[i]
        remaining = 0
    return quotas


def training_set(solved: list[tuple[RewardProblem, int]], size: int, edges: tuple[int, ...],
                 proportions: tuple[float, ...], rng: random.Random) -> list[RewardProblem]:
    """The fixed set of distinct training problems, chosen once from `(problem, solution length)` pairs:
    stratified by length bins (`edges`; longer solutions count in the last bin) with `bin_quotas`."""
    bins: list[list[RewardProblem]] = [[] for _ in range(len(edges) - 1)]
    for problem, length in solved:
        index = next((i for i in range(len(edges) - 1) if edges[i] <= length < edges[i + 1]), len(edges) - 2)
        bins[index].append(problem)
    weights = [float(w) for w in proportions[: len(bins)]] + [0.0] * max(0, len(bins) - len(proportions))
    quotas = bin_quotas([len(b) for b in bins], weights, size)
    return [problem for bin_, quota in zip(bins, quotas) for problem in rng.sample(bin_, quota)]


def step_batch(size: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices into a fixed set of `size` problems for a 0-based `step`: epochs of a seeded shuffle, each
    cut into consecutive batches of `batch`, the last incomplete batch of an epoch dropped (the official
    code's StatefulDataLoader with shuffle and drop_last)."""
    per_epoch = size // batch
    if per_epoch < 1:
        raise KvrlError(f"the training set has {size} problems, fewer than one step's {batch} prompts; "
                        "lower --prompts-per-step or give more problems (--pool-size, --train-set-size)")
    epoch, index = divmod(step, per_epoch)
    order = list(range(size))
    random.Random(f"rlkv-epoch:{seed}:{epoch}").shuffle(order)
    return order[index * batch:(index + 1) * batch]


def load_problems(data: str, count: int, seed: int, data_dir: str | None) -> list[RewardProblem]:
    """`embedded`, `embedded-mixed`, `embedded-count`, a named set under `data_dir` (gsm8k, math500), or a JSON Lines
    path."""
    if data == "embedded":
        return embedded_problems(count, seed)
    if data == "embedded-mixed":
        return embedded_mixed_problems(count, seed)
    if data == "embedded-count":
        return embedded_counted_problems(count, seed)
    if data in NAMED_SETS:
        if not data_dir:
            raise KvrlError(f"training set {data!r} needs --data-dir (a folder laid out like shared/data)")
        return jsonl_problems(Path(data_dir) / NAMED_SETS[data], count)
    if re.search(r"\.jsonl?$", data):
        return jsonl_problems(Path(data), count)
    raise KvrlError(f"unknown training data {data!r}; accepted: embedded, embedded-mixed, embedded-count, "
                    f"{', '.join(NAMED_SETS)}, or a .jsonl file")
