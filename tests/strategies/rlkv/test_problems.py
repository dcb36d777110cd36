import json
import re

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.strategies.rlkv.problems import load_problems, verify_embedded, verify_math


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
    assert [p.source for p in mixed] == [p.source for p in load_problems("embedded-mixed", 64, 0, None)]  # deterministic
    adapter_seeds = {curriculum_problem(i, TrainConfig()).seed for i in range(320)}
    assert not {int(p.source.split(":")[1]) for p in mixed} & adapter_seeds
    assert not {p.source for p in mixed} & {p.source for p in load_problems("embedded-mixed", 64, 1, None)}


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


@pytest.mark.parametrize("data, message", [("gsm8k", "needs --data-dir"), ("mmlu", "accepted: embedded, embedded-mixed")])
def test_unknown_or_unlocated_data_is_refused(data, message):
    with pytest.raises(KvrlError, match=message):
        load_problems(data, 5, 0, None)


def test_verifiers():
    assert verify_embedded("1. a -> b\nAnswer: b", "b") and not verify_embedded("Answer: c", "b")
    assert verify_math("\\boxed{\\frac{1}{2}}", "0.5") and not verify_math("\\boxed{3}", "2")
