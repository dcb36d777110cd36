import hashlib

import pytest

from kvpress_rl.embedded.task import WORDS, Difficulty, extract_answer, make_problem, mixed_problem, problems, score


def test_generation_is_deterministic_and_splits_are_disjoint():
    assert problems("test", 5) == problems("test", 5)
    seeds = {split: {p.seed for p in problems(split, 200)} for split in ("train", "validation", "test")}
    assert not (seeds["train"] & seeds["validation"]) and not (seeds["validation"] & seeds["test"])
    assert not (seeds["train"] & seeds["test"])
    assert problems("test", 3) != problems("validation", 3)


def test_the_path_follows_the_table_and_every_word_is_the_source_of_one_link():
    problem = make_problem(7, Difficulty(hops=6, links=20))
    links = dict(problem.table)
    assert len(links) == len(problem.table) == 20
    word = problem.start
    for expected in problem.path[1:]:
        word = links[word]
        assert word == expected
    assert problem.answer == word and problem.hops == 6
    assert len(set(problem.path)) == 7  # no cycles: every hop needs a new look-up


def test_distractors_point_into_the_path_so_recency_does_not_answer():
    into_path = sum(dst in make_problem(s).path for s in range(50)
                    for src, dst in make_problem(s).table if src not in make_problem(s).path[:-1])
    assert into_path > 100


def test_difficulty_knobs_and_bad_values():
    assert len(make_problem(1, Difficulty(hops=3, links=10)).table) == 10
    with pytest.raises(ValueError):
        make_problem(1, Difficulty(hops=10, links=5))
    with pytest.raises(ValueError, match="unknown split"):
        problems("dev", 1)


def test_solution_format():
    problem = make_problem(3, Difficulty(hops=2, links=8))
    a, b, c = problem.path
    assert problem.solution() == f"1. {a} -> {b}\n2. {b} -> {c}\nAnswer: {c}"
    assert all(word in WORDS for word in problem.path)


@pytest.mark.parametrize("text,ok", [
    ("1. a -> b\nAnswer: {ans}", True),
    ("Answer: {ans}.", True),
    ("answer: {ANS}", True),
    ("**Answer:** {ans}", True),
    ("Answer: {ans}\nAnswer: zzz", False),  # the last answer counts
    ("{ans}", False),  # no final answer line
    ("Answer: {ans}x", False),
])
def test_scorer_accepts_exactly_the_right_answers(text, ok):
    problem = make_problem(11)
    assert score(text.format(ans=problem.answer, ANS=problem.answer.upper()), problem) is ok


def test_extract_answer_none_without_answer():
    assert extract_answer("no final line") is None


@pytest.mark.parametrize(("index", "stream", "seed", "hops", "links", "answer", "prompt_sha256"), [
    # training streams (seeds from 2**32 up, disjoint from every evaluation split); a change here
    # changes what `kvrl embedded train` and `kvrl select --data embedded-mixed` train on
    (0, 0, 2**32, 4, 31, "pen", "c3e228cbf172d5d9"),
    (1, 0, 2**32 + 1, 5, 36, "pond", "9fd483da9f7b2f9c"),
    (0, 1, 2 * 2**32, 4, 35, "reed", "ebb78a85054c4349"),
    (1, 1, 2 * 2**32 + 1, 8, 23, "letter", "5d874b5316af764f"),
    (2, 1, 2 * 2**32 + 2, 7, 23, "wasp", "33370474d820174a"),
    (3, 1, 2 * 2**32 + 3, 5, 38, "monk", "191f0877452696f1"),
    (4, 1, 2 * 2**32 + 4, 4, 31, "soup", "954004987b02fdb9"),
    (1, 2, 3 * 2**32 + 1, 7, 36, "path", "a934d3a0c4815f13"),
])
def test_mixed_problems_are_the_training_curriculum_draws(index, stream, seed, hops, links, answer, prompt_sha256):
    problem = mixed_problem(index, stream)
    assert (problem.seed, problem.hops, len(problem.table), problem.answer) == (seed, hops, links, answer)
    assert hashlib.sha256(problem.prompt().encode()).hexdigest()[:16] == prompt_sha256


def test_mixed_problem_difficulty_ranges():
    drawn = [mixed_problem(i, 3, hops=(2, 3), links=(5, 9)) for i in range(50)]
    assert {p.hops for p in drawn} == {2, 3}
    assert all(max(5, p.hops + 4) <= len(p.table) <= 9 for p in drawn)
