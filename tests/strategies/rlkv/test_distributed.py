"""Data-parallel RLKV: 2 CPU processes (gloo) keep identical gates while sampling different rollouts, and their
summed gradient is that of one process over the union of their batches."""

import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.distributed import failed_in_collective
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions
from kvpress_rl.strategies.rlkv.backward import join_rollouts
from kvpress_rl.strategies.rlkv.rollouts import rollouts
from tests.helpers import tiny_model_and_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, tokenizer = tiny_model_and_tokenizer()  # a subprocess: the plain function, not the `tiny` fixture
        options = RLKVOptions(data=data, steps=3, prompts_per_step=4, group_size=4, max_new_tokens=3,
                              self_distillation=False,
                              lr=0.05, sink=1, window=2, train_mask="token", gradient_checkpointing=False)
        scores = RLKV(options).select(model, tokenizer, SelectionContext(seed=0))  # sampling is seeded with seed + rank
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


LEVELS = ("batch", "group", "micro-batch")


def backward_learner(level: str):
    return RLKV(RLKVOptions(max_new_tokens=8, sink=1, window=2, train_mask="token", gradient_checkpointing=False,
                            micro_batch_tokens=1, reward_level=level, beta=1.0, tau=0.5))


def backward_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, _ = tiny_model_and_tokenizer()
        part = torch.load(f"{out}/part-{rank}.pt")
        results = {}
        for level in LEVELS:
            gates = part["gates"].clone().requires_grad_(True)
            stats = backward_learner(level).policy_backward(model, gates, part["sequences"], part["mask"],
                                                            part["offset"],
                                                            part["advantages"], part["rewards"], 1, 2)
            results[level] = (gates.grad.clone(), stats)
        torch.save(results, f"{out}/result-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_with_uneven_tokens_take_the_gradient_of_one_process_over_the_union(tiny, tmp_path):
    model, tokenizer = tiny
    torch.manual_seed(0)
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    parts = []
    # long vs short completions
    for rank, (texts, new_tokens) in enumerate(((("12+0=", "3+0="), 8), (("456+78=", "9+1="), 2))):
        with gated(model, gates, sink=1, window=2):
            sequences, mask, offset = rollouts(model, tokenizer, [tokenizer(t)["input_ids"] for t in texts],
                                               RLKVOptions(max_new_tokens=new_tokens),
                                               sample=True, copies=4)
        parts.append(dict(sequences=sequences, mask=mask, offset=offset, gates=gates.detach().clone(),
                          advantages=torch.linspace(-1.0, 1.0, 8) * (rank + 1),
                          rewards=torch.tensor([[1.0, 1, 1, 0, 1, 0, 1, 1], [1.0, 1, 1, 1, 0, 0, 0, 1]][rank])))
        torch.save(parts[-1], tmp_path / f"part-{rank}.pt")
    tokens = [int(p["mask"][:, p["offset"]:].sum()) for p in parts]
    assert tokens[0] > 2 * tokens[1]  # uneven: a mean of per-process means would weigh the short batch up
    sequences, mask, offset = join_rollouts([(p["sequences"], p["mask"], p["offset"]) for p in parts],
                                            tokenizer.pad_token_id)
    advantages = torch.cat([p["advantages"] for p in parts])
    rewards = torch.cat([p["rewards"] for p in parts])

    mp.spawn(backward_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result-{rank}.pt") for rank in (0, 1)]
    for level in LEVELS:
        union = gates.detach().clone().requires_grad_(True)
        stats = backward_learner(level).policy_backward(model, union, sequences, mask, offset, advantages, rewards, 1,
                                                        2)
        assert stats["beta_prime"] > 0 and stats["micro_batches"] == 4
        for grad, rank_stats in (r[level] for r in results):
            torch.testing.assert_close(grad, union.grad, atol=1e-7, rtol=1e-5)
            assert rank_stats["tokens"] == stats["tokens"] == sum(tokens)
            assert rank_stats["mean_reward"] == pytest.approx(stats["mean_reward"])
            assert rank_stats["beta_prime"] == pytest.approx(stats["beta_prime"]), level


def leaving_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Rank 1 leaves after the first all_reduce; rank 0 waits in the second and records how its error is classified."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a hang fails, in a minute
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    value = torch.ones(1)
    dist.all_reduce(value)
    if rank == 1:
        dist.destroy_process_group()
        return
    try:
        dist.all_reduce(value)
        result = "returned"
    except Exception as err:  # gloo: "Connection closed by peer"
        result = f"{failed_in_collective(err)} {type(err).__name__}"
    with open(f"{out}/survivor.txt", "w") as handle:
        handle.write(result)


def test_a_survivor_s_error_in_a_collective_is_told_apart_from_the_failure_itself(tmp_path):
    mp.spawn(leaving_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "survivor.txt").read_text().startswith("True ")
    try:
        raise RuntimeError("injected failure")
    except RuntimeError as err:
        assert not failed_in_collective(err)
    try:
        try:
            raise dist.DistBackendError("NCCL watchdog timed out")
        except dist.DistBackendError as cause:
            raise KvrlError("one line") from cause
    except KvrlError as err:
        assert failed_in_collective(err)
