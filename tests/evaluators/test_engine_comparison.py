"""Two engines' `kvrl eval` outputs of one grid, cell by cell (`kvrl report engines`): accuracy in each, identical
answers, and where differing answers part."""

import json

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.engine_comparison import agreement_table, compare_engines, first_difference


def grid_output(folder, cells: dict[tuple[str, str], list[tuple[str, bool]]]):
    """A `kvrl eval` output's classified samples: `{(task, cell): [(answer, correct), ...]}`."""
    for (task, cell), answers in cells.items():
        path = folder / "samples" / task / f"{cell}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"doc_id": i, "filtered_resps": [answer],
                                            "classification": "correct" if ok else "incorrect"}) + "\n"
                                for i, (answer, ok) in enumerate(answers)))
    return folder


def test_cells_both_engines_ran_are_paired_answer_by_answer(tmp_path):
    first = grid_output(tmp_path / "transformers", {
        ("embedded_count", "rlkv-s0.6-seed0"): [("7", True), ("12", True), ("3", False), ("9", True)],
        ("embedded_count", "full-s0-seed0"): [("7", True)],
    })
    second = grid_output(tmp_path / "vllm", {
        ("embedded_count", "rlkv-s0.6-seed0"): [("7", True), ("13", False), ("3", False)],
        ("embedded_count", "only-here"): [("1", True)],
    })
    (row,) = compare_engines(first, second)  # the cells both ran, on the problems both ran
    assert (row.task, row.cell, row.identical, row.problems) == ("embedded_count", "rlkv-s0.6-seed0", 2, 3)
    assert row.first_accuracy == pytest.approx(200 / 3) and row.second_accuracy == pytest.approx(100 / 3)
    assert row.differing == ("1 (char 1)",)
    table = agreement_table("transformers", "vllm", [row]).splitlines()
    assert table[0] == ("| task | cell | accuracy transformers | accuracy vllm | identical answers | "
                        "differing problems |")
    assert table[2] == "| embedded_count | rlkv-s0.6-seed0 | 66.7 | 33.3 | 2 / 3 | 1 (char 1) |"


def test_the_first_difference_of_two_answers():
    assert first_difference("abc", "abd") == 2
    assert first_difference("ab", "abc") == 2  # one starts the other: where the shorter ends
    assert first_difference("", "x") == 0


def test_outputs_without_samples_or_a_shared_cell_are_refused(tmp_path):
    first = grid_output(tmp_path / "a", {("t", "x"): [("1", True)]})
    with pytest.raises(KvrlError, match="no samples in"):
        compare_engines(first, tmp_path / "empty")
    second = grid_output(tmp_path / "b", {("t", "y"): [("1", True)]})
    with pytest.raises(KvrlError, match="share no cell"):
        compare_engines(first, second)
