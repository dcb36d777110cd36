import json

import pytest
import torch

from tests.helpers import tiny_model_and_tokenizer


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama and its character tokenizer, shared by the session: tests must leave its weights
    and `requires_grad` flags as they found them (checked at the end; gates trained around it are not its own)."""
    model, tokenizer = tiny_model_and_tokenizer()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    yield model, tokenizer
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), (
        "a test changed the shared tiny model's weights")
    assert [p.requires_grad
            for p in model.parameters()] == flags, "a test left the shared tiny model's requires_grad changed"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(20)))
    return path
