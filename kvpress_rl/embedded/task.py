"""The embedded reasoning task: follow links through a table, writing each hop as chain of thought.

A problem is a table of links `- cat -> dog` (every word is the source of exactly one link) and a
start word; the answer is the word reached after `hops` links. The model writes one numbered line
per hop (`1. cat -> dog`, `2. dog -> sun`, ...) and then `Answer: WORD`. Each hop needs a look-up far back in the prompt
(the table sits well outside a 16 + 64 token window once the path is under way) and running state
(the current word and the hop count, carried in the model's own chain of thought). Distractor links are links that
the path never uses; some of them point into the path, so a guess from the recent window fails.

Problems are generated deterministically from a seed; the splits use disjoint seed ranges.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Short common words that SmolLM2's tokenizer encodes as one token with a leading space.
WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "key", "car", "bus", "fox", "owl", "bee", "ant", "cow", "pig", "hen", "egg", "ice", "oak", "elm", "ash", "fig", "jam", "tea", "pie", "bun", "rye", "oat", "pea", "bean", "corn", "rice", "salt", "milk", "wine", "beer", "soup", "cake", "bread", "fish", "bird", "frog", "duck", "goat", "lamb", "wolf", "bear", "deer", "lion", "seal", "crab", "moth", "wasp", "rose", "lily", "fern", "moss", "reed", "vine", "leaf", "root", "seed", "tree", "bush", "hill", "lake", "pond", "sea", "bay", "reef", "rock", "sand", "clay", "mud", "dust", "snow", "rain", "hail", "wind", "fog", "mist", "star", "moon", "cloud", "storm", "wave", "tide", "gold", "iron", "lead", "zinc", "tin", "copper", "silk", "wool", "lace", "rope", "wire", "nail", "bolt", "gear", "lamp", "desk", "door", "wall", "roof", "gate", "fence", "road", "path", "bridge", "tower", "castle", "farm", "barn", "mill", "shop", "bank", "park", "zoo", "school", "church", "club", "hall", "room", "bed", "chair", "table", "shelf", "drum", "horn", "bell", "flute", "harp", "piano", "song", "poem", "book", "page", "note", "letter", "word", "name", "king", "queen", "duke", "lord", "knight", "judge", "nurse", "chef", "poet", "monk", "baker", "ship", "boat", "train", "plane", "truck", "bike", "kite", "ball", "doll", "game", "card", "coin", "ring", "belt", "coat", "shoe", "sock", "glove", "mask"]

EMBEDDED_TASK = "embedded"  # the task's name in `kvrl eval --tasks`
EMBEDDED_MAX_NEW_TOKENS = 96  # an evaluation's answer limit: the chains take 49 to 52 tokens
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
INSTRUCTION = "Follow the links in the table, one hop at a time."


@dataclass(frozen=True)
class Difficulty:
    """`hops`: links to follow; `links`: table size (hops + distractors)."""

    hops: int = 8
    links: int = 32


@dataclass(frozen=True)
class Problem:
    seed: int
    table: tuple[tuple[str, str], ...]
    start: str
    path: tuple[str, ...]  # start, then the word after each hop

    @property
    def answer(self) -> str:
        return self.path[-1]

    @property
    def hops(self) -> int:
        return len(self.path) - 1

    def prompt(self) -> str:
        lines = "\n".join(f"- {src} -> {dst}" for src, dst in self.table)
        return f"{INSTRUCTION}\nLinks:\n{lines}\nStart at {self.start} and follow {self.hops} links. Where do you end?"

    def solution(self) -> str:
        """The reference chain of thought and final answer, as the model is trained to write it."""
        steps = "\n".join(f"{i + 1}. {self.path[i]} -> {self.path[i + 1]}" for i in range(self.hops))
        return f"{steps}\nAnswer: {self.answer}"


def make_problem(seed: int, difficulty: Difficulty = Difficulty()) -> Problem:
    if not 1 <= difficulty.hops < difficulty.links <= len(WORDS) // 2:
        raise ValueError(f"need 1 <= hops < links <= {len(WORDS) // 2}, got {difficulty}")
    rng = random.Random(seed)
    sources = rng.sample(WORDS, difficulty.links)
    path = sources[: difficulty.hops + 1]  # the walk visits distinct words
    others = [w for w in WORDS if w not in sources]
    targets = {path[i]: path[i + 1] for i in range(difficulty.hops)}
    for src in sources:
        if src not in targets:  # distractors: half point into the path, half elsewhere
            targets[src] = rng.choice(path[1:]) if rng.random() < 0.5 else rng.choice(others)
    table = [(src, targets[src]) for src in sources]
    rng.shuffle(table)
    return Problem(seed, tuple(table), path[0], tuple(path))


def problems(split: str, count: int, difficulty: Difficulty = Difficulty(), offset: int = 0) -> list[Problem]:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLIT_SEEDS)}")
    base = SPLIT_SEEDS[split] + offset
    return [make_problem(base + i, difficulty) for i in range(count)]


def mixed_problem(index: int, stream: int, hops: tuple[int, int] = (4, 10), links: tuple[int, int] = (20, 40)) -> Problem:
    """Problem `index` of training stream `stream`, its difficulty drawn from its seed: `hops` and then
    `links` (at least hops + 4) uniform in the given inclusive ranges. Streams use disjoint seeds."""
    seed = SPLIT_SEEDS["train"] + stream * 1_000_000 + index
    rng = random.Random(seed)
    drawn_hops = rng.randint(*hops)
    drawn_links = rng.randint(max(links[0], drawn_hops + 4), links[1])
    return make_problem(seed, Difficulty(hops=drawn_hops, links=drawn_links))


_ANSWER = re.compile(r"answer\s*[:=]?\s*\**\s*([a-z]+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The word after the last `Answer:` (case, surrounding markup and a final period are tolerated)."""
    found = _ANSWER.findall(text)
    return found[-1].lower() if found else None


def score(text: str, problem: Problem) -> bool:
    """True when the final answer in `text` is the word the path ends at."""
    return extract_answer(text) == problem.answer
