"""Synthetic contexts for head scoring: haystacks and needles built from single tokens.

`token_pool(model, tokenizer)` gives the token ids to draw them from: the single-token words of the
model's profile when it has some (the embedded model: its task's words, the distribution it was
trained on), else the tokenizer's vocabulary without special tokens (and, for a real tokenizer,
without the first 256 ids, mostly bytes and control tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from kvpress_rl.profiles import profile_of


def token_pool(model: Any, tokenizer: Any) -> torch.Tensor:
    words = profile_of(model).haystack_words
    if words and tokenizer is not None:
        return torch.tensor([tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in words])
    vocab = model.config.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    low = 0 if tokenizer is None else min(256, vocab // 4)
    return torch.tensor([i for i in range(low, vocab) if i not in special])
