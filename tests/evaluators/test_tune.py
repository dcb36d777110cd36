"""The choice rules of `kvrl tune`: the paired bound, safe and largest sparsities, refinement, the validation split."""

import json
import random
from pathlib import Path

import pytest

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.cells import Cell, cell_samples, write_grid
from kvpress_rl.evaluators.paired import PairedCounts, drop_upper_bound, paired_counts
from kvpress_rl.evaluators.tasks import resolve_task
from kvpress_rl.evaluators.tune import Choice, LadderPoint, choose, coarse_ladder, ideal_gain, refinements


def simulated_coverage(both: float, only_full: float, only_compressed: float, n: int, trials: int = 1500) -> float:
    rng = random.Random(0)
    truth = only_full - only_compressed
    covered = 0
    for _ in range(trials):
        counts = [0, 0, 0, 0]
        for _ in range(n):
            u = rng.random()
            kind = 0 if u < both else 1 if u < both + only_full else 2 if u < both + only_full + only_compressed else 3
            counts[kind] += 1
        covered += drop_upper_bound(PairedCounts(*counts), 0.95) >= truth
    return covered / trials


@pytest.mark.parametrize("both, only_full, only_compressed, n", [(0.6, 0.15, 0.05, 100), (0.8, 0.1, 0.02, 200)])
def test_the_paired_bound_covers_the_true_drop_at_its_confidence(both, only_full, only_compressed, n):
    assert 0.93 <= simulated_coverage(both, only_full, only_compressed, n) <= 0.985


def test_the_bound_is_above_the_observed_drop_and_not_zero_when_nothing_changes():
    unchanged = PairedCounts(50, 0, 0, 0)
    # 50 problems cannot prove a drop below 2 points
    assert unchanged.drop == 0 and 0.03 < drop_upper_bound(unchanged) < 0.08
    assert drop_upper_bound(PairedCounts(500, 0, 0, 0)) < 0.01
    counts = PairedCounts(40, 6, 1, 3)
    assert counts.drop == pytest.approx(0.1) and drop_upper_bound(counts, 0.95) > 0.1
    assert drop_upper_bound(counts, 0.99) > drop_upper_bound(counts, 0.9)


def test_paired_counts_average_seeds_and_refuse_other_problems():
    full = {0: True, 1: True, 2: False, 3: True}
    counts = paired_counts(full, [{0: True, 1: False, 2: True, 3: True}, {0: True, 1: True, 2: False, 3: False}])
    assert (counts.both, counts.only_full, counts.only_compressed, counts.neither) == (2.0, 1.0, 0.5, 0.5)
    with pytest.raises(KvrlError, match="different problems"):
        paired_counts(full, [{0: True}])


def ladder(*holding: tuple[float, bool, bool]) -> Choice:
    points = [LadderPoint(s, 0.9, 0.0, 0.0, holds, bound) for s, holds, bound in holding]
    return Choice("t", "rlkv", 1.0, 500, points, 2.0, 0.95)  # enough problems for the bound to hold


def test_a_monotonic_ladder_is_chosen_at_its_last_confident_setting():
    choice = ladder((0.2, True, True), (0.4, True, True), (0.6, True, False), (0.8, False, False))
    assert choice.monotonic
    assert (choice.largest("observed"), choice.safe("observed")) == (0.6, 0.6)
    assert (choice.largest("bound"), choice.chosen) == (0.4, 0.4)


def test_a_non_monotonic_ladder_is_flagged_and_chosen_below_its_first_failure():
    # as on the embedded long links: fails at 0.6, holds again at 0.8
    choice = ladder((0.2, True, True), (0.4, True, True), (0.6, False, False), (0.8, True, True))
    assert not choice.monotonic
    assert choice.largest("observed") == 0.8 and choice.largest("bound") == 0.8
    assert choice.safe("observed") == 0.4 and choice.chosen == 0.4


def test_nothing_holding_chooses_the_full_cache():
    assert ladder((0.1, False, False), (0.2, True, True)).chosen == 0.0


def test_refinement_halves_the_gap_where_each_rule_stops_holding():
    choice = ladder((0.1, True, True), (0.2, True, True), (0.3, True, False), (0.4, False, False))
    assert refinements(choice, 0.025) == [0.25, 0.35]
    refined = ladder((0.1, True, True), (0.2, True, True), (0.25, True, True), (0.275, True, False), (0.3, True, False),
                     (0.35, True, True), (0.375, False, False), (0.4, False, False))
    assert refinements(refined, 0.025) == []  # both gaps are at the resolution
    assert refinements(ladder((0.1, True, True), (0.2, True, True)), 0.025) == []  # nothing failed: nothing to refine
    few = Choice("t", "rlkv", 1.0, 50, choice.points, 2.0, 0.95)  # 50 problems: no bound is below 5 points
    assert refinements(few, 0.025) == [0.35]
    assert coarse_ladder(0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert coarse_ladder(0.25) == [0.25, 0.5, 0.75]


def write_cells(folder: Path, outcomes: dict[tuple[str, float, int], list[bool]]) -> list[Cell]:
    cells = []
    for (strategy, sparsity, seed), solved in outcomes.items():
        cell = Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=seed,
                    accuracy=sum(solved) / len(solved), correct=sum(solved), total=len(solved), kv_fraction=1.0,
                    decode_tokens_per_s=1.0)
        path = cell_samples(folder, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"doc_id": i, "classification": "correct" if ok else "incorrect"}) + "\n"
                                for i, ok in enumerate(solved)))
        cells.append(cell)
    write_grid(folder / "grid.csv", cells)
    return cells


def test_choose_pairs_each_setting_with_the_full_cache_on_the_same_problems(tmp_path):
    n = 200
    full = [True] * n
    cells = write_cells(tmp_path, {
        ("full", 0.0, 0): full,
        ("rlkv", 0.2, 0): full,
        ("rlkv", 0.4, 0): [i >= 2 for i in range(n)],  # 1 point lower
        ("rlkv", 0.6, 0): [i >= 20 for i in range(n)],  # 10 points lower
        ("rlkv", 0.8, 0): [i >= 1 for i in range(n)],  # 0.5 points lower: holds again
    })
    choice = choose(tmp_path, cells, "embedded", "rlkv", margin=2.0)
    assert [p.sparsity for p in choice.points] == [0.2, 0.4, 0.6, 0.8]
    assert [round(100 * p.drop, 1) for p in choice.points] == [0.0, 1.0, 10.0, 0.5]
    assert [p.holds for p in choice.points] == [True, True, False, True]
    assert not choice.monotonic and choice.largest("observed") == 0.8 and choice.safe("observed") == 0.4
    assert choice.chosen <= choice.safe("observed")
    wider = choose(tmp_path, cells, "embedded", "rlkv", margin=12.0)
    assert wider.monotonic and wider.safe("observed") == 0.8


def test_the_ideal_gain_of_a_plan():
    assert ideal_gain(0.5, 1600) == pytest.approx(1 / (0.5 + 0.5 * 80 / 1600))
    assert ideal_gain(0.0, 100) == 1.0 and ideal_gain(0.9, 50) == 1.0  # shorter than what a compressed head keeps


def test_the_validation_split_is_other_problems_and_only_where_a_task_has_one(shared_data):
    test = resolve_task("embedded_count", None).spec["custom_dataset"]()["test"]
    validation = resolve_task("embedded_count", None, split="validation").spec["custom_dataset"]()["test"]
    assert len(validation) == len(test) and not set(validation["seed"]) & set(test["seed"])
    with pytest.raises(KvrlError, match="no validation split"):
        resolve_task("aime24_r1", shared_data, split="validation")
    with pytest.raises(KvrlError, match="unknown split"):
        resolve_task("embedded", None, split="train")
    gsm8k = resolve_task("gsm8k_r1", shared_data, split="validation").spec
    assert gsm8k["dataset_kwargs"]["data_files"]["test"].endswith("gsm8k/train.jsonl")
