"""`kvrl report DIR --frontier`: accuracy against measured KV memory, the points no other point beats marked."""

from kvpress_rl.evaluators.cells import Cell, write_grid
from kvpress_rl.evaluators.frontier import frontier_points, write_frontier


def point(strategy, sparsity, accuracy, memory, full_heads=""):
    return Cell(task="embedded", strategy=strategy, sparsity=sparsity, seed=0, accuracy=accuracy,
                correct=int(accuracy * 100), total=100, kv_fraction=memory, decode_tokens_per_s=50.0,
                full_heads=full_heads, kv_measured=memory)


def test_the_frontier_marks_the_points_no_other_beats(tmp_path):
    cells = [point("full", 0.0, 0.98, 1.0), point("rlkv", 0.6, 0.98, 0.42), point("rlkv", 0.8, 0.97, 0.30),
             point("snapkv", 0.8, 0.60, 0.35), point("rlkv", 0.8, 0.95, 0.20, "rkv:0.25")]
    front = {(p.family, p.sparsity) for p in frontier_points(cells) if p.pareto}
    # snapkv at 0.8 uses more memory than rlkv at 0.8 for less accuracy; full is beaten by rlkv 0.6 (same
    # accuracy, less memory)
    assert front == {("rlkv", 0.6), ("rlkv", 0.8), ("rlkv+rkv:0.25", 0.8)}
    write_grid(tmp_path / "grid.csv", cells)
    png, markdown = write_frontier(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| embedded | rlkv+rkv:0.25 | 0.8 | 20.0 | 95.0 | yes |" in markdown.read_text()
