"""`kvrl report`: the spread of a seeded strategy is drawn (a band from its lowest to its highest seed)
and written (`mean ± std (n seeds)`), a single-seed strategy is drawn as a plain line."""

import statistics

import pytest
from matplotlib.collections import PolyCollection

from kvpress_rl.evaluators.cells import Cell, summarize, write_grid
from kvpress_rl.evaluators.report import SEED_BAND_CAPTION, accuracy_figure, markdown_table, write_report

RANDOM_04 = [0.0, 0.2, 0.9]  # three seeds of `random` at sparsity 0.4: mean 36.7, a wide spread
RANDOM_08 = [0.1, 0.1, 0.4]


def cell(strategy, sparsity, seed, accuracy):
    return Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=seed, accuracy=accuracy,
                correct=round(accuracy * 30), total=30, kv_fraction=1 - sparsity / 2, decode_tokens_per_s=50.0)


def seeded_grid():
    return [cell("full", 0.0, 0, 0.8),
            *(cell("random", 0.4, seed, a) for seed, a in enumerate(RANDOM_04)),
            *(cell("random", 0.8, seed, a) for seed, a in enumerate(RANDOM_08)),
            cell("streaming", 0.4, 0, 0.5), cell("streaming", 0.8, 0, 0.3)]


def bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_a_seeded_strategy_is_drawn_with_a_band_from_its_lowest_to_its_highest_seed():
    import matplotlib.pyplot as plt

    fig = accuracy_figure(seeded_grid())
    try:
        (ax,) = [ax for ax in fig.axes if ax.get_title() == "embedded"]
        (band,) = bands(ax)  # random only: streaming ran one seed
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert band.get_label() == "random: lowest to highest of 3 seeds"
        assert band.get_facecolor()[0][:3] == pytest.approx(plt.matplotlib.colors.to_rgb(lines["random"].get_color()))
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(90.0)  # 100 x the lowest and highest seed
        xs = band.get_paths()[0].vertices[:, 0]
        assert xs.min() == pytest.approx(0.0) and xs.max() == pytest.approx(0.8)  # from the full cache to the last sparsity
        # the line is the mean over the seeds; at x = 0 the band pinches to the full cache
        assert list(lines["random"].get_ydata()) == pytest.approx([80.0, 100 * statistics.mean(RANDOM_04), 100 * statistics.mean(RANDOM_08)])
        assert ys[xs == 0.0] == pytest.approx(80.0)
        assert "random: lowest to highest of 3 seeds" in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)


def test_single_seed_strategies_have_no_band():
    import matplotlib.pyplot as plt

    fig = accuracy_figure([cell("full", 0.0, 0, 0.8), cell("streaming", 0.4, 0, 0.5), cell("random", 0.4, 0, 0.3)])
    try:
        assert bands(fig.axes[0]) == []
    finally:
        plt.close(fig)


def test_the_markdown_gives_mean_std_and_the_number_of_seeds():
    table = markdown_table(summarize(seeded_grid()))
    mean, std = 100 * statistics.mean(RANDOM_04), 100 * statistics.stdev(RANDOM_04)
    assert f"| embedded | random | 0.4 | 3 | {mean:.1f} ± {std:.1f} (3 seeds) |" in table
    assert "| 36.7 ± 47.3 (3 seeds) |" in table
    assert "| embedded | streaming | 0.4 | 1 | 50.0 |" in table  # one seed: no spread


def test_write_report_draws_the_band_and_explains_it(tmp_path):
    write_grid(tmp_path / "grid.csv", seeded_grid())
    png, markdown = write_report(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert SEED_BAND_CAPTION in text and "36.7 ± 47.3 (3 seeds)" in text
    write_grid(tmp_path / "grid.csv", [cell("full", 0.0, 0, 0.8), cell("streaming", 0.4, 0, 0.5)])
    assert SEED_BAND_CAPTION not in write_report(tmp_path)[1].read_text()  # no seeded strategy, no caption


def test_the_frontier_marks_the_points_no_other_beats(tmp_path):
    from kvpress_rl.evaluators.report import frontier_points, write_frontier

    def point(strategy, sparsity, accuracy, memory, full_heads=""):
        return Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=0, accuracy=accuracy,
                    correct=int(accuracy * 100), total=100, kv_fraction=memory, decode_tokens_per_s=50.0,
                    full_heads=full_heads, kv_measured=memory)

    cells = [point("full", 0.0, 0.98, 1.0), point("rlkv", 0.6, 0.98, 0.42), point("rlkv", 0.8, 0.97, 0.30),
             point("snapkv", 0.8, 0.60, 0.35), point("rlkv", 0.8, 0.95, 0.20, "rkv:0.25")]
    front = {(p.family, p.sparsity) for p in frontier_points(cells) if p.pareto}
    # snapkv at 0.8 uses more memory than rlkv at 0.8 for less accuracy; full is beaten by rlkv 0.6 (same accuracy, less memory)
    assert front == {("rlkv", 0.6), ("rlkv", 0.8), ("rlkv+rkv:0.25", 0.8)}
    write_grid(tmp_path / "grid.csv", cells)
    png, markdown = write_frontier(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| embedded | rlkv+rkv:0.25 | 0.8 | 20.0 | 95.0 | yes |" in markdown.read_text()


def test_accuracy_by_a_document_field_pools_seeds_and_names_what_is_missing(tmp_path):
    import json

    from kvpress_rl import KvrlError
    from kvpress_rl.evaluators.report import accuracy_by, cell_samples, write_breakdown

    cells = [cell("full", 0.0, 0, 0.75), cell("random", 0.6, 0, 0.25), cell("random", 0.6, 1, 0.5)]
    write_grid(tmp_path / "grid.csv", cells)
    solved = {("full", 0): [1, 1, 1, 0], ("random", 0): [1, 0, 0, 0], ("random", 1): [1, 1, 0, 0]}
    hops = [5, 5, 12, 12]
    for c in cells:
        path = cell_samples(tmp_path, c)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"doc_id": i, "doc": {"hops": h}, "acc": float(ok)}) + "\n"
                                for i, (h, ok) in enumerate(zip(hops, solved[(c.strategy, c.seed)]))))
    table = accuracy_by(tmp_path, "hops")
    assert table[("embedded", "full", 0.0)] == {5: (2, 2), 12: (1, 2)}
    assert table[("embedded", "random", 0.6)] == {5: (3, 4), 12: (0, 4)}  # two seeds pooled
    png, markdown = write_breakdown(tmp_path, "hops")
    assert png.stat().st_size > 0 and "| embedded | random | 0.6 | 75 | 0 |" in markdown.read_text()
    with pytest.raises(KvrlError, match="no field 'links'.*its fields: hops"):
        accuracy_by(tmp_path, "links")
    cell_samples(tmp_path, cells[1]).unlink()
    with pytest.raises(KvrlError, match="samples of cell random at 0.6 \\(seed 0\\) are missing"):
        accuracy_by(tmp_path, "hops")
