"""Serving under a fixed KV budget: how many long requests fit and how fast they finish, the full cache
against head plans at s = 0.5 and 0.8, through the kvpress-rl vLLM plugin; and vLLM against `kvrl eval`'s
transformers path (the executor) on the same batch.

    OMP_NUM_THREADS=2 python benchmarks/serving.py --output benchmarks/results/serving.csv

The KV budget of each model is what `--full-fit` full-cache sequences of `--prompt-tokens + --new-tokens` need, so the
full model is memory-bound: it runs at most that many requests at once. Every request has a random prompt of
`--prompt-tokens` and generates exactly `--new-tokens` (no end of sequence). Models: the embedded one (SmolLM2-135M
with its adapter; plans from the committed RLKV heads) and `qwen2.5-7b-2l`, a random-weight model of Qwen2.5-7B's
layout (28 query / 4 KV heads of 128, hidden 3584, MLP 18944) cut to 2 layers and, to fit this CPU, a 32,768-token
vocabulary (plans from seeded random scores). Ratios are against the full cache of the same model, same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

# the engine core in this process: its scheduler is readable
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvpress_rl.engines.vllm.engine import EngineSettings, VllmGenerator, model_folder  # noqa: E402
from kvpress_rl.engines.vllm.layout import EnginePlan  # noqa: E402
from kvpress_rl.models import ModelShape  # noqa: E402
from kvpress_rl.plan import kv_bytes_of, plan_from_scores  # noqa: E402
from kvpress_rl.scores import HeadScores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RLKV_HEADS = ROOT / "benchmarks" / "results" / "heads-rlkv-embedded-count.safetensors"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor()


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as a CSV at `path`, written to a temporary file first and then renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    with staging.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    staging.rename(path)


def qwen_2layer_folder(root: Path) -> tuple[str, torch.Tensor]:
    from kvpress_rl.models import random_model, small_config

    config = small_config("qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                          intermediate_size=18944, num_hidden_layers=2, vocab_size=32768, max_position_embeddings=32768,
                          rope_theta=1_000_000.0)
    folder = root / "qwen2.5-7b-2l"
    random_model(config, seed=0, dtype=torch.bfloat16).save_pretrained(folder)
    scores = torch.rand((2, 4), generator=torch.Generator().manual_seed(0))
    return str(folder), scores


def kv_bytes_per_token(folder: str, dtype: torch.dtype) -> int:
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(folder))
    return kv_bytes_of(shape.num_layers * shape.num_kv_heads, shape.head_dim, dtype)  # one token, every KV head


def run_engine(folder: str, plan: EnginePlan | None, prompts: list[list[int]], args, budget: int) -> dict:
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    length = args.prompt_tokens + args.new_tokens
    settings = EngineSettings(model=folder, plan=plan, max_model_len=length + 32, dtype=args.dtype,
                              kv_cache_memory_bytes=budget, max_num_seqs=len(prompts))
    with VllmGenerator(settings) as engine:
        core = engine.llm.llm_engine.engine_core.engine_core
        _, reported = get_kv_cache_capacity(core.vllm_config, core.scheduler.kv_cache_config)
        engine.generate(prompts[:2], 8)  # warm-up
        running: list[int] = []
        done = threading.Event()

        def watch() -> None:  # the scheduler's running requests, every 20 ms (the engine core runs in this process)
            while not done.wait(0.02):
                running.append(len(core.scheduler.running))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        began = time.perf_counter()
        outputs = engine.generate(prompts, args.new_tokens)
        seconds = time.perf_counter() - began
        done.set()
        watcher.join()
    generated = sum(len(out.token_ids) for out in outputs)
    busy = [n for n in running if n] or [0]
    return {"fits": max(busy), "mean_running": sum(busy) / len(busy), "reported_concurrency": reported,
            "seconds": seconds, "tokens_per_s": generated / seconds}


def run_executor(folder: str, plan, prompts: list[list[int]], args) -> dict:
    """`kvrl eval`'s transformers path: the executor's `generate` on the same prompts, one batch."""
    from transformers import AutoModelForCausalLM

    from kvpress_rl.executor import generate

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        generate(model, plan, ids[:2, :64], max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
        began = time.perf_counter()
        out = generate(model, plan, ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False)
        seconds = time.perf_counter() - began
    return {"fits": len(prompts), "mean_running": len(prompts), "reported_concurrency": float("nan"),
            "seconds": seconds, "tokens_per_s": (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,qwen2.5-7b-2l")
    parser.add_argument("--sparsities", default="0,0.5,0.8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--full-fit", type=int, default=4, help="full-cache sequences the KV budget holds")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--executor-batch", type=int, default=16,
                        help="requests of the engine-vs-transformers comparison (0: skip)")
    parser.add_argument("--output", type=Path, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            if name == "embedded":
                folder, scores = model_folder("embedded"), HeadScores.load(RLKV_HEADS)
            else:
                folder, scores = qwen_2layer_folder(Path(scratch))
            vocab = 32768 if name != "embedded" else 49152
            generator = torch.Generator().manual_seed(0)
            prompts = torch.randint(100, vocab, (args.requests, args.prompt_tokens), generator=generator).tolist()
            full_sequence = (args.prompt_tokens + args.new_tokens + 32) * kv_bytes_per_token(folder, dtype)
            budget = int(args.full_fit * full_sequence * 1.02)
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                plan = None if sparsity == 0 else plan_from_scores(scores, sparsity)
                engine_plan = None if plan is None else EnginePlan.from_plan(plan)
                result = run_engine(folder, engine_plan, prompts, args, budget)
                rows.append({"model": name, "engine": "vllm", "sparsity": sparsity, "requests": args.requests,
                             "kv_mib": budget / 2**20, **result})
                print(rows[-1], flush=True)
                if name == "embedded" and args.executor_batch and sparsity == 0.5:
                    # the same batch through both, every request running at once (a budget that holds them all)
                    batch = prompts[: args.executor_batch]
                    roomy = int(budget * args.executor_batch / args.full_fit)
                    for engine in ("vllm (batch)", "transformers (batch)"):
                        result = (run_engine(folder, engine_plan, batch, args, roomy) if engine.startswith("vllm")
                                  else run_executor(folder, plan, batch, args))
                        rows.append({"model": name, "engine": engine, "sparsity": sparsity, "requests": len(batch),
                                     "kv_mib": roomy / 2**20, **result})
                        print(rows[-1], flush=True)
    for row in rows:
        full = next(r for r in rows if r["model"] == row["model"] and r["engine"] == "vllm" and r["sparsity"] == 0)
        if row["engine"] != "vllm":  # the batch comparison: against the engine on the same batch
            full = next(r for r in rows if r["model"] == row["model"] and r["engine"] == "vllm (batch)")
        row["fits_vs_full"] = row["mean_running"] / full["mean_running"]
        row["tokens_per_s_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["cpu"] = cpu_name()
        row["dtype"] = args.dtype
    print(f"\n{cpu_name()}, {args.dtype}, {args.requests} requests of {args.prompt_tokens} + {args.new_tokens} tokens, "
          f"KV budget = {args.full_fit} full sequences\n")
    print("| model | engine | sparsity | running at once (max) | mean | vs full | tokens/s | vs full |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['engine']} | {row['sparsity']:g} | {row['fits']} | {row['mean_running']:.1f} | "
              f"{row['fits_vs_full']:.2f} | {row['tokens_per_s']:.1f} | {row['tokens_per_s_vs_full']:.2f} |")
    if args.output:
        write_rows(args.output, rows)


if __name__ == "__main__":
    main()
