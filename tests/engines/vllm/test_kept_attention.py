"""What a compressed head reads in a step: its kept positions and the token itself."""

from __future__ import annotations

import pytest
import torch

from kvpress_rl.engines.vllm.layout import kept_history
from tests.engines.vllm.steps import SINK, WINDOW

pytestmark = pytest.mark.usefixtures("vllm_installed")


@pytest.mark.parametrize("computed", [0, 1, 15, 16, 17, 79, 80, 81, 95, 96, 97, 500])
def test_kept_positions_are_the_kept_history_and_the_token_itself(computed):
    from kvpress_rl.engines.vllm.kept_attention import kept_positions

    positions, valid = kept_positions(torch.tensor([computed]), SINK, WINDOW)
    assert positions[0][valid[0]].tolist() == kept_history(computed, SINK, WINDOW) + [computed]
    assert (positions[0][~valid[0]] == 0).all()
