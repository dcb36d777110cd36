"""The compressed heads' decoding attention on a GPU (no vLLM needed): checked against dense masked attention, and
timed against plain full attention over the whole context, at the Qwen2.5-7B layout (4 KV heads of 128, 7 query
heads each), for batches of 32 and 128 requests at an 8k context.

    python benchmarks/plan_attention_gpu.py                    # on the device: at most a few minutes
    python benchmarks/plan_attention_gpu.py --smoke --device cpu  # the same code at a toy size (CI-sized)

Compressed: `paged_rows.PagedRows.read` then `kept_attention.decode_over_kept`, the code the vLLM plugin runs for a
layer's compressed heads, reading 81 rows a head from a paged cache whose blocks are shuffled (as vLLM's are).
Full: `scaled_dot_product_attention` over a contiguous `[R, 4, L, 128]` cache (the lower bound of any paged
kernel), one query a request. Prints the error against the reference and milliseconds per layer step; a line per
setting.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kvpress_rl.engines.vllm.kept_attention import decode_over_kept, kept_positions
from kvpress_rl.engines.vllm.paged_rows import PagedRows

KV_HEADS, GROUP, DIM, SINK, WINDOW, BLOCK = 4, 7, 128, 16, 64, 16


def timed(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats * 1e3


def compressed_heads(kv: PagedRows, slots: torch.Tensor, query: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """What the plugin runs for a decoding step of a layer's compressed heads: one gather, one batched attention."""
    keys, values = kv.read(kv.index(slots[None]).transpose(0, 1))  # [R, C, K, D]
    return decode_over_kept(keys, values, query, valid, scale, GROUP)


def check(requests: int, context: int, device: str, dtype: torch.dtype, repeats: int) -> str:
    generator = torch.Generator(device="cpu").manual_seed(0)
    blocks = requests * -(-(context + 1) // BLOCK) + 1
    table = (torch.randperm(blocks - 1, generator=generator) + 1).view(requests, -1).to(device)  # block 0: null block
    rows = torch.randn(KV_HEADS * blocks * BLOCK, 2 * DIM, generator=generator).to(device, dtype)
    # each head's region, as the plugin sees vLLM's allocation (a layer-outer layout)
    kv = PagedRows(rows=rows, base=torch.arange(KV_HEADS, device=device) * blocks * BLOCK,
                   block_rows=torch.full((KV_HEADS,), BLOCK, device=device), slot_rows=1, block_size=BLOCK, plain=True)
    computed = torch.full((requests,), context, device=device)
    positions, valid = kept_positions(computed, SINK, WINDOW)
    slots = table.gather(1, positions // BLOCK) * BLOCK + positions % BLOCK  # [R, K]
    query = torch.randn(requests, KV_HEADS * GROUP, DIM, generator=generator).to(device, dtype)
    scale = DIM**-0.5

    out = compressed_heads(kv, slots, query, valid, scale)
    kept = rows[kv.base[None, :, None] + slots[:, None, :]]  # the reference: dense attention over the kept rows
    keys, values = kept[..., :DIM].float(), kept[..., DIM:].float()
    reference = F.scaled_dot_product_attention(query.view(requests, KV_HEADS, GROUP, DIM).float(), keys, values,
                                               attn_mask=valid[:, None, None, :], scale=scale).view_as(out)
    error = (out - reference).abs().max().item()

    full_keys = torch.randn(requests, KV_HEADS, context + 1, DIM, generator=generator).to(device, dtype)
    full_values = torch.randn(requests, KV_HEADS, context + 1, DIM, generator=generator).to(device, dtype)
    q4 = query.view(requests, KV_HEADS * GROUP, 1, DIM)
    full_ms = timed(lambda: F.scaled_dot_product_attention(q4, full_keys, full_values, scale=scale, enable_gqa=True),
                    device, repeats)
    kept_ms = timed(lambda: compressed_heads(kv, slots, query, valid, scale), device, repeats)
    return (f"R={requests} L={context}: max |error| {error:.2e}; full attention {full_ms:.3f} ms, "
            f"compressed heads {kept_ms:.3f} ms ({full_ms / kept_ms:.1f}x faster per layer with every head compressed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: batch 2 and 4 at 300 tokens")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    settings = [(2, 300), (4, 300)] if args.smoke else [(32, 8192), (128, 8192)]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device_name}, torch {torch.__version__}, {args.dtype}")
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    for requests, context in settings:
        line = check(requests, context, args.device, dtype, 3 if args.smoke else args.repeats)
        print(line, flush=True)
        if float(line.split("max |error| ")[1].split(";")[0]) > tolerance:
            raise SystemExit(f"the compressed heads' attention is off the reference by more than {tolerance}")


if __name__ == "__main__":
    main()
