"""Executor benchmark: measured KV memory against the plan, decode speed-up against its bound.

A random-weight model with the head layout of Qwen2.5-0.5B (14 query heads, 2 KV heads, head dim
64, hidden 896, intermediate 4864, vocabulary 151936; `--layers` of them), of SmolLM2-135M (`--layout
smollm2-135m --layers 30`: the embedded model's shape, where short sequences show the executor's own
overhead), or of Qwen2.5-7B (`--layout qwen2.5-7b`, for a GPU). Decoding starts from a
cache filled with random keys and values of the right shape (decode speed does not depend on what
the cache holds); one real prefill per length is timed separately. Every ratio compares numbers
measured in the same run.

    python benchmarks/executor.py                 # the full table (CPU: about 15 minutes)
    python benchmarks/executor.py --quick         # 1k and 4k only, batch 1
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpress_rl.executor import HeadwiseCache, compressed
from kvpress_rl.models import ModelShape, cache_kwargs, random_model, small_config
from kvpress_rl.plan import CompressionPlan, plan_from_scores
from kvpress_rl.policies import Streaming

LAYOUTS = {  # public head layouts: the Qwen2.5 family, and SmolLM2-135M (the embedded model's base, a Llama)
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, head_dim=128, tie_word_embeddings=False),
}


def layout_model(layout: str, layers: int, dtype: torch.dtype, device: str):
    fields = dict(LAYOUTS[layout])
    config = small_config(fields.pop("arch", "qwen2"), num_hidden_layers=layers, max_position_embeddings=131072,
                          **fields)
    with torch.device(device):
        return random_model(config, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight except the input embedding (a gather, not a read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel() * embedding.element_size()


def random_kv(cache, batch: int, seq_len: int, shape: ModelShape, dtype: torch.dtype, device: str,
              seed: int = 0) -> None:
    """Fill `cache` as if `seq_len` tokens had been prefilled (compressed heads cut to their budget)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer_idx in range(shape.num_layers):
        size = (batch, shape.num_kv_heads, seq_len, shape.head_dim)
        keys = torch.randn(size, generator=generator, device=device, dtype=dtype)
        values = torch.randn(size, generator=generator, device=device, dtype=dtype)
        cache.update(keys, values, layer_idx)
        if isinstance(cache, HeadwiseCache):
            cache.layers[layer_idx].compress()


def time_decode(model, cache, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    """Decode tokens per second (batch x steps / seconds), median of per-step times."""
    device = str(model.device)
    ids = torch.randint(0, 1000, (batch, 1), device=device)
    times = []
    with torch.inference_mode():
        for step in range(warmup + steps):
            position = torch.full((batch, 1), seq_len + step, device=device)
            synchronize(device)
            start = time.perf_counter()
            model(input_ids=ids, position_ids=position, **cache_kwargs(model, cache), use_cache=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times[warmup:])


def time_prefill(model, plan: CompressionPlan, seq_len: int) -> float:
    device = str(model.device)
    ids = torch.randint(0, 1000, (1, seq_len), device=device)
    with torch.inference_mode(), compressed(model, plan) as session:
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, **cache_kwargs(model, session.new_cache()), use_cache=True)
        synchronize(device)
        return time.perf_counter() - start


HEADER = ("len", "batch", "s", "heads_cmp", "kv_measured", "kv_ideal", "kv_full", "meas/ideal", "tok/s", "speedup",
          "bound", "speedup/bound", "vs_sdpa", "prefill_ratio")


@dataclass
class Bench:
    """The model under test and what every cell of the table shares."""

    model: torch.nn.Module
    shape: ModelShape
    weights: int  # bytes of weights read per decode step
    scores: torch.Tensor
    dtype: torch.dtype
    args: argparse.Namespace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="qwen2.5-0.5b", choices=sorted(LAYOUTS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--sparsities", default="0,0.2,0.4,0.6,0.8")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-prefill", action="store_true", help="skip the real prefill timings")
    parser.add_argument("--quick", action="store_true", help="lengths 1k and 4k, batch 1")
    parser.add_argument("--output", default="benchmarks/results/executor.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.batches = "1024,4096", "1"
    return args


@dataclass
class Reference:
    """What every plan at one cache length and batch is compared with."""

    seq_len: int
    batch: int
    sdpa_speed: float  # decode tokens/s of the plain model with its own cache
    prefill: float | None  # prefill seconds at sparsity 0 (None: not timed)
    speed: float | None = None  # decode tokens/s of the first sparsity measured


def measure_cell(bench: Bench, plan: CompressionPlan, sparsity: float, ref: Reference) -> dict:
    """One row: the plan's cache bytes against the ideal and the full cache, its decode speed and prefill time."""
    args, shape, dtype = bench.args, bench.shape, bench.dtype
    seq_len, batch = ref.seq_len, ref.batch
    with compressed(bench.model, plan) as session:
        cache = session.new_cache()
        random_kv(cache, batch, seq_len, shape, dtype, args.device)
        measured = cache.nbytes()
        speed = time_decode(bench.model, cache, batch, seq_len, args.steps, args.warmup)
    del cache
    ideal = plan.kv_bytes(seq_len, batch, head_dim=shape.head_dim, dtype=dtype)
    full = plan.full_kv_bytes(seq_len, batch, head_dim=shape.head_dim, dtype=dtype)
    ref.speed = ref.speed or speed
    base_speed, sdpa_speed = ref.speed, ref.sdpa_speed
    bound = (bench.weights + full) / (bench.weights + ideal)
    prefill = None if args.no_prefill else time_prefill(bench.model, plan, seq_len) / ref.prefill
    return dict(seq_len=seq_len, batch=batch, sparsity=sparsity, compressed_heads=plan.num_compressed,
                kv_measured=measured, kv_ideal=ideal, kv_full=full, measured_over_ideal=measured / ideal,
                decode_tok_s=speed, speedup=speed / base_speed, bound=bound,
                speedup_over_bound=(speed / base_speed) / bound,
                vs_sdpa=speed / sdpa_speed,  # against the plain model with its own cache, every sparsity
                sdpa_tok_s=sdpa_speed, prefill_ratio=prefill if prefill is not None else float("nan"))


def print_row(row: dict) -> None:
    r = row
    print(f"{r['seq_len']:>12} {r['batch']:>12} {r['sparsity']:>12.1f} {r['compressed_heads']:>12} "
          f"{r['kv_measured']:>12} {r['kv_ideal']:>12} {r['kv_full']:>12} {r['measured_over_ideal']:>12.4f} "
          f"{r['decode_tok_s']:>12.1f} {r['speedup']:>12.2f} {r['bound']:>12.2f} {r['speedup_over_bound']:>12.2f} "
          f"{r['vs_sdpa']:>12.2f} {r['prefill_ratio']:>12.2f}", flush=True)


def measure_length(bench: Bench, seq_len: int) -> list[dict]:
    """Every batch size and sparsity at one cache length, each against the plain model's SDPA decode."""
    args = bench.args
    sparsities = [float(x) for x in args.sparsities.split(",")]
    plan_at = {s: plan_from_scores(bench.scores, s, Streaming()) for s in sparsities}
    prefill_base = None if args.no_prefill else time_prefill(bench.model, plan_from_scores(bench.scores, 0.0), seq_len)
    rows = []
    for batch in [int(x) for x in args.batches.split(",")]:
        sdpa_cache = DynamicCache()
        random_kv(sdpa_cache, batch, seq_len, bench.shape, bench.dtype, args.device)
        sdpa_speed = time_decode(bench.model, sdpa_cache, batch, seq_len, args.steps, args.warmup)
        del sdpa_cache
        ref = Reference(seq_len=seq_len, batch=batch, sdpa_speed=sdpa_speed, prefill=prefill_base)
        for sparsity, plan in plan_at.items():
            row = measure_cell(bench, plan, sparsity, ref)
            rows.append(row)
            print_row(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = layout_model(args.layout, args.layers, dtype, args.device)
    shape = ModelShape.from_config(model.config)
    scores = torch.rand(shape.num_layers, shape.num_kv_heads, generator=torch.Generator().manual_seed(0))
    bench = Bench(model=model, shape=shape, weights=weight_bytes(model), scores=scores, dtype=dtype, args=args)
    print(f"model: {args.layout} head layout, {args.layers} layers, {shape.num_layers * shape.num_kv_heads} KV heads, "
          f"{args.dtype}, weights read per step {bench.weights / 2**20:.0f} MiB, device {args.device}", flush=True)
    print(" ".join(f"{h:>12}" for h in HEADER), flush=True)
    rows = [row for seq_len in (int(x) for x in args.lengths.split(",")) for row in measure_length(bench, seq_len)]
    write_csv(Path(args.output), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
