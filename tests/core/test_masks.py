"""The attention masks of `kvpress_rl.masks` against loops: history + causal, and the streaming branch's blocks."""

import pytest
import torch

from kvpress_rl.masks import history_causal_mask, streaming_mask
from tests.executor.reference import explicit_block_mask


def test_history_causal_mask_sees_the_kept_history_and_the_step_up_to_itself():
    kept = torch.tensor([[True, False, True], [False, True, True]])  # two rows of 3 cached keys
    mask = history_causal_mask(kept, 4)
    assert mask.shape == (2, 4, 7)
    for row in range(2):
        for i in range(4):
            expected = kept[row].tolist() + [j <= i for j in range(4)]
            assert mask[row, i].tolist() == expected
    whole = history_causal_mask(3, 4)  # every cached key: plain causal after 3 keys
    assert torch.equal(whole, history_causal_mask(torch.ones(3, dtype=torch.bool), 4))
    assert torch.equal(history_causal_mask(0, 5), torch.ones(5, 5, dtype=torch.bool).tril())
    own = torch.tensor([[True, False], [True, True]])  # the model's own mask of the step's keys (with padding)
    assert history_causal_mask(kept, 2, causal=own)[0, 0].tolist() == [True, False, True, True, False]


def padded_4d(valid: torch.Tensor) -> torch.Tensor:
    """The model's own bool mask (causal, keys not padding), as `sdpa_mask` gives the attention function."""
    length = valid.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    return causal[None, None] & valid[:, None, None, :]


@pytest.mark.parametrize("sink, window, block", [(3, 5, 4), (4, 8, 4), (1, 1, 3), (0, 6, 5)])
def test_block_mask_matches_a_brute_force_reference_with_left_padding(sink, window, block):
    valid = torch.ones(3, 23, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :9] = False
    got = streaming_mask(padded_4d(valid), 23, 23, sink, window, "cpu", mode="block", block_size=block)
    expected = explicit_block_mask(valid, sink, window, block)
    real = valid[:, None, :, None].expand_as(got)  # padding query rows are free (they keep the model's own row)
    assert torch.equal(got[real], expected[real])
    # decoding one query against a cache gives the last row of the full mask
    last = streaming_mask(padded_4d(valid)[:, :, -1:], 1, 23, sink, window, "cpu", mode="block", block_size=block)
    assert torch.equal(last, expected[:, :, -1:])


def test_block_mask_at_the_official_sizes_sees_257_to_384_keys():
    mask = streaming_mask(None, 640, 640, 128, 256, "cpu", mode="block", block_size=128)[0, 0]
    seen = mask.sum(-1)
    assert seen[383].item() == 384 and seen[384].item() == 257 and seen[511].item() == 384 and seen[639].item() == 384
    assert seen[384:].min().item() == 257 and seen[384:].max().item() == 384
    token = streaming_mask(None, 640, 640, 128, 256, "cpu", mode="token")[0, 0].sum(-1)
    assert token[384:].unique().tolist() == [384]  # the token mask: always 128 + 256
