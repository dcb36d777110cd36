"""The embedded reasoning tasks: follow links through a table, writing each hop as chain of thought.

A problem is a table of links `- cat -> dog` (every word is the source of exactly one link) and a
start word; the answer is the word reached after `hops` links. The model writes one numbered line
per hop (`1. cat -> dog`, `2. dog -> sun`, ...) and then `Answer: WORD`. Each hop needs a look-up far back in the prompt
(the table sits well outside a 16 + 64 token window once the path is under way) and running state
(the current word and the hop count, carried in the model's own chain of thought). Distractor links are links that
the path never uses; some of them point into the path, so a guess from the recent window fails.

Two families share the table and the chain (`EmbeddedProblem.family`):

- `links` (task `embedded`): "Start at cat and follow 8 links" closes the prompt, so while the chain is
  short the hop count is still among the recent tokens; every hop is a look-up in the prompt.
- `counted` (task `embedded_count`): "Take 13 steps" opens the prompt, before the table, and the walks
  are longer (5 to 16 steps). The table is a look-up, as before, but when to stop is state: the model
  compares its own line number with a count said once, 100 to 250 tokens back, at every line, so the
  chain is right only if some head keeps that count (a copying head has nothing to copy from there).

Problems are generated deterministically from a seed; the families draw from different random streams,
so the same seed gives unrelated problems. Evaluation splits take seeds below 2**32 (`split_seed`), training
streams at or above it (`training_seed`): no training stream of any seed is an evaluation split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# Short common words that SmolLM2's tokenizer encodes as one token with a leading space.
WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "key", "car", "bus", "fox", "owl", "bee", "ant", "cow",
         "pig", "hen", "egg", "ice", "oak", "elm", "ash", "fig", "jam", "tea", "pie", "bun", "rye", "oat", "pea",
         "bean", "corn", "rice", "salt", "milk", "wine", "beer", "soup", "cake", "bread", "fish", "bird", "frog",
         "duck", "goat", "lamb", "wolf", "bear", "deer", "lion", "seal", "crab", "moth", "wasp", "rose", "lily", "fern",
         "moss", "reed", "vine", "leaf", "root", "seed", "tree", "bush", "hill", "lake", "pond", "sea", "bay", "reef",
         "rock", "sand", "clay", "mud", "dust", "snow", "rain", "hail", "wind", "fog", "mist", "star", "moon", "cloud",
         "storm", "wave", "tide", "gold", "iron", "lead", "zinc", "tin", "copper", "silk", "wool", "lace", "rope",
         "wire", "nail", "bolt", "gear", "lamp", "desk", "door", "wall", "roof", "gate", "fence", "road", "path",
         "bridge", "tower", "castle", "farm", "barn", "mill", "shop", "bank", "park", "zoo", "school", "church", "club",
         "hall", "room", "bed", "chair", "table", "shelf", "drum", "horn", "bell", "flute", "harp", "piano", "song",
         "poem", "book", "page", "note", "letter", "word", "name", "king", "queen", "duke", "lord", "knight", "judge",
         "nurse", "chef", "poet", "monk", "baker", "ship", "boat", "train", "plane", "truck", "bike", "kite", "ball",
         "doll", "game", "card", "coin", "ring", "belt", "coat", "shoe", "sock", "glove", "mask"]

LINKS, COUNTED = "links", "counted"  # the task families
EMBEDDED_TASK = "embedded"  # the links task's name in `kvrl eval --tasks`
EMBEDDED_MAX_NEW_TOKENS = 96  # an evaluation's answer limit: the chains take 49 to 52 tokens
COUNTED_TASK = "embedded_count"  # the counted task's name in `kvrl eval --tasks`
COUNTED_MAX_NEW_TOKENS = 128  # its answer limit: the chains take 33 to 106 tokens
SPLIT_SEEDS = {"validation": 10_000_000, "test": 20_000_000}  # evaluation splits: seeds BASE + index
SPLIT_SIZE = 1_000_000  # problems an evaluation split holds
SPLITS = ("train", "validation", "test")  # "train" is training stream 0
TRAIN_SEED_BASE = 2**32  # training seeds start above every evaluation seed
TRAIN_STREAM_SIZE = 2**32  # problems per training stream
INSTRUCTION = "Follow the links in the table, one hop at a time."


@dataclass(frozen=True)
class Difficulty:
    """`hops`: links to follow; `links`: table size (hops + distractors)."""

    hops: int = 8
    links: int = 32


@dataclass(frozen=True)
class EmbeddedProblem:
    seed: int
    table: tuple[tuple[str, str], ...]
    start: str
    path: tuple[str, ...]  # start, then the word after each hop
    family: str = LINKS

    @property
    def answer(self) -> str:
        return self.path[-1]

    @property
    def hops(self) -> int:
        return len(self.path) - 1

    def prompt(self) -> str:
        lines = "\n".join(f"- {src} -> {dst}" for src, dst in self.table)
        if self.family == COUNTED:
            return (f"Take {self.hops} steps through the links, one per line.\nLinks:\n{lines}\nStart at {self.start}. "
                    "Where do you end?")
        return f"{INSTRUCTION}\nLinks:\n{lines}\nStart at {self.start} and follow {self.hops} links. Where do you end?"

    def solution(self) -> str:
        """The reference chain of thought and final answer, as the model is trained to write it."""
        steps = "\n".join(f"{i + 1}. {self.path[i]} -> {self.path[i + 1]}" for i in range(self.hops))
        return f"{steps}\nAnswer: {self.answer}"


@dataclass(frozen=True)
class DifficultyRange:
    """Difficulties drawn per problem from its seed: `hops`, then `links` (at least hops + `min_distractors`),
    each uniform in its inclusive range."""

    hops: tuple[int, int]
    links: tuple[int, int]
    min_distractors: int = 4

    def draw(self, rng: random.Random) -> Difficulty:
        hops = rng.randint(*self.hops)
        return Difficulty(hops=hops, links=rng.randint(max(self.links[0], hops + self.min_distractors), self.links[1]))


# The counted family's lengths: the adapter learns 4 to 16 steps; validation and test problems span 5 to 16;
# `kvrl select --data embedded-count` trains head strategies on the shorter 5 to 9, so the longer test
# problems are lengths the heads were not chosen on.
COUNTED_ADAPTER = DifficultyRange(hops=(4, 16), links=(20, 44), min_distractors=6)
COUNTED_EVAL = DifficultyRange(hops=(5, 16), links=(20, 44), min_distractors=6)
COUNTED_SELECT = DifficultyRange(hops=(5, 9), links=(20, 32), min_distractors=6)


def make_problem(seed: int, difficulty: Difficulty = Difficulty(), family: str = LINKS) -> EmbeddedProblem:
    if not 1 <= difficulty.hops < difficulty.links <= len(WORDS) // 2:
        raise ValueError(f"need 1 <= hops < links <= {len(WORDS) // 2}, got {difficulty}")
    if family not in (LINKS, COUNTED):
        raise ValueError(f"unknown task family {family!r}; accepted: {LINKS}, {COUNTED}")
    rng = random.Random(seed) if family == LINKS else random.Random(f"{family}:{seed}")
    sources = rng.sample(WORDS, difficulty.links)
    path = sources[: difficulty.hops + 1]  # the walk visits distinct words
    others = [w for w in WORDS if w not in sources]
    targets = {path[i]: path[i + 1] for i in range(difficulty.hops)}
    for src in sources:
        if src not in targets:  # distractors: half point into the path, half elsewhere
            targets[src] = rng.choice(path[1:]) if rng.random() < 0.5 else rng.choice(others)
            if family == COUNTED and targets[src] == src:
                # The walk's last word must link elsewhere: with a link to itself, a chain that overshoots the
                # count would still end on the answer, and the count would not be needed.
                targets[src] = rng.choice(path[1:-1])
    table = [(src, targets[src]) for src in sources]
    rng.shuffle(table)
    return EmbeddedProblem(seed, tuple(table), path[0], tuple(path), family)


def split_seed(split: str, index: int) -> int:
    """Seed of problem `index` of a split: evaluation splits (validation, test) are seed ranges below 2**32,
    `train` is training stream 0."""
    if split == "train":
        return training_seed(index, 0)
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"the {split} split holds problems 0 to {SPLIT_SIZE - 1}, not {index}")
    return SPLIT_SEEDS[split] + index


def problems(split: str, count: int, difficulty: Difficulty = Difficulty(), offset: int = 0) -> list[EmbeddedProblem]:
    return [make_problem(split_seed(split, offset + i), difficulty) for i in range(count)]


def counted_problem(seed: int, ranges: DifficultyRange = COUNTED_EVAL) -> EmbeddedProblem:
    """The counted problem of `seed`, its difficulty drawn from `ranges` (from a stream of its own)."""
    return make_problem(seed, ranges.draw(random.Random(f"{COUNTED}-difficulty:{seed}")), COUNTED)


def counted_problems(split: str, count: int, ranges: DifficultyRange = COUNTED_EVAL,
                     offset: int = 0) -> list[EmbeddedProblem]:
    return [counted_problem(split_seed(split, offset + i), ranges) for i in range(count)]


def training_seed(index: int, stream: int) -> int:
    """Seed of problem `index` of training stream `stream`: at or above 2**32, so never an evaluation split's
    (those are below it), and streams never share a seed."""
    if not 0 <= index < TRAIN_STREAM_SIZE or stream < 0:
        raise ValueError(f"training problem {index} of stream {stream}: need 0 <= index < 2**32 and stream >= 0")
    return TRAIN_SEED_BASE + stream * TRAIN_STREAM_SIZE + index


def is_training_seed(seed: int) -> bool:
    return seed >= TRAIN_SEED_BASE


def mixed_problem(index: int, stream: int, hops: tuple[int, int] = (4, 10),
                  links: tuple[int, int] = (20, 40)) -> EmbeddedProblem:
    """The problem `index` of training stream `stream`, its difficulty drawn from its seed: `hops` and then
    `links` (at least hops + 4) uniform in the given inclusive ranges. Streams use disjoint seeds."""
    seed = training_seed(index, stream)
    rng = random.Random(seed)
    drawn_hops = rng.randint(*hops)
    drawn_links = rng.randint(max(links[0], drawn_hops + 4), links[1])
    return make_problem(seed, Difficulty(hops=drawn_hops, links=drawn_links))


_ANSWER = re.compile(r"answer\s*[:=]?\s*\**\s*([a-z]+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The word after the last `Answer:` (case, surrounding markup and a final period are tolerated)."""
    found = _ANSWER.findall(text)
    return found[-1].lower() if found else None


def score(text: str, problem: EmbeddedProblem) -> bool:
    """True when the final answer in `text` is the word the path ends at."""
    return extract_answer(text) == problem.answer


def accuracy_by_hops(items: list[EmbeddedProblem], solved: list[bool]) -> dict[int, tuple[float, int]]:
    """`{hops: (accuracy, problems)}` in order of hops: how accuracy falls with the chain's length."""
    counts: dict[int, list[int]] = {}
    for problem, ok in zip(items, solved, strict=True):
        counts.setdefault(problem.hops, [0, 0])
        counts[problem.hops][0] += int(ok)
        counts[problem.hops][1] += 1
    return {hops: (right / total, total) for hops, (right, total) in sorted(counts.items())}


# The evaluation tasks by name (`kvrl eval --tasks`, `kvrl embedded evaluate --task`): the links task at its
# trained difficulty and with twice the links (prompts of about 500 tokens instead of 270, long enough that
# token eviction inside the full heads saves memory beyond the 80-token compressed heads), and the counted task.
EVAL_TASKS: dict[str, Callable[[str, int], list[EmbeddedProblem]]] = {
    EMBEDDED_TASK: lambda split, count: problems(split, count),
    f"{EMBEDDED_TASK}_long": lambda split, count: problems(split, count, Difficulty(hops=8, links=64)),
    COUNTED_TASK: lambda split, count: counted_problems(split, count),
}
ANSWER_LIMITS = {EMBEDDED_TASK: EMBEDDED_MAX_NEW_TOKENS, f"{EMBEDDED_TASK}_long": EMBEDDED_MAX_NEW_TOKENS,
                 COUNTED_TASK: COUNTED_MAX_NEW_TOKENS}


def task_problems(task: str, split: str, count: int) -> list[EmbeddedProblem]:
    """The `count` first problems of an embedded evaluation task's split."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown embedded task {task!r}; accepted: {', '.join(EVAL_TASKS)}")
    return EVAL_TASKS[task](split, count)
