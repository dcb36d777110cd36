"""The counted family: the step count opens the prompt, far from where the chain needs it."""

import pytest

from kvpress_rl.embedded.task import (
    COUNTED,
    COUNTED_ADAPTER,
    COUNTED_EVAL,
    COUNTED_SELECT,
    COUNTED_TASK,
    EVAL_TASKS,
    LINKS,
    DifficultyRange,
    accuracy_by_hops,
    counted_problem,
    counted_problems,
    make_problem,
    task_problems,
)


def test_generation_is_deterministic_with_disjoint_splits_and_its_own_stream():
    assert counted_problems("test", 5) == counted_problems("test", 5)
    seeds = {split: {p.seed for p in counted_problems(split, 300)} for split in ("train", "validation", "test")}
    assert not (seeds["train"] & seeds["validation"] or seeds["validation"] & seeds["test"]
                or seeds["train"] & seeds["test"])
    counted, links = counted_problem(5), make_problem(5)
    assert counted.family == COUNTED and links.family == LINKS
    assert counted.table != links.table  # the same seed, an unrelated problem


def test_the_count_opens_the_prompt_and_the_table_follows_it():
    problem = counted_problems("validation", 1)[0]
    prompt = problem.prompt()
    first_line, rest = prompt.split("\n", 1)
    assert first_line == f"Take {problem.hops} steps through the links, one per line."
    assert str(problem.hops) not in rest.replace(problem.start, "")  # said once, before the table
    assert rest.index("Links:") < rest.index(f"Start at {problem.start}.")
    assert problem.solution().splitlines()[-2].startswith(f"{problem.hops}. ")


def test_the_walk_can_go_on_so_only_the_count_says_when_to_stop():
    for problem in counted_problems("test", 50):
        assert problem.answer in dict(problem.table)  # the last word has a link of its own


def test_eval_lengths_span_the_selection_lengths_and_beyond():
    drawn = counted_problems("test", 500)
    assert {p.hops for p in drawn} == set(range(COUNTED_EVAL.hops[0], COUNTED_EVAL.hops[1] + 1))
    assert all(p.hops + COUNTED_EVAL.min_distractors <= len(p.table) <= COUNTED_EVAL.links[1] for p in drawn)
    assert COUNTED_SELECT.hops[1] < COUNTED_EVAL.hops[1] <= COUNTED_ADAPTER.hops[1]
    train = counted_problems("train", 200, COUNTED_SELECT)
    assert max(p.hops for p in train) == COUNTED_SELECT.hops[1]


def test_prompts_and_chains_stay_within_the_cpu_limits():
    # under 600 prompt tokens and 200 chain tokens: words are one token, so count words and symbols generously
    for problem in counted_problems("test", 500):
        assert len(problem.prompt().split()) * 2 < 600
        assert len(problem.solution().split()) * 2 < 200


def test_difficulty_range_rejects_nothing_silently():
    with pytest.raises(ValueError, match="unknown task family"):
        make_problem(1, family="sums")
    with pytest.raises(ValueError, match="unknown split"):
        counted_problems("dev", 1)
    with pytest.raises(ValueError, match="unknown embedded task"):
        task_problems("embedded_counted", "test", 1)
    narrow = DifficultyRange(hops=(3, 3), links=(5, 5), min_distractors=2)
    assert {len(counted_problem(s, narrow).table) for s in range(10)} == {5}


def test_tasks_by_name_and_accuracy_by_length():
    assert set(EVAL_TASKS) >= {"embedded", "embedded_long", COUNTED_TASK}
    items = task_problems(COUNTED_TASK, "test", 40)
    by_hops = accuracy_by_hops(items, [p.hops <= 8 for p in items])
    assert list(by_hops) == sorted(by_hops)
    assert all(acc == (1.0 if hops <= 8 else 0.0) for hops, (acc, _) in by_hops.items())
    assert sum(n for _, n in by_hops.values()) == 40
