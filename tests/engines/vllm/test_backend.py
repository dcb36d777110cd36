"""The compressed groups' metadata of a step (`backend.kept_metadata`)."""

from __future__ import annotations

import pytest
import torch

from tests.engines.vllm.steps import build

pytestmark = pytest.mark.usefixtures("vllm_installed")


def test_a_decoding_step_builds_without_a_loop_over_requests():
    lengths = torch.tensor([90, 5, 400], dtype=torch.int32)
    start_loc = torch.arange(4, dtype=torch.int32)
    table = torch.arange(1, 1 + 3 * 13, dtype=torch.int32).reshape(3, 13)
    built = build(dict(query_start_loc=start_loc, query_start_loc_cpu=start_loc, seq_lens=lengths, num_reqs=3,
                       num_actual_tokens=3,
                       max_query_len=1, max_seq_len=400, slot_mapping=torch.zeros(3, dtype=torch.long)), table)
    assert built.decode_tokens is None and built.num_decodes == 3 and not built.prefills
    assert built.kept_valid.sum(1).tolist() == [81, 5, 81]  # 16 + 64 + itself; 4 cached + itself
