"""`kvrl report DIR`: the spread of a seeded strategy is drawn (a band from its lowest to its highest seed)
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
        # from the full cache to the last sparsity
        assert xs.min() == pytest.approx(0.0) and xs.max() == pytest.approx(0.8)
        # the line is the mean over the seeds; at x = 0 the band pinches to the full cache
        means = [80.0, 100 * statistics.mean(RANDOM_04), 100 * statistics.mean(RANDOM_08)]
        assert list(lines["random"].get_ydata()) == pytest.approx(means)
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
