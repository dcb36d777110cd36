"""The cells a grid spans: the full cache once, every seed only for seeded strategies, full-head budgets only for head
strategies."""

from kvpress_rl.evaluators.grid_spec import GridSpec, grid_cells
from kvpress_rl.plugins import discover_strategies


def chosen(*names):
    found = discover_strategies()
    return [(name, found[name]) for name in names]


def test_the_grid_draws_every_seed_only_for_seeded_strategies():
    spec = GridSpec(strategies=chosen("random", "retrieval", "streaming"), sparsities=[0.5], seeds=[0, 1, 2])
    cells = [(setting.strategy, setting.seed) for setting in grid_cells(spec)]
    assert cells == [("full", 0), ("random", 0), ("random", 1), ("random", 2), ("retrieval", 0), ("streaming", 0)]


def test_full_head_budgets_are_an_axis_of_head_strategies_only():
    spec = GridSpec(strategies=chosen("retrieval", "snapkv"), sparsities=[0.6, 0.8], seeds=[0], full_policy="rkv",
                    full_budgets=["all", "0.5"])
    cells = [(setting.strategy, setting.sparsity, setting.full_heads) for setting in grid_cells(spec)]
    assert cells == [("full", 0.0, ""), ("retrieval", 0.6, ""), ("retrieval", 0.8, ""), ("retrieval", 0.6, "rkv:0.5"),
                     ("retrieval", 0.8, "rkv:0.5"), ("snapkv", 0.6, ""), ("snapkv", 0.8, "")]
