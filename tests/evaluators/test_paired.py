"""The exact sign test of two cells on the same problems (`kvrl report paired`): the discordant problems, their
two-sided p, and cells run on other problems refused unless compared on the problems both ran."""

import json

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.paired import (
    compare_cells,
    p_value_text,
    sample_solved,
    sign_test_line,
    sign_test_p,
    solved_problems,
)


def outcomes(solved: list[int]) -> dict[int, bool]:
    return {i: bool(ok) for i, ok in enumerate(solved)}


def test_the_sign_test_counts_the_discordant_problems_and_their_exact_p():
    test = compare_cells(outcomes([1] * 10 + [0] * 2), outcomes([0] * 10 + [1] * 2))
    assert (test.problems, test.first_solved, test.second_solved) == (12, 10, 2)
    assert (test.only_first, test.only_second) == (10, 2)
    assert test.p == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert sign_test_line("a", "b", test) == ("12 problems: a 10, b 2; only the first 10, only the second 2; "
                                              "exact two-sided p = 0.039")
    assert sign_test_p(0, 0) == 1.0  # no discordant problem: nothing tells the cells apart
    assert sign_test_p(3, 3) == 1.0


def test_cells_on_different_problems_are_compared_on_the_common_ones_only_when_asked():
    long, short = outcomes([1, 1, 1, 1, 0, 0]), outcomes([0, 0, 1])
    with pytest.raises(KvrlError, match="--common"):
        compare_cells(long, short)
    test = compare_cells(long, short, common=True)
    assert (test.problems, test.only_first, test.only_second) == (3, 2, 0)
    with pytest.raises(KvrlError, match="different problems"):
        compare_cells({}, {}, common=True)


def test_a_tiny_p_is_written_as_a_bound():
    assert p_value_text(compare_cells(outcomes([1] * 30), outcomes([0] * 30)).p) == "p < 0.001"
    assert p_value_text(0.5) == "p = 0.500"


def test_a_sample_is_solved_by_its_tasks_metric(tmp_path):
    assert sample_solved({"doc_id": 0, "acc": 1.0}) and not sample_solved({"doc_id": 0, "exact_match": 0.0})
    assert sample_solved({"doc_id": 0, "pass_at_1": 1})
    with pytest.raises(KvrlError, match="none of the scores acc, exact_match, pass_at_1; its keys: doc_id"):
        sample_solved({"doc_id": 0})
    path = tmp_path / "cell.jsonl"
    path.write_text("".join(json.dumps({"doc_id": i, "acc": float(ok)}) + "\n" for i, ok in enumerate([1, 0])))
    assert solved_problems(path) == {0: True, 1: False}
    with pytest.raises(KvrlError, match="no samples file"):
        solved_problems(tmp_path / "missing.jsonl")
