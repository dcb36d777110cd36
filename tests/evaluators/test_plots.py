"""The gate heat maps and training curves are written as PNG files."""

import json

import torch

from kvpress_rl import HeadScores
from kvpress_rl.evaluators.plots import gate_heatmap, gate_heatmaps, training_curves


def test_plots_are_written(tmp_path):
    heatmap = gate_heatmap(HeadScores(torch.rand(6, 3), strategy="rlkv"), tmp_path / "gates.png")
    panels = [(f"seed {i}", HeadScores(torch.rand(6, 3), strategy="rlkv")) for i in range(3)]
    side_by_side = gate_heatmaps(panels, tmp_path / "seeds.png", kept_at=0.8)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "mean_reward": 0.9, "mean_alpha": 1 - i / 10}) + "\n"
                           for i in range(1, 6)))
    curves = training_curves(log, tmp_path / "curves.png")
    for path in (heatmap, side_by_side, curves):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
