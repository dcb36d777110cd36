"""Chat-formatted token batches for the embedded task (training and evaluation share them)."""

from __future__ import annotations

import torch

from kvpress_rl.embedded.task import EmbeddedProblem


def prompt_ids(tokenizer, problem: EmbeddedProblem) -> list[int]:
    messages = [{"role": "user", "content": problem.prompt()}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def training_example(tokenizer, problem: EmbeddedProblem) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)`: the loss covers the assistant's answer (and its end-of-turn) only."""
    prompt = prompt_ids(tokenizer, problem)
    answer = tokenizer(problem.solution() + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    return prompt + answer, [-100] * len(prompt) + answer


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    batch = {
        "input_ids": torch.full((len(pairs), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(pairs), width), dtype=torch.long),
        "labels": torch.full((len(pairs), width), -100, dtype=torch.long),
    }
    for row, (ids, labels) in enumerate(pairs):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
    return batch
