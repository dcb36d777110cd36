"""Greedy tokens of the vLLM plugin against the executor's, on counted test problems, in a given dtype:
how many answers are identical token for token, and where the others part, with the executor's top-2 logit gap
at that token (a near tie there means the two engines' rounding, not their caches, chose differently).

    python experiments/engine_tokens.py --dtype bfloat16 --problems 20 --sparsities 0.5,0.8
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvpress_rl.embedded.data import left_pad, prompt_ids  # noqa: E402
from kvpress_rl.embedded.model import load_embedded  # noqa: E402
from kvpress_rl.embedded.task import ANSWER_LIMITS, COUNTED_TASK, task_problems  # noqa: E402
from kvpress_rl.engines.vllm.engine import EngineSettings, VllmGenerator, model_folder  # noqa: E402
from kvpress_rl.engines.vllm.layout import EnginePlan  # noqa: E402
from kvpress_rl.executor import compressed, generate  # noqa: E402
from kvpress_rl.models import cache_kwargs  # noqa: E402
from kvpress_rl.plan import plan_from_scores  # noqa: E402
from kvpress_rl.scores import HeadScores  # noqa: E402

HEADS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "heads-rlkv-embedded-count.safetensors"


def logit_gap(model, plan, prompt: list[int], answer: list[int], position: int) -> float:
    """The executor's top-1 minus top-2 logit at `position` of `answer`, teacher-forced through the plan's cache."""
    ids = torch.tensor([prompt + answer[:position]])
    with torch.inference_mode(), compressed(model, plan) as session:
        out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **cache_kwargs(model, session.new_cache()))
    top = out.scores[0][0].float().topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--sparsities", default="0.5,0.8")
    args = parser.parse_args()
    model, tokenizer = load_embedded(dtype=getattr(torch, args.dtype))
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    prompts = [prompt_ids(tokenizer, p) for p in task_problems(COUNTED_TASK, "test", args.problems)]
    limit = ANSWER_LIMITS[COUNTED_TASK]
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        plan = plan_from_scores(HeadScores.load(HEADS), sparsity)
        settings = EngineSettings(model=model_folder("embedded"), plan=EnginePlan.from_plan(plan), max_model_len=2048,
                                  dtype=args.dtype)
        with VllmGenerator(settings) as engine:
            outputs = engine.generate(prompts, limit, stop_token_ids=end_ids)
            got = [[t for t in out.token_ids if t not in end_ids] for out in outputs]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        with torch.inference_mode():
            out = generate(model, plan, ids, attention_mask=mask, max_new_tokens=limit, do_sample=False,
                           eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
        expected = [[t for t in row.tolist() if t not in end_ids] for row in out[:, ids.shape[1]:]]
        parted = []
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                gap = logit_gap(model, plan, prompts[i], b, at)
                parted.append(f"problem {i}: token {at}, executor's top-2 gap {gap:.3f}")
        print(f"{args.dtype}, s = {sparsity:g}: {len(got) - len(parted)} / {len(got)} answers identical"
              + "".join(f"\n  {p}" for p in parted), flush=True)


if __name__ == "__main__":
    main()
