"""What an evaluation grid evaluates (`GridSpec`) and the cells it spans: task x strategy x sparsity (x seed, x the
full heads' budget of a hybrid plan), the full cache once per task."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpress_rl.embedded.task import EMBEDDED_TASK
from kvpress_rl.evaluators.cells import FULL
from kvpress_rl.plugins import StrategyEntry


@dataclass(kw_only=True)
class GridSpec:
    strategies: list[tuple[str, StrategyEntry]]
    sparsities: list[float]
    seeds: list[int]
    limit: int | None = 100
    batch_size: int = 16
    max_new_tokens: int | None = None  # overrides the task's own limit (max_gen_toks)
    heads: dict[str, str] = field(default_factory=dict)  # strategy name -> scores file
    tasks: list[str] = field(default_factory=lambda: [EMBEDDED_TASK])
    data_dir: str | None = None
    compressed_policy: str = "streaming"  # token policy of the compressed heads of head strategies (hybrid plans)
    plan_rule: str = "official"  # how head strategies turn scores into a plan (`kvpress_rl.plan.PLAN_RULES`)
    allow_code_execution: bool = False
    # the user's flag, over each task's preference; None: the task's, else the tokenizer's
    chat_template: bool | None = None
    # prompt tokens fed one at a time before generating; None: each task's default
    decoding_simulation: int | None = None
    # the model as the user named it (the --model value, a path resolved), recorded in every cell
    model: str = "embedded"
    weights: str = ""  # what identifies its weights (`kvpress_rl.identity.weights_identity`), recorded in every cell
    dtype: str = "float32"  # the dtype the model runs in (resolved from `auto`)
    full_policy: str | None = None  # a hybrid plan: token policy of the full heads of head strategies
    # what they keep, one grid axis ("all": everything, "0.5", "512")
    full_budgets: list[str] = field(default_factory=list)
    engine: str = "transformers"  # what generates: the executor in this process, or "vllm" (kvpress_rl.engines.vllm)
    split: str = "test"  # the tasks' problems: test, or validation (`kvrl tune` chooses there)


@dataclass(frozen=True, kw_only=True)
class CellSetting:
    """What one cell of a task runs under: a strategy at a sparsity and seed (and a full-head budget), or the full
    cache (`entry` None)."""

    strategy: str
    sparsity: float
    seed: int
    entry: StrategyEntry | None
    full_heads: str = ""  # a hybrid plan: "POLICY:BUDGET" the full heads keep; "" = everything

    @classmethod
    def full_cache(cls) -> CellSetting:
        return cls(strategy=FULL, sparsity=0.0, seed=0, entry=None)


def full_heads_axis(spec: GridSpec, entry: StrategyEntry) -> list[str]:
    """The hybrid axis of a strategy: "POLICY:BUDGET" per `--full-budget` for head strategies
    ("" = full heads keep everything)."""
    if entry.cls.kind != "head" or not spec.full_policy:
        return [""]
    return ["" if budget == "all" else f"{spec.full_policy}:{budget}" for budget in spec.full_budgets]


def grid_cells(spec: GridSpec) -> list[CellSetting]:
    """Full cache once, then strategy x seed (every seed for strategies `averaged_over_seeds`) x full-head budget
    x sparsity."""
    todo = [CellSetting.full_cache()]
    for name, entry in spec.strategies:
        for seed in spec.seeds if entry.cls.averaged_over_seeds else spec.seeds[:1]:
            for full_heads in full_heads_axis(spec, entry):
                todo.extend(CellSetting(strategy=name, sparsity=sparsity, seed=seed, entry=entry, full_heads=full_heads)
                            for sparsity in spec.sparsities)
    return todo
