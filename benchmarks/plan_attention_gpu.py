"""The compressed heads' decoding attention on a GPU (no vLLM needed): checked against dense masked attention, and
timed against plain full attention over the whole context, at the Qwen2.5-7B layout (4 KV heads of 128, 7 query
heads each), for batches of 32 and 128 requests at an 8k context.

    python benchmarks/plan_attention_gpu.py                    # on the device: at most a few minutes
    python benchmarks/plan_attention_gpu.py --smoke --device cpu  # the same code at a toy size (CI-sized)
    python benchmarks/plan_attention_gpu.py --gated             # RLKV's rollouts: 64 at 1k, 4k and 7k tokens

With `--gated`, the gated model's decoding step of one layer (`engines/vllm/gated.py`: every head's full branch, here
SDPA over the contiguous cache, and its streaming branch over the kept rows, mixed by random gates) against plain full
attention: what the streaming branch adds to a rollout's attention.

Compressed: `paged_rows.PagedRows.read` then `kept_attention.decode_over_kept`, the code the vLLM plugin runs for a
layer's compressed heads, reading 81 rows a head from a paged cache whose blocks are shuffled (as vLLM's are).
Full: `scaled_dot_product_attention` over a contiguous `[R, 4, L, 128]` cache (the lower bound of any paged
kernel), one query a request. Prints the error against the reference and milliseconds per layer step; a line per
setting.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvpress_rl.engines.vllm.kept_attention import decode_over_kept, kept_positions
from kvpress_rl.engines.vllm.paged_rows import PagedRows
from kvpress_rl.executor.gated import mix_branches

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


@dataclass
class LayerStep:
    """One layer's decoding step at the Qwen2.5-7B layout: a paged cache of shuffled blocks with each request's kept
    slots (what the compressed heads read), the same context as a contiguous cache (what full attention reads), and
    the step's queries."""

    kv: PagedRows
    rows: torch.Tensor
    slots: torch.Tensor  # [R, K]
    valid: torch.Tensor  # [R, K]
    query: torch.Tensor  # [R, H * G, D]
    full_keys: torch.Tensor  # [R, H, L + 1, D]
    full_values: torch.Tensor
    scale: float = DIM**-0.5

    @classmethod
    def random(cls, requests: int, context: int, device: str, dtype: torch.dtype) -> LayerStep:
        generator = torch.Generator(device="cpu").manual_seed(0)
        blocks = requests * -(-(context + 1) // BLOCK) + 1
        table = (torch.randperm(blocks - 1, generator=generator) + 1).view(requests, -1).to(device)  # 0: null block
        rows = torch.randn(KV_HEADS * blocks * BLOCK, 2 * DIM, generator=generator).to(device, dtype)
        # each head's region, as the plugin sees vLLM's allocation (a layer-outer layout)
        kv = PagedRows(rows=rows, base=torch.arange(KV_HEADS, device=device) * blocks * BLOCK,
                       block_rows=torch.full((KV_HEADS,), BLOCK, device=device), slot_rows=1, block_size=BLOCK,
                       plain=True)
        positions, valid = kept_positions(torch.full((requests,), context, device=device), SINK, WINDOW)
        slots = table.gather(1, positions // BLOCK) * BLOCK + positions % BLOCK
        query = torch.randn(requests, KV_HEADS * GROUP, DIM, generator=generator).to(device, dtype)
        full_keys, full_values = (
            torch.randn(requests, KV_HEADS, context + 1, DIM, generator=generator).to(device, dtype) for _ in range(2))
        return cls(kv, rows, slots, valid, query, full_keys, full_values)

    def compressed(self) -> torch.Tensor:
        """What the plugin runs for a decoding step of a layer's compressed heads: one gather, one batched attention."""
        keys, values = self.kv.read(self.kv.index(self.slots[None]).transpose(0, 1))  # [R, C, K, D]
        return decode_over_kept(keys, values, self.query, self.valid, self.scale, GROUP)

    def compressed_reference(self) -> torch.Tensor:
        """Dense masked attention over the kept rows, in float32."""
        requests = self.query.shape[0]
        kept = self.rows[self.kv.base[None, :, None] + self.slots[:, None, :]]
        keys, values = kept[..., :DIM].float(), kept[..., DIM:].float()
        return F.scaled_dot_product_attention(self.query.view(requests, KV_HEADS, GROUP, DIM).float(), keys, values,
                                              attn_mask=self.valid[:, None, None, :],
                                              scale=self.scale).view(requests, KV_HEADS * GROUP, DIM)

    def full(self) -> torch.Tensor:
        """Plain full attention of every head over the contiguous cache, `[R, H * G, D]`."""
        q = self.query.view(self.query.shape[0], KV_HEADS * GROUP, 1, DIM)
        out = F.scaled_dot_product_attention(q, self.full_keys, self.full_values, scale=self.scale, enable_gqa=True)
        return out.view_as(self.query)

    def gated(self, gates: torch.Tensor) -> torch.Tensor:
        """The gated model's step (`engines/vllm/gated.py`): every head's full branch and streaming branch, mixed."""
        return mix_branches(self.full(), self.compressed().to(self.query.dtype), gates, groups=GROUP, axis=-2)


def check(requests: int, context: int, device: str, dtype: torch.dtype, repeats: int) -> str:
    step = LayerStep.random(requests, context, device, dtype)
    error = (step.compressed() - step.compressed_reference()).abs().max().item()
    full_ms = timed(step.full, device, repeats)
    kept_ms = timed(step.compressed, device, repeats)
    return (f"R={requests} L={context}: max |error| {error:.2e}; full attention {full_ms:.3f} ms, "
            f"compressed heads {kept_ms:.3f} ms ({full_ms / kept_ms:.1f}x faster per layer with every head compressed)")


def check_gated(requests: int, context: int, device: str, dtype: torch.dtype, repeats: int) -> str:
    """RLKV's rollouts: the gated model's decoding attention of one layer against plain full attention."""
    step = LayerStep.random(requests, context, device, dtype)
    gates = torch.rand(KV_HEADS, generator=torch.Generator().manual_seed(1)).to(device)
    alpha = gates.repeat_interleave(GROUP).view(-1, 1)
    reference = alpha * step.full().float() + (1 - alpha) * step.compressed_reference()
    error = (step.gated(gates).float() - reference).abs().max().item()
    full_ms = timed(step.full, device, repeats)
    gated_ms = timed(lambda: step.gated(gates), device, repeats)
    return (f"R={requests} L={context}: max |error| {error:.2e}; full attention {full_ms:.3f} ms, "
            f"gated (full + streaming, mixed) {gated_ms:.3f} ms ({gated_ms / full_ms:.2f}x full attention's time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: batch 2 and 4 at 300 tokens")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--gated", action="store_true",
                        help="the gated model of RLKV's rollouts instead: 64 rollouts at 1k, 4k and 7k tokens")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.gated:
        settings = [(2, 300), (4, 300)] if args.smoke else [(64, 1024), (64, 4096), (64, 7168)]
    else:
        settings = [(2, 300), (4, 300)] if args.smoke else [(32, 8192), (128, 8192)]
    measure = check_gated if args.gated else check
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device_name}, torch {torch.__version__}, {args.dtype}")
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    for requests, context in settings:
        line = measure(requests, context, args.device, dtype, 3 if args.smoke else args.repeats)
        print(line, flush=True)
        if float(line.split("max |error| ")[1].split(";")[0]) > tolerance:
            raise SystemExit(f"the {'gated' if args.gated else 'compressed heads'}' attention is off the reference by "
                             f"more than {tolerance}")


if __name__ == "__main__":
    main()
