import json
import random
import re

import pytest

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.strategies.rlkv import RLKV
from kvpress_rl.strategies.rlkv.problems import (
    RewardProblem,
    bin_quotas,
    check_not_eval_data,
    load_problems,
    step_batch,
    training_set,
    verify_math,
)
from tests.strategies.rlkv.helpers import options


def hops_of(problem) -> int:
    return int(re.search(r"follow (\d+) links", problem.prompt).group(1))


def test_embedded_problems_are_the_test_difficulty_and_differ_by_seed():
    first, other = load_problems("embedded", 8, 0, None), load_problems("embedded", 8, 1, None)
    assert {hops_of(p) for p in first} == {8}
    assert not {p.source for p in first} & {p.source for p in other}
    assert first[0].verify(f"1. a -> b\nAnswer: {first[0].answer}", first[0].answer)


def test_embedded_mixed_spans_the_training_difficulties_apart_from_the_adapters_own_problems():
    from kvpress_rl.embedded.train import TrainConfig, curriculum_problem

    mixed = load_problems("embedded-mixed", 64, 0, None)
    assert min(map(hops_of, mixed)) == 4 and max(map(hops_of, mixed)) == 10
    # deterministic
    assert [p.source for p in mixed] == [p.source for p in load_problems("embedded-mixed", 64, 0, None)]
    adapter_seeds = {curriculum_problem(i, TrainConfig()).seed for i in range(320)}
    assert not {int(p.source.split(":")[1]) for p in mixed} & adapter_seeds
    assert not {p.source for p in mixed} & {p.source for p in load_problems("embedded-mixed", 64, 1, None)}


def test_embedded_count_trains_on_short_counted_walks_apart_from_the_adapters_own():
    from kvpress_rl.embedded.task import COUNTED_SELECT
    from kvpress_rl.embedded.train import TrainConfig, curriculum_problem

    counted = load_problems("embedded-count", 64, 0, None)
    steps = [int(re.match(r"Take (\d+) steps", p.prompt).group(1)) for p in counted]
    assert min(steps) == COUNTED_SELECT.hops[0] and max(steps) == COUNTED_SELECT.hops[1]
    assert [p.source for p in counted] == [p.source for p in load_problems("embedded-count", 64, 0, None)]
    adapter_seeds = {curriculum_problem(i, TrainConfig()).seed for i in range(1600)}
    assert not {int(p.source.split(":")[1]) for p in counted} & adapter_seeds
    assert counted[0].verify(f"1. a -> b\nAnswer: {counted[0].answer}", counted[0].answer)


def test_gsm8k_answers_are_read_after_the_hashes(shared_data):
    problems = load_problems("gsm8k", 3, 0, str(shared_data))
    assert len(problems) == 3 and all("####" not in p.answer for p in problems)
    assert problems[0].verify(f"so the answer is \\boxed{{{problems[0].answer}}}", problems[0].answer)


def test_a_jsonl_file_needs_question_and_answer(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n\n")
    assert [p.answer for p in load_problems(str(good), 5, 0, None)] == ["2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(KvrlError, match="bad.jsonl:1: expected a JSON object"):
        load_problems(str(bad), 5, 0, None)


@pytest.mark.parametrize("data, message",
                         [("gsm8k", "needs --data-dir"),
                          ("mmlu", "accepted: embedded, embedded-mixed, embedded-count")])
def test_unknown_or_unlocated_data_is_refused(data, message):
    with pytest.raises(KvrlError, match=message):
        load_problems(data, 5, 0, None)


def test_bin_quotas_follow_the_proportions_and_pass_a_shortfall_on():
    assert bin_quotas([5000, 5000, 5000, 5000], [600, 600, 1000, 800], 3000) == [600, 600, 1000, 800]  # the paper's set
    # bin 0 has only 100: it gives all, its 500 go to the others in proportion 600:1000:800
    assert bin_quotas([100, 5000, 5000, 5000], [600, 600, 1000, 800], 3000) == [100, 725, 1208, 967]
    assert bin_quotas([63, 0, 0, 0], [600, 600, 1000, 800], 64) == [63, 0, 0, 0]  # all there is
    assert bin_quotas([3, 3, 3, 3], [1, 1, 1, 1],
                      6) == [2, 2, 1, 1] and sum(bin_quotas([7, 9, 2, 5], [3, 1, 1, 2], 17)) == 17


def test_the_training_set_is_distinct_and_stratified_by_solution_length():
    solved = [(RewardProblem(f"p{i}", "", verify_math, f"s{i}"), length) for i, length in
              enumerate([100] * 50 + [2500] * 3 + [4500] * 40 + [9000] * 40)]  # 9000: counted in the last bin
    chosen = training_set(solved, 20, (0, 2000, 4000, 6000, 8000), (600, 600, 1000, 800), random.Random(0))
    assert len(chosen) == len({p.source for p in chosen}) == 20
    lengths = dict((p.source, n) for p, n in solved)
    by_bin = [sum(1 for p in chosen if lo <= min(lengths[p.source], 7999) < hi)
              for lo, hi in ((0, 2000), (2000, 4000), (4000, 6000), (6000, 8000))]
    assert by_bin[1] == 3 and sum(by_bin) == 20 and by_bin == bin_quotas([50, 3, 40, 40], [600, 600, 1000, 800], 20)


def test_steps_take_consecutive_slices_of_a_fresh_shuffle_each_epoch():
    batches = [step_batch(7, 3, step, seed=1) for step in range(6)]  # 2 steps an epoch, 1 problem dropped each epoch
    for epoch in range(3):
        drawn = batches[2 * epoch] + batches[2 * epoch + 1]
        assert len(set(drawn)) == 6 and set(drawn) <= set(range(7))
    assert len({tuple(b) for b in batches}) > 2 and batches == [step_batch(7, 3, s, seed=1) for s in range(6)]  # seeded
    with pytest.raises(KvrlError, match="fewer than one step"):
        step_batch(2, 3, 0, seed=1)


def test_evaluation_splits_are_refused_for_training_unless_allowed():
    with pytest.raises(KvrlError, match="math500_r1.*--data FILE.jsonl.*--allow-eval-data"):
        check_not_eval_data("math500", allow=False)
    with pytest.raises(KvrlError, match="gsm8k_r1"):
        check_not_eval_data("../shared/data/gsm8k/test.jsonl", allow=False)
    check_not_eval_data("math500", allow=True)
    check_not_eval_data("gsm8k", allow=False)
    check_not_eval_data("deepscaler.jsonl", allow=False)


def test_training_on_an_evaluation_split_is_refused_unless_allowed(tiny):
    model, tokenizer = tiny
    with pytest.raises(KvrlError, match="--allow-eval-data") as error:
        RLKV(options("math500")).select(model, tokenizer, SelectionContext())
    assert "math500_r1" in str(error.value) and "--data FILE.jsonl" in str(error.value)
    with pytest.raises(KvrlError, match="needs --data-dir"):  # allowed: gets as far as loading the data
        RLKV(options("math500", allow_eval_data=True)).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="needs --data-dir"):  # gsm8k is its train split: fine
        RLKV(options("gsm8k")).select(model, tokenizer, SelectionContext())
