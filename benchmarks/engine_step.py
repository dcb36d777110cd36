"""Per-step cost of head plans in vLLM against stock vLLM: the same batch, a KV cache that holds every request.

    OMP_NUM_THREADS=2 python benchmarks/engine_step.py --output benchmarks/results/engine_step.csv

For each model and context length, four engines on the same random prompts, one after another in this process:
stock vLLM (the model's own architecture, no plugin class), the plugin with every head full, and head plans at
s = 0.5 and 0.8. Decoding tokens/s is `R * (N - 1) / (t(N) - t(1))`: the batch generated to N tokens minus the same
batch to one token (its prefill), best of `--repeats`. Ratios are against stock vLLM in the same run. Models: the
embedded one (plans from the committed RLKV heads) and the 2-layer random-weight Qwen2.5-7B layout of `serving.py`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from serving import RLKV_HEADS, cpu_name, kv_bytes_per_token, qwen_2layer_folder, write_rows  # noqa: E402

from kvpress_rl.engines.vllm.engine import EngineSettings, VllmGenerator, model_folder  # noqa: E402
from kvpress_rl.engines.vllm.layout import EnginePlan  # noqa: E402
from kvpress_rl.plan import plan_from_scores  # noqa: E402
from kvpress_rl.scores import HeadScores  # noqa: E402

ENGINES = ("stock", "plugin, every head full", "s = 0.5", "s = 0.8")


def engine_plan(name: str, scores: HeadScores) -> EnginePlan | None:
    if name == "stock":
        return None
    if name.startswith("plugin"):
        return EnginePlan.full_cache(*scores.scores.shape)
    return EnginePlan.from_plan(plan_from_scores(scores, float(name.split("=")[1])))


def decode_rate(folder: str, plan: EnginePlan | None, prompts: list[list[int]], new_tokens: int, dtype: str,
                repeats: int, profile: Path | None = None, compiled: bool = False) -> dict:
    """Decoding tokens/s of the batch, step by step: every prompt is prefilled in the first step (one batch of all
    of them), then each engine step decodes one token of every request; the mean of the decoding steps, best of
    `repeats`."""
    from vllm import SamplingParams

    length = len(prompts[0]) + new_tokens + 32
    budget = int(len(prompts) * length * kv_bytes_per_token(folder, getattr(torch, dtype)) * 1.1) + 2**26
    settings = EngineSettings(model=folder, plan=plan, max_model_len=length, dtype=dtype, kv_cache_memory_bytes=budget,
                              max_num_seqs=len(prompts), max_num_batched_tokens=len(prompts) * length,
                              eager=not compiled)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    best, prefill = 0.0, 0.0
    with VllmGenerator(settings) as engine:
        engine.generate(prompts[:2], 4)  # warm-up
        core = engine.llm.llm_engine
        for repeat in range(repeats):
            for i, prompt in enumerate(prompts):
                core.add_request(f"r{repeat}-{i}", {"prompt_token_ids": prompt}, params)
            began = time.perf_counter()
            core.step()  # every prompt, one step
            prefill = time.perf_counter() - began
            steps, began = 0, time.perf_counter()
            profiler = torch.profiler.profile() if profile and repeat == repeats - 1 else None
            if profiler:
                profiler.__enter__()
            while core.has_unfinished_requests():
                core.step()
                steps += 1
            seconds = time.perf_counter() - began
            if profiler:
                profiler.__exit__(None, None, None)
                profile.write_text(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            best = max(best, len(prompts) * steps / seconds)
    return {"decode_tokens_per_s": best, "prefill_s": prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,qwen2.5-7b-2l")
    parser.add_argument("--loads", default="512:16:128,4096:8:64",
                        help="prompt tokens:requests:new tokens, comma-separated")
    parser.add_argument("--qwen-loads", default="512:16:128,4096:4:32",
                        help="the same for the Qwen2.5-7B layout (slower per token)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compiled", action="store_true",
                        help="every engine compiled (vLLM's default on its CPU build), not eager")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models.split(","):
            if model == "embedded":
                folder, scores, vocab, loads = model_folder("embedded"), HeadScores.load(RLKV_HEADS), 49152, args.loads
            else:
                folder, raw = qwen_2layer_folder(Path(scratch))
                scores, vocab, loads = HeadScores(raw, model_id=model, strategy="random"), 32768, args.qwen_loads
            for load in loads.split(","):
                prompt_tokens, requests, new_tokens = (int(x) for x in load.split(":"))
                generator = torch.Generator().manual_seed(0)
                prompts = torch.randint(100, vocab, (requests, prompt_tokens), generator=generator).tolist()
                for name in ENGINES:
                    result = decode_rate(folder, engine_plan(name, scores), prompts, new_tokens, args.dtype,
                                         args.repeats, compiled=args.compiled)
                    rows.append({"model": model, "prompt_tokens": prompt_tokens, "requests": requests,
                                 "new_tokens": new_tokens, "engine": name, **result})
                    print(rows[-1], flush=True)
    for row in rows:
        stock = next(r for r in rows if r["model"] == row["model"] and r["prompt_tokens"] == row["prompt_tokens"]
                     and r["engine"] == "stock")
        row["vs_stock"] = row["decode_tokens_per_s"] / stock["decode_tokens_per_s"]
        row["cpu"], row["dtype"], row["mode"] = cpu_name(), args.dtype, "compiled" if args.compiled else "eager"
    print(f"\n{cpu_name()}, {args.dtype}, {'compiled' if args.compiled else 'eager'}; decoding tokens/s, best of "
          f"{args.repeats}, ratio to stock vLLM in the same run\n")
    print("| model | prompt | requests | " + " | ".join(ENGINES) + " |\n| --- | --- | --- |" + " --- |" * len(ENGINES))
    for model in dict.fromkeys(r["model"] for r in rows):
        for prompt in dict.fromkeys(r["prompt_tokens"] for r in rows if r["model"] == model):
            cells = [r for r in rows if r["model"] == model and r["prompt_tokens"] == prompt]
            print(f"| {model} | {prompt} | {cells[0]['requests']} | "
                  + " | ".join(f"{r['decode_tokens_per_s']:.0f} ({r['vs_stock']:.2f}x)" for r in cells) + " |")
    if args.output:
        write_rows(args.output, rows)


if __name__ == "__main__":
    main()
