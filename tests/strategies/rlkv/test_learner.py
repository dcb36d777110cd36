"""The RLKV learner's loop: gates only, rewards and the L1 term move them, steps over a fixed training set,
one share of each step per process."""

import json

import pytest
import torch

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.executor.gated import new_gates
from kvpress_rl.models import random_model, small_config
from kvpress_rl.strategies.rlkv import RLKV
from kvpress_rl.strategies.rlkv import learner as learner_module
from kvpress_rl.strategies.rlkv.grpo import batch_advantages
from kvpress_rl.strategies.rlkv.problems import RewardProblem
from kvpress_rl.strategies.rlkv.rollouts import LearnerSampler
from tests.strategies.rlkv.helpers import (
    Interrupted,
    options,
    sampled_step,
)


def test_rlkv_trains_gates_only_logs_and_records_provenance(tiny, data, tmp_path):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = RLKV(options(data)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(tmp_path / "run")))
    assert scores.shape == (2, 4) and scores.strategy == "rlkv"
    assert scores.options["steps"] == 3 and scores.seed == 0 and "reward_curve" in scores.extra
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"mean_reward", "mean_alpha", "beta_prime", "seconds", "reward_level", "epoch",
            "micro_batches"} <= set(log[0])
    assert log[0]["reward_level"] == "batch" and log[0]["micro_batches"] > 1  # 40 tokens: several micro-batches
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_rewards_move_the_gates(tiny, data, tmp_path):
    model, tokenizer = tiny
    scores = RLKV(options(data, steps=4)).select(model, tokenizer, SelectionContext(seed=1))
    assert not torch.all(scores.scores == 1.0)
    assert scores.scores.min() >= 0.0 and scores.scores.max() <= 1.0  # projected onto [0, 1] after every step


def test_constant_penalty_lowers_every_gate_when_rewards_carry_no_signal(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "impossible.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "answer": "123456789"}) + "\n")
    opts = options(path, steps=3, prompts_per_step=1, adaptive_penalty=False, beta=1.0)
    scores = RLKV(opts).select(model, tokenizer, SelectionContext(seed=0))
    assert torch.all(scores.scores < 1.0)  # every reward 0: no policy gradient, the L1 term alone acts


def step_advantages_seen(model, tokenizer, learner) -> tuple[torch.Tensor, torch.Tensor]:
    """`(advantages, completion tokens)` that one `_step` hands the backward, for two problems of 4 rollouts: the
    first solved by every rollout, the second by every other one."""
    every_other = iter([True, False] * 2)
    problems = [RewardProblem("1+0=", "1", lambda text, answer: True, "agree"),
                RewardProblem("2+0=", "2", lambda text, answer: next(every_other), "split")]
    seen = {}

    def backward(model, gates, sequences, mask, offset, advantages, rewards, sink, window, **kwargs):
        seen.update(advantages=advantages.clone(), tokens=mask[:, offset:].sum(1))
        return {"tokens": 1, "micro_batches": 1, "beta_prime": 0.0, "mean_reward": rewards.mean().item(),
                "reward_level": "batch"}

    learner.policy_backward = backward
    learner.resolve(model)
    gates = new_gates(model, 1.0)
    learner._step(model, tokenizer, gates, torch.optim.AdamW([gates], lr=0.1), problems, LearnerSampler(model))
    return seen["advantages"], seen["tokens"]


def test_on_a_real_model_a_group_whose_rollouts_agree_still_gets_an_advantage(tiny, data):
    _, tokenizer = tiny
    qwen2 = random_model(small_config("qwen2", vocab_size=len(tokenizer), num_hidden_layers=2), seed=0)
    advantages, tokens = step_advantages_seen(qwen2, tokenizer, RLKV(options(data)))
    assert (advantages[:4] > 0).all()  # rewards 1, 1, 1, 1 under a batch mean below +5
    torch.testing.assert_close(advantages, batch_advantages(torch.tensor([1.0] * 4 + [1.0, 0.0] * 2), tokens))
    qwen2.config.kvrl_profile = "embedded"  # the embedded profile keeps the paper's per-group z-score
    advantages, _ = step_advantages_seen(qwen2, tokenizer, RLKV(options(data)))
    assert advantages.tolist() == pytest.approx([0.0] * 4 + [1.0, -1.0] * 2, abs=1e-4)


def test_steps_walk_a_fixed_set_of_distinct_problems_epoch_by_epoch(tiny, data):
    model, tokenizer = tiny
    learner = RLKV(options(data, steps=7, prompts_per_step=2, train_set_size=5))
    seen = []

    def fake_step(model, tokenizer, gates, optimizer, problems, engine=None):
        seen.append([p.source for p in problems])
        return {"mean_reward": 0.0, "mean_alpha": 1.0}

    learner._step = fake_step
    learner.select(model, tokenizer, SelectionContext(seed=4))
    assert all(len(batch) == 2 for batch in seen) and len(seen) == 7
    first_five = {f"train.jsonl:{i}" for i in range(1, 6)}
    for epoch in (seen[0:2], seen[2:4], seen[4:6]):  # 5 problems, batches of 2: 2 steps an epoch, the 5th dropped
        drawn = [s for batch in epoch for s in batch]
        assert len(set(drawn)) == 4 and set(drawn) <= first_five  # distinct within an epoch
    assert seen[0:2] != seen[2:4] or seen[2:4] != seen[4:6]  # reshuffled each epoch


def test_a_bfloat16_model_trains_float32_gates(tiny, data):
    _, tokenizer = tiny
    model = random_model(small_config("llama", vocab_size=len(tokenizer), num_hidden_layers=2), seed=0,
                         dtype=torch.bfloat16)
    learner = RLKV(options(data, steps=2, gradient_checkpointing=True, beta=1.0, adaptive_penalty=False))
    scores = learner.select(model, tokenizer, SelectionContext(seed=0))
    assert scores.scores.dtype == torch.float32 and torch.all(scores.scores < 1.0)
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    learner.policy_backward(model, gates, sequences, mask, offset, torch.linspace(-1, 1, 12), torch.zeros(12), 1, 2)
    assert gates.dtype == torch.float32 and gates.grad.dtype == torch.float32 and gates.grad.abs().max() > 0


def test_each_process_samples_its_share_of_the_same_batch_with_its_own_seed(tiny, data, monkeypatch):
    model, tokenizer = tiny
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(learner_module, "world", lambda rank=rank: (rank, 2))

        class RecordingSampler:  # a `RolloutSampler` that notes what it is asked for
            name = "recording"

            def sample(self, prompts, sampling, *, gates, branch, copies=1, logprobs=False, rank=rank):
                seen[rank] = (torch.initial_seed(), [tokenizer.decode(p) for p in prompts])
                raise Interrupted

            def close(self):
                pass

        with pytest.raises(Interrupted):
            RLKV(options(data, prompts_per_step=4)).select(model, tokenizer,
                                                           SelectionContext(seed=7, sampler=RecordingSampler()))
    assert seen[0][0] == 7 and seen[1][0] == 8  # sampling seeded with seed + rank
    # disjoint halves of one batch
    assert len(seen[0][1]) == len(seen[1][1]) == 2 and not set(seen[0][1]) & set(seen[1][1])
    monkeypatch.setattr(learner_module, "world", lambda: (0, 3))
    with pytest.raises(KvrlError, match="prompts-per-step 4 is not a multiple of the 3 processes"):
        RLKV(options(data, prompts_per_step=4)).select(model, tokenizer, SelectionContext(seed=7))
