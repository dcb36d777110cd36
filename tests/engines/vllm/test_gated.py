"""The gated model in vLLM (RLKV's rollouts, `kvrl select --rollout-engine vllm`): for fixed gates, the
log-probabilities the engine reports for its sampled tokens are the learner's teacher-forced ones, on the embedded
model (token-exact 16 + 64) and on a random-weight Qwen2 with the official 128-token blocks, the copies of a prompt
going on from its cached prefill; gates sent mid-life replace the old ones (and drop the cached prompts), and gates
the engine did not get (stale) are caught by the same comparison."""

from __future__ import annotations

import pytest
import torch

from kvpress_rl.engines.vllm.engine import GatedRollouts
from kvpress_rl.errors import KvrlError
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.sampling import GatedBranch, Sampling
from kvpress_rl.strategies.rlkv.backward import completion_logprobs
from tests.engines.vllm.conftest import tiny_folder

pytestmark = [pytest.mark.usefixtures("vllm_installed"), pytest.mark.engine]
# float32 on both sides: the two implementations differ by summation order only. The issue's bar is bfloat16's
# tolerance (a relative 2**-8 on a log-probability); these runs hold a far tighter one.
TOLERANCE = 2e-3
BLOCK = 32  # the engine's block size on the CPU


def learner_logprobs(model, gates: torch.Tensor, branch: GatedBranch, sequences, mask, offset) -> torch.Tensor:
    """The learner's teacher-forced log-probabilities of the completion tokens (`RLKV.policy_backward`'s forward)."""
    with torch.no_grad(), gated(model, gates, sink=branch.sink, window=branch.window, mask=branch.mask,
                                block_size=branch.block_size):
        return completion_logprobs(model, sequences, mask, offset, copies=1, shared=False)


def largest_difference(engine_logprobs, learner, mask, offset) -> float:
    real = mask[:, offset:].bool()
    return (engine_logprobs[real] - learner[real]).abs().max().item()


def random_gates(model, seed: int) -> torch.Tensor:
    return torch.rand(new_gates(model).shape, generator=torch.Generator().manual_seed(seed))


def test_embedded_engine_samples_the_learners_policy_and_takes_new_gates_without_a_restart():
    from kvpress_rl.embedded.model import load_embedded
    from kvpress_rl.strategies.rlkv.problems import load_problems
    from kvpress_rl.strategies.rlkv.rollouts import chat_ids, end_ids

    model, tokenizer = load_embedded()
    branch = GatedBranch(sink=16, window=64, mask="token")
    prompts = [chat_ids(tokenizer, p.prompt) for p in load_problems("embedded-count", 3, 2**32, None)]
    first, second = random_gates(model, 0), random_gates(model, 1) ** 3  # the second pushes many gates towards 0
    sampling = Sampling(temperature=1.0, max_new_tokens=80, stop_ids=tuple(end_ids(tokenizer)),
                        pad_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    engine = GatedRollouts(None, dtype="float32", max_model_len=1024)
    try:
        runs, cached = [], []
        for gates in (first, second):
            runs.append((gates, engine.sample(prompts, sampling, gates=gates, branch=branch, copies=2, logprobs=True)))
            cached.append(engine.cached_tokens)
    finally:
        engine.close()
    # each prompt's second copy went on from the first's cached prompt (whole blocks, the last token recomputed);
    # the second batch too, though new gates dropped the first batch's cache (else its log-probabilities differ)
    for batch in cached:
        for prompt, copy in zip(prompts, batch[1::2]):
            assert copy >= (len(prompt) - 1) // BLOCK * BLOCK > 0
    for gates, out in runs:
        sequences, mask, offset, sampled = out.sequences, out.mask, out.offset, out.logprobs
        assert mask[:, offset:].sum() > 100  # real completions, not empty ones
        learner = learner_logprobs(model, gates, branch, sequences, mask, offset)
        assert largest_difference(sampled, learner, mask, offset) < TOLERANCE
    # stale gates: the second batch scored by a learner that still held the first gates is a different policy
    out = runs[1][1]
    sequences, mask, offset, sampled = out.sequences, out.mask, out.offset, out.logprobs
    stale = learner_logprobs(model, first, branch, sequences, mask, offset)
    assert largest_difference(sampled, stale, mask, offset) > 20 * TOLERANCE


def test_random_qwen2_engine_matches_the_learner_with_the_official_blocks(tmp_path_factory):
    model, folder = tiny_folder(tmp_path_factory, "qwen2", seed=3, max_position_embeddings=2048)
    branch = GatedBranch(sink=128, window=256, mask="block", block_size=128)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (150, 300, 420)]
    gates = random_gates(model, 2)
    torch.manual_seed(0)
    engine = GatedRollouts(folder, dtype="float32", max_model_len=1024)
    try:
        out = engine.sample(prompts, Sampling(temperature=1.0, max_new_tokens=300, stop_ids=(), pad_id=0),
                            gates=gates, branch=branch, copies=2, logprobs=True)
    finally:
        engine.close()
    sequences, mask, offset, sampled = out.sequences, out.mask, out.offset, out.logprobs
    assert mask[:, offset:].sum() == 6 * 300  # no stop token: every row crosses several 128-token blocks
    assert all(copy == (len(p) - 1) // BLOCK * BLOCK for p, copy in zip(prompts, engine.cached_tokens[1::2]))
    learner = learner_logprobs(model, gates, branch, sequences, mask, offset)
    assert largest_difference(sampled, learner, mask, offset) < TOLERANCE
    # the check has power here too: the same tokens under other gates score differently
    other = learner_logprobs(model, torch.ones_like(gates), branch, sequences, mask, offset)
    assert largest_difference(sampled, other, mask, offset) > 5 * TOLERANCE


def test_select_samples_every_step_in_the_engine(tmp_path):
    """`SelectionContext.sampler` (what `kvrl select --rollout-engine vllm` passes): the learner samples every step's
    rollouts through it, its engine started once with the learner's streaming branch, the gates sent before each
    step's rollouts; the caller closes it."""
    import json

    from kvpress_rl.selector import SelectionContext
    from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions
    from tests.helpers import tiny_model_and_tokenizer

    # head size 32: vLLM's CPU attention kernel needs at least 32
    model, tokenizer = tiny_model_and_tokenizer(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=32)
    model.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(12)))
    opts = RLKVOptions(data=str(data), steps=2, prompts_per_step=2, group_size=4, max_new_tokens=4,
                       self_distillation=False, lr=0.05, micro_batch_tokens=40, sink=1, window=2, train_mask="token",
                       gradient_checkpointing=False)
    engine = GatedRollouts(str(tmp_path / "tiny"), dtype="float32", max_model_len=256)
    try:
        scores = RLKV(opts).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(tmp_path / "run"),
                                                                      sampler=engine))
        assert engine.branch == GatedBranch(sink=1, window=2, mask="token", block_size=128)
        assert engine.gates_sum is not None  # gates were sent (that the engine then samples under them: above)
        with pytest.raises(KvrlError, match="runs the streaming branch"):
            engine.start(GatedBranch(sink=2, window=2))
    finally:
        engine.close()
    assert scores.extra["rollout_engine"] == "vllm"
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["completion_tokens"] > 0 for r in log)
