"""No training stream of any seed is test or validation data, and the counted task
needs its count (no walk's last word links to itself)."""

import random

import pytest

from kvpress_rl.embedded.task import (
    COUNTED,
    COUNTED_ADAPTER,
    COUNTED_SELECT,
    EVAL_TASKS,
    SPLIT_SIZE,
    counted_problem,
    is_training_seed,
    split_seed,
    training_seed,
)
from kvpress_rl.embedded.train import TrainConfig, curriculum_problem
from kvpress_rl.strategies.rlkv.problems import load_problems

EVAL_COUNT = 500  # the test and validation problems that results are reported on
SEEDS = sorted({0, 1, 9, 10, 19, 20, 99, 100, 199, 200, 201, 2**31, 2**32 - 2, 2**32 - 1,
                *random.Random(24).sample(range(2**32), 40)})
EMBEDDED_SETS = ("embedded", "embedded-mixed", "embedded-count")


@pytest.fixture(scope="module")
def eval_prompts() -> set[str]:
    return {p.prompt() for draw in EVAL_TASKS.values() for split in ("validation", "test")
            for p in draw(split, EVAL_COUNT)}


@pytest.mark.parametrize("data", EMBEDDED_SETS)
def test_no_selection_seed_trains_on_evaluation_problems(data, eval_prompts):
    for seed in SEEDS:
        drawn = load_problems(data, 20, seed, None)
        seeds = [int(p.source.rsplit(":", 1)[1]) for p in drawn]
        assert all(is_training_seed(s) for s in seeds), (data, seed)
        leaked = [p.source for p in drawn if p.prompt in eval_prompts]
        assert not leaked, f"kvrl select --data {data} --seed {seed} trains on evaluation problems {leaked[:3]}"


def test_no_adapter_seed_trains_on_evaluation_problems(eval_prompts):
    for seed in SEEDS:
        drawn = [curriculum_problem(i, TrainConfig(seed=seed)) for i in range(20)]
        assert all(is_training_seed(p.seed) for p in drawn)
        leaked = [p.seed for p in drawn if p.prompt() in eval_prompts]
        assert not leaked, f"kvrl embedded train --seed {seed} trains on evaluation problems"


def test_training_and_evaluation_seeds_are_disjoint_by_construction():
    highest_eval = max(split_seed(split, SPLIT_SIZE - 1) for split in ("validation", "test"))
    assert highest_eval < training_seed(0, 0)
    for stream in (0, 1, 2**32, 2**32 + 1):
        assert training_seed(2**32 - 1, stream) < training_seed(0, stream + 1)  # streams never share a seed
    with pytest.raises(ValueError, match="holds problems 0 to"):
        split_seed("test", SPLIT_SIZE)
    with pytest.raises(ValueError, match="need 0 <= index < 2\\*\\*32"):
        training_seed(2**32, 0)


def fixed_point_at_answer(problem) -> bool:
    return dict(problem.table).get(problem.answer) == problem.answer


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_no_counted_problem_links_its_answer_to_itself(split):
    drawn = EVAL_TASKS["embedded_count"](split, 3000)
    assert not [p.seed for p in drawn if fixed_point_at_answer(p)]


@pytest.mark.parametrize("ranges", [COUNTED_SELECT, COUNTED_ADAPTER])
def test_no_counted_training_problem_links_its_answer_to_itself(ranges):
    drawn = [counted_problem(training_seed(i, stream), ranges) for stream in (0, 1, 2, 201) for i in range(1000)]
    assert all(p.family == COUNTED for p in drawn)
    assert not [p.seed for p in drawn if fixed_point_at_answer(p)]
