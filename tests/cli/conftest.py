"""Fixtures of the command-line tests: a tiny local model with a training file, and an rlkv select on it."""

from __future__ import annotations

import json

import pytest

from tests.helpers import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a tokenizer, saved like a local model, and a training file."""
    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lines = (json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(20))
    (root / "train.jsonl").write_text("".join(lines))
    return root


@pytest.fixture
def tiny_rlkv(tiny_dir):
    """`tiny_rlkv(steps)`: the words of a `kvrl select --strategy rlkv` of a few seconds on the tiny model."""
    def words(steps: int = 3) -> tuple[str, ...]:
        return ("select", "--strategy", "rlkv", "--model", str(tiny_dir / "model"),
                "--data", str(tiny_dir / "train.jsonl"), "--steps", str(steps), "--prompts-per-step", "2",
                "--group-size", "4", "--max-new-tokens", "3",
                "--no-self-distillation", "--lr", "0.05", "--checkpoint-every", "1", "--micro-batch-tokens", "40",
                "--sink", "1", "--window", "2", "--train-mask", "token", "--no-gradient-checkpointing",
                "--rollout-batch", "2")

    return words
