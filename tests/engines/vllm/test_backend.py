"""The compressed groups' metadata of a step (`backend.kept_metadata`)."""

from __future__ import annotations

import pytest
import torch

from tests.engines.vllm.steps import BLOCK, build

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


def test_generated_tokens_recomputed_after_preemption_get_one_decoding_row_each():
    """Request 0 decodes; request 1 recomputes 3 generated tokens after its prompt of 200 (past its prompt: decoding
    rule per token); request 2 is a prompt chunk after 40 cached tokens (its history, one row)."""
    start_loc = torch.tensor([0, 1, 4, 14], dtype=torch.int32)
    lengths = torch.tensor([90, 203, 50], dtype=torch.int32)
    table = torch.arange(1, 1 + 3 * 13, dtype=torch.int32).reshape(3, 13)
    built = build(dict(query_start_loc=start_loc, query_start_loc_cpu=start_loc, seq_lens=lengths,
                       seq_lens_cpu_upper_bound=lengths, num_reqs=3, num_actual_tokens=14, max_query_len=10,
                       max_seq_len=203, slot_mapping=torch.zeros(14, dtype=torch.long),
                       is_prefilling=torch.tensor([False, False, True])), table)
    assert built.num_decodes == 4 and built.decode_tokens.tolist() == [0, 1, 2, 3]
    [chunk] = built.prefills
    assert (chunk.request, chunk.row, chunk.start, chunk.end, chunk.computed) == (2, 4, 4, 14, 40)
    assert built.kept_valid.sum(1).tolist() == [81, 81, 81, 81, 41]  # 16 + 64 + itself each; 40 cached + position 40
    sinks, window = slice(0, 16), slice(16, 80)

    def slot(request: int, position: int) -> int:
        return int(table[request, position // BLOCK]) * BLOCK + position % BLOCK

    for row, position in zip(range(1, 4), (200, 201, 202)):  # the window ends at the token itself
        assert built.kept_slots[row, -1] == slot(1, position)
        assert built.kept_slots[row, window].tolist() == [slot(1, p) for p in range(position - 64, position)]
        assert built.kept_slots[row, sinks].tolist() == [slot(1, p) for p in range(16)]

