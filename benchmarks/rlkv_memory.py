"""Peak memory of one RLKV learner backward, measured on the CPU, and projected to the R1-Distill models on a GPU.

The expensive part of an RLKV step is the teacher-forced backward over gated attention
(`RLKV.policy_backward`): the frozen model runs forward and backward over every rollout so that
gradients reach the [layers, KV heads] gates. This script measures its peak memory on a random-weight
model with the Qwen2.5-7B layout (hidden 3584, 28 query / 4 KV heads, intermediate 18944, vocabulary
152064) cut to 1 and 2 decoder layers, bfloat16 (the CPU has AMX-BF16), one sequence of 1,024 and
2,048 tokens (128 of them prompt), with and without activation checkpointing: 8 configurations, each
in a fresh subprocess. Memory: the peak resident set (VmHWM, reset through /proc/self/clear_refs
after the model is built and the heap trimmed) minus the resident set just before the backward, with
glibc told to map every allocation over 64 KiB on its own and unmap it when freed, so that the resident
set follows the live tensors.

From the 8 numbers it fits, per checkpointing mode, `bytes = C + layers * T * s(T) + (T - prompt) * h`
with `s(T) = s0 + s1 * T` (T tokens in the micro-batch, one row): s is what each decoder layer keeps per
token (s1: what grows with the row's length, e.g. masks), h what the output head keeps per completion
token (full-vocabulary logits, their float copy and log-softmax), C a constant. It then projects the peak GPU
memory and the step time of DeepSeek-R1-Distill-Qwen-1.5B, -Qwen-7B and -Llama-8B at the paper's settings; the
assumptions are printed next to the table.

    python benchmarks/rlkv_memory.py            # about 2.5 minutes on 2 cores
    python benchmarks/rlkv_memory.py --quick    # 512 and 1,024 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30
PROMPT = 128
MEASURED_LAYOUT = "qwen2.5-7b"


# --- one measurement, in its own process ----------------------------------------------------------
def child(layers: int, seq_len: int, checkpointing: bool) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from rlkv_step import build_model, current_bytes, make_learner, peak_bytes, policy_backward, reset_peak

    from kvpress_rl.executor.gated import new_gates

    torch.manual_seed(0)
    model = build_model(MEASURED_LAYOUT, layers, torch.bfloat16, "cpu")
    # one sequence measured: the options need G >= 2, the backward is called with a group of 1 (last argument)
    learner = make_learner(group_size=2, micro_batch_tokens=seq_len, gradient_checkpointing=checkpointing)
    learner.resolve(model)
    o = learner.options
    gates = new_gates(model, 1.0)
    sequences = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(sequences)
    advantages, rewards = torch.tensor([1.0]), torch.tensor([1.0])
    reset_peak("cpu")
    base = current_bytes("cpu")
    began = time.perf_counter()
    stats = policy_backward(learner, model, gates, sequences, mask, PROMPT, advantages, rewards, o.sink, o.window, 1)
    seconds = time.perf_counter() - began
    peak = peak_bytes("cpu")
    return dict(layers=layers, seq_len=seq_len, checkpointing=checkpointing, base_bytes=base, peak_bytes=peak,
                delta_bytes=peak - base, seconds=seconds,
                grad_nonzero=bool(gates.grad is not None and gates.grad.abs().sum() > 0), train_mask=o.train_mask,
                sink=o.sink, window=o.window, micro_batches=stats.get("micro_batches"), torch=torch.__version__,
                threads=torch.get_num_threads())


def measure(layers: int, seq_len: int, checkpointing: bool, timeout: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps([layers, seq_len, checkpointing])]
    # glibc: every allocation over 64 KiB its own mapping, returned to the system when freed, so the resident
    # set follows the live tensors (otherwise freed heap is reused without raising the resident set)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise SystemExit(f"measurement {layers} layers, {seq_len} tokens, checkpointing {checkpointing} failed:\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the fit ------------------------------------------------------------------------------------
@dataclass
class Fit:
    """`bytes = C + layers * T * (s0 + s1 * T) + (T - prompt) * h` for one checkpointing mode (one row of T tokens)."""

    C: float
    h: float
    s0: float
    s1: float

    def per_layer(self, row: float) -> float:
        return self.s0 + self.s1 * row


def fit(rows: list[dict], checkpointing: bool) -> Fit:
    got = {(r["layers"], r["seq_len"]): r["delta_bytes"] for r in rows if r["checkpointing"] == checkpointing}
    (t1, t2) = sorted({t for _, t in got})
    (l1, l2) = sorted({n for n, _ in got})
    s = {t: (got[(l2, t)] - got[(l1, t)]) / ((l2 - l1) * t) for t in (t1, t2)}
    s1 = (s[t2] - s[t1]) / (t2 - t1)
    s0 = s[t1] - s1 * t1
    # C + (T - prompt) * h: the head sees the completion only
    rest = {t: got[(l1, t)] - t * l1 * s[t] for t in (t1, t2)}
    h = (rest[t2] - rest[t1]) / (t2 - t1)
    return Fit(C=rest[t1] - h * (t1 - PROMPT), h=h, s0=s0, s1=s1)


# --- projection ---------------------------------------------------------------------------------
@dataclass
class Arch:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 128
    qkv_bias: bool = True

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        bias = self.head_dim * (self.heads + 2 * self.kv_heads) if self.qkv_bias else 0
        return attn + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden  # untied embedding and head

    @property
    def matmul_params(self) -> int:  # what every token multiplies through (the embedding is a gather)
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def activation_units(self) -> int:
        """Elements a decoder layer keeps per token for the backward, to scale the measured s0 between layouts:
        norms and residuals (4 h), q / two attention outputs / their mix (4 H d), k and v (2 KV d), gate, up,
        activation and product (4 I)."""
        attention = 4 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
        return 4 * self.hidden + attention + 4 * self.intermediate

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * 2  # keys and values, bf16


QWEN7B = Arch("Qwen2.5-7B layout", 28, 3584, 28, 4, 18944, 152064)
MODELS = [
    Arch("R1-Distill-Qwen-1.5B", 28, 1536, 12, 2, 8960, 151936),
    Arch("R1-Distill-Qwen-7B", 28, 3584, 28, 4, 18944, 152064),
    Arch("R1-Distill-Llama-8B", 32, 4096, 32, 8, 14336, 128256, qkv_bias=False),
]
GPUS = {"H100 SXM 80GB": (989e12, 3.35e12), "A100 80GB": (312e12, 2.0e12)}  # dense bf16 FLOP/s, HBM bytes/s

# the paper's step
PROMPTS, SAMPLES, NEW_TOKENS, PROMPT_TOKENS, MICRO_BATCH_TOKENS, ROLLOUT_BATCH = 32, 4, 7168, 256, 7680, 8
MFU, BANDWIDTH_EFFICIENCY, LAUNCH_S_PER_LAYER = 0.40, 0.60, 0.6e-3


def activation_bytes(arch: Arch, fit: Fit, checkpointing: bool, tokens: int, completion: int, row: int) -> float:
    """Backward memory over the weights for a micro-batch of `tokens` tokens (`completion` of them completions)
    in rows of `row` tokens, from the CPU fit of the 7B layout scaled to `arch`: what a layer keeps per token by
    `activation_units` (without checkpointing) or by hidden (with: the layer's input), the head by the
    vocabulary, the constant by the output matrix; `s1` (masks: one per row, whatever the width) unscaled."""
    k_layer = arch.activation_units / QWEN7B.activation_units if not checkpointing else arch.hidden / QWEN7B.hidden
    constant = fit.C * (arch.vocab * arch.hidden) / (QWEN7B.vocab * QWEN7B.hidden)
    layers = arch.layers * tokens * (fit.s0 * k_layer + fit.s1 * row)
    return constant + layers + completion * fit.h * arch.vocab / QWEN7B.vocab


def project(arch: Arch, fits: dict[bool, Fit], checkpointing: bool, whole_groups: bool, gpu: str) -> dict:
    flops, bandwidth = GPUS[gpu]
    row = PROMPT_TOKENS + NEW_TOKENS
    # micro-batch: the official split packs sequences up to 7,680 tokens (one full-length row);
    # whole groups (a group never split) put G full-length rows together when one group exceeds the budget
    rows = max(MICRO_BATCH_TOKENS // row, 1) if not whole_groups else max(MICRO_BATCH_TOKENS // (SAMPLES * row),
                                                                          1) * SAMPLES
    tokens = rows * row
    weights = arch.params * 2
    gates = arch.layers * arch.kv_heads * 4 * 4  # fp32 gates, their gradient and AdamW's two moments
    train = weights + gates + activation_bytes(arch, fits[checkpointing], checkpointing, tokens, rows * NEW_TOKENS, row)
    rows_per_call = ROLLOUT_BATCH * SAMPLES
    kv = rows_per_call * row * arch.kv_bytes_per_token
    decode_logits = rows_per_call * arch.vocab * 4 * 3  # float logits, softmax and sampling buffers of one step
    generate = weights + gates + kv + decode_logits
    # time: rollouts are bound by reading weights + KV per decoded token; the backward by FLOPs
    calls = PROMPTS // ROLLOUT_BATCH
    mean_kv = rows_per_call * (PROMPT_TOKENS + NEW_TOKENS / 2) * arch.kv_bytes_per_token
    per_token_s = (weights + mean_kv) / (bandwidth * BANDWIDTH_EFFICIENCY) + LAUNCH_S_PER_LAYER * arch.layers
    rollout_s = calls * NEW_TOKENS * per_token_s
    trained = PROMPTS * SAMPLES * row
    # forward, input-gradient backward (weights frozen), forward again when recomputed
    passes = 3 if checkpointing else 2
    dense = trained * 2 * arch.matmul_params * passes
    # causal full branch + masked dense streaming branch
    attention_fwd = trained * 6 * row * arch.heads * arch.head_dim * arch.layers
    attention = attention_fwd * (1 + 2.5 + (1 if checkpointing else 0))
    backward_s = (dense + attention) / (flops * MFU)
    return dict(train=train, generate=generate, peak=max(train, generate), weights=weights, kv=kv, tokens=tokens,
                rollout_s=rollout_s, backward_s=backward_s, step_s=rollout_s + backward_s)


# Rollouts in an inference engine (vLLM or SGLang, `kvrl select --rollout-engine vllm`): the whole step's 128 sequences
# decode as one continuous batch (as many at once as the KV cache holds), under CUDA graphs. Assumed, not measured here:
# the decode step reads the weights and the batch's KV cache at ENGINE_BANDWIDTH_EFFICIENCY of the bandwidth (what
# published decode benchmarks of both engines reach at large batches on H100 / A100) plus ENGINE_STEP_S of scheduling
# and sampling; the gated attention costs what full attention costs (the streaming branch reuses its scores).
ENGINE_BANDWIDTH_EFFICIENCY, ENGINE_STEP_S, ENGINE_MEMORY_FRACTION = 0.75, 4e-3, 0.90
# the paper's training cost (A100-hours), SGLang rollouts on one GPU and training on another
OFFICIAL_GPU_HOURS = (22, 40)
STEPS = 186


def project_engine(arch: Arch, gpu: str, memory: float = 80e9) -> dict:
    """Rollout seconds of one step with the engine, and the waves the KV cache forces: sequences that fit at once at the
    full length next to the weights, the step's 128 decoded in `waves` rounds."""
    _, bandwidth = GPUS[gpu]
    rows, row = PROMPTS * SAMPLES, PROMPT_TOKENS + NEW_TOKENS
    weights = arch.params * 2
    fit = max(1, int((memory * ENGINE_MEMORY_FRACTION - weights) // (row * arch.kv_bytes_per_token)))
    concurrent = min(rows, fit)
    waves = -(-rows // concurrent)
    mean_kv = concurrent * (PROMPT_TOKENS + NEW_TOKENS / 2) * arch.kv_bytes_per_token
    per_step_s = (weights + mean_kv) / (bandwidth * ENGINE_BANDWIDTH_EFFICIENCY) + ENGINE_STEP_S
    return dict(concurrent=concurrent, waves=waves, rollout_s=waves * NEW_TOKENS * per_step_s)


def engine_report(fits: dict[bool, Fit]) -> list[str]:
    out = ["", f"### Projected with the rollouts in an engine: {STEPS} steps (the official training), activation "
           "checkpointing on", "",
           "| model | sequences at once (80 GB) | rollouts s, eager (H100) | rollouts s, engine (H100) | backward s "
           "(H100) | step s, engine (H100) | GPU-hours, eager (H100) | GPU-hours, engine (H100) | GPU-hours, engine "
           "(A100) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arch in MODELS:
        eager = project(arch, fits, True, False, "H100 SXM 80GB")
        h100, a100 = project_engine(arch, "H100 SXM 80GB"), project_engine(arch, "A100 80GB")
        a100_backward = project(arch, fits, True, False, "A100 80GB")["backward_s"]
        hours = {name: STEPS * (rollout + backward) / 3600 for name, rollout, backward in (
            ("eager", eager["rollout_s"], eager["backward_s"]), ("h100", h100["rollout_s"], eager["backward_s"]),
            ("a100", a100["rollout_s"], a100_backward))}
        out.append(f"| {arch.name} | {h100['concurrent']} of {PROMPTS * SAMPLES} ({h100['waves']} "
                   f"wave{'s' if h100['waves'] > 1 else ''}) | {eager['rollout_s']:.0f} | {h100['rollout_s']:.0f} | "
                   f"{eager['backward_s']:.0f} | {h100['rollout_s'] + eager['backward_s']:.0f} | {hours['eager']:.0f} "
                   f"| {hours['h100']:.0f} | {hours['a100']:.0f} |")
    out += ["", f"The official training: {OFFICIAL_GPU_HOURS[0]}-{OFFICIAL_GPU_HOURS[1]} A100-hours. Engine "
            f"assumptions (not measured here): decode at {ENGINE_BANDWIDTH_EFFICIENCY:.0%} of the HBM bandwidth "
            "with the whole step in one continuous batch "
            f"(as many full-length sequences as {ENGINE_MEMORY_FRACTION:.0%} of 80 GB holds beside "
            f"the weights), {ENGINE_STEP_S * 1e3:.0f} ms of scheduling and sampling per decode step (CUDA graphs: no "
            "per-layer launches), every rollout at the full length (the worst case), rollouts and backward one after "
            "the other on one GPU, and a gated attention of about one paged full-attention pass a layer (as the "
            "official SGLang fork's Triton backend; kvpress-rl's gated vLLM model: the platform's paged kernel for "
            "the full branch, the 81 kept keys for the streaming branch, not yet run on a GPU: "
            "`benchmarks/plan_attention_gpu.py --gated` checks it). Measured here (2-core CPU): vLLM samples the "
            "gated model's own policy (tests/engines/vllm/test_gated.py) at 1.48x the learner's rollout tokens/s "
            "(benchmarks/README.md), which says nothing of a GPU's speed."]
    return out


# --- printing -----------------------------------------------------------------------------------
def gib(value: float) -> str:
    return f"{value / GiB:.1f}"


def measured_section(rows: list[dict], fits: dict[bool, Fit]) -> list[str]:
    """The measured backwards, one row each, and the fit through them."""
    out = ["### Measured (CPU, one learner backward, one sequence)", "",
           "| layers | tokens | checkpointing | peak RSS - RSS before (MiB) | MiB per 1k tokens | seconds "
           "| gate gradient |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["checkpointing"], r["layers"], r["seq_len"])):
        out.append(f"| {r['layers']} | {r['seq_len']} | {'on' if r['checkpointing'] else 'off'} | "
                   f"{r['delta_bytes'] / 2**20:.0f} | {r['delta_bytes'] / 2**20 / r['seq_len'] * 1000:.0f} | "
                   f"{r['seconds']:.1f} | {'non-zero' if r['grad_nonzero'] else 'ZERO'} |")
    first = rows[0]
    out += ["", f"Random-weight {MEASURED_LAYOUT} layout, bfloat16 weights and activations, fp32 gates, torch "
            f"{first['torch']}, {first['threads']} threads, {first['train_mask']} mask {first['sink']} + "
            f"{first['window']}, prompt {PROMPT} tokens.", "",
            "### Fit: bytes = C + layers x T x (s0 + s1 x T) + (T - prompt) x h", "",
            "| checkpointing | s0: per layer, KiB/token | s1 x 7,424: KiB/token at a 7,424-token row "
            "| h: head, KiB per completion token | C: constant, MiB |",
            "| --- | --- | --- | --- | --- |"]
    for mode in (False, True):
        f = fits[mode]
        out.append(f"| {'on' if mode else 'off'} | {f.s0 / 1024:.1f} | {f.s1 * 7424 / 1024:.2f} | {f.h / 1024:.0f} "
                   f"| {f.C / 2**20:.0f} |")
    return out


def projection_section(fits: dict[bool, Fit]) -> list[str]:
    """One RLKV step of each model projected from the fit, and the assumptions behind it."""
    out = ["", f"### Projected: one RLKV step on one GPU ({PROMPTS} prompts x {SAMPLES} samples, up to "
           f"{NEW_TOKENS:,} new tokens)", "",
            "| model | checkpointing | micro-batch | tokens / micro-batch | weights GiB | rollouts: KV GiB | rollout "
            "peak GiB | backward peak GiB | **peak GiB** | < 80 GB | rollouts s (H100) | backward s (H100) | step s "
            "(H100) | step s (A100) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arch in MODELS:
        for mode in (True, False):
            for whole in (False, True):
                h100 = project(arch, fits, mode, whole, "H100 SXM 80GB")
                a100 = project(arch, fits, mode, whole, "A100 80GB")
                out.append(f"| {arch.name} | {'on' if mode else 'off'} | "
                           f"{'whole groups' if whole else 'official (sequences)'} | {h100['tokens']:,} | "
                           f"{gib(h100['weights'])} | {gib(h100['kv'])} | {gib(h100['generate'])} | "
                           f"{gib(h100['train'])} | **{gib(h100['peak'])}** | {'yes' if h100['peak'] < 80e9 else 'NO'} "
                           f"| {h100['rollout_s']:.0f} | {h100['backward_s']:.0f} | {h100['step_s']:.0f} | "
                           f"{a100['step_s']:.0f} |")
    row = PROMPT_TOKENS + NEW_TOKENS
    out += ["", "Assumptions of the projection:", "",
            f"- every rollout at the full length: {PROMPT_TOKENS}-token prompt + {NEW_TOKENS:,} new tokens = {row:,} "
            "tokens (worst case; real steps are shorter on average); bf16 weights (untied embedding and output "
            "matrix), fp32 gates with AdamW.",
            f"- micro-batches of {MICRO_BATCH_TOKENS:,} tokens. *official (sequences)*: the official code packs "
            f"sequences, so a micro-batch holds one {row:,}-token row. *whole groups*: a micro-batch takes whole "
            f"groups of G = {SAMPLES} and a group over the budget goes alone ({SAMPLES} x {row:,} tokens): what "
            "`pack_groups` does today.",
            f"- rollouts generated {ROLLOUT_BATCH} prompts x {SAMPLES} samples per `generate` call "
            f"({PROMPTS // ROLLOUT_BATCH} calls); the rollout peak is weights + the KV cache of one call at full "
            "length (bf16) + one step's float logits.",
            "- backward memory: the CPU fit above, scaled per model: s0 by the elements a layer keeps per token (4 "
            "hidden + 4 heads x head_dim + 2 KV heads x head_dim + 4 intermediate), the checkpointed s0 by hidden, h "
            "by vocabulary, C by the output matrix, s1 unscaled (masks do not depend on the width). The CPU kernels "
            "stand in for the GPU ones (flash attention with a boolean mask on both); the CUDA allocator's caching "
            "and fragmentation, and the CUDA context (about 0.5-1 GiB, outside `max_memory_allocated`), are not "
            "included.",
            "- time: H100 SXM 989 TFLOP/s dense bf16 and 3.35 TB/s, A100 312 TFLOP/s and 2.0 TB/s. Rollouts: each "
            f"decoded token reads the weights and the mean KV cache at {BANDWIDTH_EFFICIENCY:.0%} of the bandwidth, "
            f"plus {LAUNCH_S_PER_LAYER * 1e3:.1f} ms of kernel launches per layer (eager transformers `generate`, "
            "gated attention). Backward: 2 x matmul parameters FLOPs per token per pass (forward, input-gradient "
            "backward, and a recomputed forward with checkpointing) plus attention (causal full branch + dense masked "
            f"streaming branch, backward 2.5 x forward) at {MFU:.0%} MFU. One GPU; with N data-parallel GPUs the step "
            "time divides by about N and the memory per GPU stays the same.",
            "- the bar: R1-Distill-Qwen-7B with checkpointing under 80 GB."]
    return out


def report(rows: list[dict]) -> str:
    fits = {mode: fit(rows, mode) for mode in (False, True)}
    return "\n".join(measured_section(rows, fits) + projection_section(fits) + engine_report(fits))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="1024,2048", help="two sequence lengths")
    parser.add_argument("--layers", default="1,2", help="two layer counts")
    parser.add_argument("--quick", action="store_true", help="lengths 512 and 1,024")
    parser.add_argument("--json", default=None, help="write the measurements here")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per measurement")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))), flush=True)
        return 0
    lengths = [512, 1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    layer_counts = [int(x) for x in args.layers.split(",")]
    if len(lengths) != 2 or len(layer_counts) != 2:
        parser.error("--lengths and --layers take two values each")
    started = time.perf_counter()
    rows = []
    for checkpointing in (False, True):
        for layers in layer_counts:
            for seq_len in lengths:
                rows.append(measure(layers, seq_len, checkpointing, args.timeout))
                r = rows[-1]
                print(f"measured: {layers} layers, {seq_len} tokens, checkpointing {'on' if checkpointing else 'off'}: "
                      f"{r['delta_bytes'] / 2**20:.0f} MiB in {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(report(rows))
    print(f"\n(measured in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
