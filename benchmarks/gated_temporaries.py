"""What vLLM's profile run counts for the gated model's streaming branch: its peak memory per layer, measured.

On CUDA, vLLM sizes the KV cache from the peak memory of one forward of `max_num_batched_tokens` tokens without
attention metadata. There the gated model's compressed heads attend as the largest step of that many tokens would
(`kept_attention.worst_step_attention`: decoding rows up to `max_num_seqs`, then the most prompt bands), so their
temporaries are taken off the cache before it is allocated. This script measures that peak with torch's MemTracker
(every tensor alive at once, beyond the layer's inputs) at the Qwen2.5-7B layout (4 KV heads, 28 query heads,
head size 128, bfloat16), for the token-exact rule (16 sinks + 64 recent: the embedded profile) and the official
blocks (one sink block and the last two, of 128 tokens), at several step sizes and batch limits, and sets it beside
the step's own keys and values, beside the output of the same layer's MLP gate and up projections (`T x 2 x 18944`
in bfloat16, what the profile run already holds at another moment of the layer) and beside the square mask the
branch used before the bands (scores in float32 for every query head: `28 * T * T * 4` bytes); those three by
arithmetic.

Measured on the CPU: CPU kernels; on a GPU the profile run measures whatever its kernels allocate, the point of it.

    python benchmarks/gated_temporaries.py          # about 25 s on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from kvpress_rl.engines.vllm.gated import streaming_cache
from kvpress_rl.engines.vllm.kept_attention import most_prompt_blocks, worst_step_attention
from kvpress_rl.sampling import GatedBranch

KV_HEADS, GROUP, HEAD_SIZE, INTERMEDIATE = 4, 7, 128, 18944  # Qwen2.5-7B (DeepSeek-R1-Distill-Qwen-7B)
RULES = {"token 16 + 64": GatedBranch(sink=16, window=64, mask="token"),
         "official blocks of 128": GatedBranch(sink=16, window=64, mask="block")}
MiB = 2**20


def peak_bytes(tokens: int, max_requests: int, branch: GatedBranch) -> int:
    """The most bytes alive at once in the profile run's streaming branch of one layer, beyond its inputs."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, KV_HEADS * GROUP, HEAD_SIZE, generator=generator, dtype=torch.bfloat16)
    key, value = torch.randn(2, tokens, KV_HEADS, HEAD_SIZE, generator=generator, dtype=torch.bfloat16)
    output = torch.empty_like(query)
    tracker = MemTracker()
    with tracker:
        worst_step_attention(query, key, value, output, streaming_cache(branch), HEAD_SIZE**-0.5, max_requests, True)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="2048,4096,8192", help="step sizes (vLLM's max_num_batched_tokens)")
    parser.add_argument("--max-num-seqs", default="64,256", help="vLLM's max_num_seqs")
    args = parser.parse_args(argv)
    steps = [int(t) for t in args.tokens.split(",")]
    batches = [int(b) for b in args.max_num_seqs.split(",")]
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| rule | step tokens | max_num_seqs | bands | peak MiB | x the step's K and V | x the MLP's gate and up "
          "| square mask MiB |")
    print("|---|---|---|---|---|---|---|---|")
    began = time.perf_counter()
    for rule, branch in RULES.items():
        for tokens in steps:
            step_kv = 2 * tokens * KV_HEADS * HEAD_SIZE * 2
            square = KV_HEADS * GROUP * tokens * tokens * 4
            mlp = tokens * 2 * INTERMEDIATE * 2
            for batch in batches:
                peak = peak_bytes(tokens, batch, branch)
                print(f"| {rule} | {tokens} | {batch} | {most_prompt_blocks(tokens, batch)} | {peak / MiB:.0f} | "
                      f"{peak / step_kv:.1f} | {peak / mlp:.2f} | {square / MiB:.0f} |", flush=True)
    print(f"({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
