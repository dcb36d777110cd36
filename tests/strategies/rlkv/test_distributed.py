"""Data-parallel RLKV: 2 CPU processes (gloo) keep identical gates while sampling different rollouts."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from kvpress_rl import SelectionContext
        from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions
        from tests.strategies.rlkv.test_learner import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer()
        options = RLKVOptions(data=data, steps=3, prompts_per_step=4, group_size=4, max_new_tokens=3, self_distillation=False,
                              lr=0.05, sink=1, window=2)
        scores = RLKV(options).select(model, tokenizer, SelectionContext(seed=rank))  # different seeds: different samples
        torch.save(scores.scores, f"{out}/gates-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_identical_gates(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(20)))
    mp.spawn(worker, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    first, second = torch.load(tmp_path / "gates-0.pt"), torch.load(tmp_path / "gates-1.pt")
    assert torch.equal(first, second)
    assert not torch.all(first == 1.0)  # and they did train
