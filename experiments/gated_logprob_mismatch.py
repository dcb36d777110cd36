"""How far vLLM's gated model (the sampler) and the learner's teacher-forced gated forward disagree on the
log-probabilities of the tokens the engine sampled, in the dtype that trains (bfloat16) and in float32.

RLKV's policy gradient weights each sampled token by the learner's probability of it; a sampler whose distribution
differs from the learner's makes the rollouts slightly off-policy. This prints, per dtype, the mean and the largest
|log p_engine - log p_learner| over every sampled token, and the share above 0.1. The gates are the committed RLKV
gates of the embedded model; the prompts the counted task's training problems, 4 samples each at temperature 1.

    .venv/bin/python experiments/gated_logprob_mismatch.py      # a few minutes on 2 cores
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HEADS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "heads-rlkv-embedded-count.safetensors"


def mismatch(dtype: torch.dtype, prompts_count: int, new_tokens: int) -> dict:
    from kvpress_rl.embedded.model import load_embedded
    from kvpress_rl.engines.vllm.engine import GatedRollouts
    from kvpress_rl.executor.gated import gated
    from kvpress_rl.sampling import GatedBranch, Sampling
    from kvpress_rl.scores import HeadScores
    from kvpress_rl.strategies.rlkv.backward import completion_logprobs
    from kvpress_rl.strategies.rlkv.problems import load_problems
    from kvpress_rl.strategies.rlkv.rollouts import chat_ids, end_ids

    model, tokenizer = load_embedded(dtype)
    gates = HeadScores.load(HEADS).scores.clamp(0.0, 1.0)
    branch = GatedBranch(sink=16, window=64, mask="token")  # the embedded model's training branch
    prompts = [chat_ids(tokenizer, p.prompt) for p in load_problems("embedded-count", prompts_count, 2**32, None)]
    sampling = Sampling(temperature=1.0, max_new_tokens=new_tokens, stop_ids=tuple(end_ids(tokenizer)),
                        pad_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    engine = GatedRollouts(None, dtype=str(dtype).removeprefix("torch."), max_model_len=2048)
    try:
        out = engine.sample(prompts, sampling, gates=gates, branch=branch, copies=4, logprobs=True)
    finally:
        engine.close()
    with torch.no_grad(), gated(model, gates, sink=branch.sink, window=branch.window, mask=branch.mask,
                                block_size=branch.block_size):
        learner = completion_logprobs(model, out.sequences, out.mask, out.offset, copies=1, shared=False)
    real = out.completion_mask.bool()
    difference = (out.logprobs[real] - learner[real].float()).abs()
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": int(real.sum()), "mean": difference.mean().item(),
            "max": difference.max().item(), "above_0.1": (difference > 0.1).float().mean().item()}


def main() -> None:
    rows = [mismatch(dtype, prompts_count=8, new_tokens=128) for dtype in (torch.float32, torch.bfloat16)]
    print("| dtype | sampled tokens | mean abs log p difference | max | share above 0.1 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['tokens']} | {r['mean']:.4f} | {r['max']:.4f} | {100 * r['above_0.1']:.1f}% |")


if __name__ == "__main__":
    main()
