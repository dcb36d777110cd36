"""Running a grid's cells: a cell's plan and decoding simulation reach the model for that cell only."""

from types import SimpleNamespace

import torch

from kvpress_rl import plan_from_scores
from kvpress_rl.evaluators.grid import run_cell
from kvpress_rl.evaluators.grid_spec import CellSetting, GridSpec
from kvpress_rl.evaluators.harness import GenerationStats, KvrlLM
from kvpress_rl.evaluators.tasks import TaskConfig
from kvpress_rl.policies import Streaming


def test_a_cells_settings_reach_the_model_for_that_cell_only(monkeypatch, tmp_path):
    import lm_eval

    seen = []

    def evaluate(model, **kwargs):
        seen.append((model.plan, model.decoding_simulation))  # what the model generates under, during the cell

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    lm = KvrlLM.__new__(KvrlLM)  # no lm-eval set-up: lm-eval itself is replaced
    lm.__dict__.update(tokenizer=SimpleNamespace(chat_template=None), _max_length=32768, stats=GenerationStats(),
                       plan=None, decoding_simulation=None)
    plan = plan_from_scores(torch.rand(4, 4), 0.5, Streaming(2, 3))
    spec = GridSpec(strategies=[], sparsities=[], seeds=[0], limit=1, tasks=["gsm8k"], decoding_simulation=7)
    setting = CellSetting(strategy="random", sparsity=0.5, seed=0, entry=None)
    assert run_cell(lm, spec, TaskConfig("gsm8k", "gsm8k", ""), setting, plan, tmp_path) is None
    assert seen == [(plan, 7)]
    assert lm.plan is None and lm.decoding_simulation is None and lm.cell_stats is None  # nothing left behind
