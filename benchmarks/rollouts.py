"""Where an RLKV step on the embedded model spends its time: rollouts and backward, float32 and bfloat16.

One step of `kvrl select --strategy rlkv` with the embedded defaults (`--data embedded`, or `--data` as
given): `prompts_per_step` training prompts x G = 4 rollouts, sampled at temperature 1 from the gated model
(gates at 1.0, the start of training), then the teacher-forced backward of the learner. Measured in one run,
each configuration after a warm-up and from the same seed:

- `transformers generate`: transformers' `generate` without gates (multinomial sampling), the floor of the two-pass
  path;
- `gated generate two-pass`: `generate` inside the gated attention, whose decoding steps
  ran two SDPA calls (full and streaming, each reading the cache) and mixed their outputs;
- `gated generate one-pass`: the same with the one-pass decoding step (`kvpress_rl.executor.gated.mixed_decode`:
  one score product for both branches, two masked softmaxes, one product with the values);
- `gated loop one-pass`: today's path, `rollouts.decode` (the learner's own loop, one uniform draw per row and step
  instead of `torch.multinomial`'s one exponential per vocabulary entry) with the one-pass step;
- `gated vllm` (with `--engine`): the same rollouts sampled by vLLM's gated model (`GatedRollouts`, its engine core in
  a child process); its start-up is reported apart;
- `backward`: `RLKV.policy_backward` on the last rollouts, every group given an advantage (a real step runs only the
  groups whose rewards differ).

Tokens/s counts completion tokens (up to each rollout's end), as `completion_tokens / rollout_seconds` of
`train_log.jsonl`. `--profile` adds torch's operator table for one rollout of today's path per dtype.

    python benchmarks/rollouts.py                       # about 4 minutes on 2 cores
    python benchmarks/rollouts.py --data embedded-count --profile
    python benchmarks/rollouts.py --engine              # adds vLLM (the `vllm` extra), about 2 minutes more
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import torch

from kvpress_rl.embedded.model import load_embedded
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions
from kvpress_rl.strategies.rlkv.grpo import step_advantages
from kvpress_rl.strategies.rlkv.problems import load_problems
from kvpress_rl.strategies.rlkv.rollouts import branch_of, chat_ids, rollout_sampling, rollouts

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def generate_rollouts(model, tokenizer, prompts, options, copies: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rollouts through transformers' `generate` (under whichever attention the caller set): the prompts' shared
    prefill, then `generate`."""
    from kvpress_rl.embedded.data import left_pad
    from kvpress_rl.models import cache_kwargs
    from kvpress_rl.strategies.rlkv.rollouts import completion_mask, end_ids, shared_prefill

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        cache = shared_prefill(model, ids, mask, copies)
        ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=options.max_new_tokens, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, eos_token_id=end_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id, **cache_kwargs(model, cache))
    full_mask = torch.cat([mask, completion_mask(out[:, ids.shape[1]:], end_ids(tokenizer))], dim=1)
    return out, full_mask, ids.shape[1]


PATHS = ("transformers generate", "gated generate two-pass", "gated generate one-pass", "gated loop one-pass")


def timed_rollouts(model, tokenizer, prompts, options, gates, how: str, seed: int, engine=None):
    """`(seconds, completion tokens, (sequences, mask, offset))` of one step's rollouts."""
    o = options
    torch.manual_seed(seed)
    began = time.perf_counter()
    if how == "transformers generate":
        out = generate_rollouts(model, tokenizer, prompts, o, o.group_size)
    elif how == "gated vllm":
        sampled = engine.sample(prompts, rollout_sampling(tokenizer, o, sample=True), gates=gates, branch=branch_of(o),
                                copies=o.group_size)
        out = sampled.sequences, sampled.mask, sampled.offset
    else:
        with gated(model, gates, sink=o.sink, window=o.window, mask=o.train_mask, block_size=o.block_size,
                   one_pass_decode=how.endswith("one-pass")):
            if how.startswith("gated generate"):
                out = generate_rollouts(model, tokenizer, prompts, o, o.group_size)
            else:
                out = rollouts(model, tokenizer, prompts, o, sample=True, copies=o.group_size)
    seconds = time.perf_counter() - began
    sequences, mask, offset = out
    return seconds, int(mask[:, offset:].sum()), out


def timed_backward(learner: RLKV, model, tokenizer, problems, gates, out) -> tuple[float, int]:
    o = learner.options
    sequences, mask, offset = out
    comp_mask = mask[:, offset:]
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True)
             for row, m in zip(sequences[:, offset:], comp_mask)]
    rollout_problems = (p for p in problems for _ in range(o.group_size))
    rewards = torch.tensor([float(p.verify(t, p.answer)) for p, t in zip(rollout_problems, texts)])
    advantages = step_advantages(o.advantage, rewards, comp_mask.sum(1), o.group_size)
    if not advantages.any():  # a step without signal skips its backward: give it one so the timing is real
        advantages = torch.linspace(-1.0, 1.0, len(rewards))
    gates.grad = None
    began = time.perf_counter()
    stats = learner.policy_backward(model, gates, sequences, mask, offset, advantages, rewards, o.sink, o.window)
    return time.perf_counter() - began, stats["forward_tokens"]


def engine_rows(model, tokenizer, prompts, options, gates, dtype_name: str, args) -> list[dict]:
    from kvpress_rl.engines.vllm.engine import GatedRollouts

    o = options
    # The engine core runs in its own process (vLLM's default): in this one its CPU worker would re-bind torch's threads
    # and slow every later transformers measurement (seen: the backward 2x slower after an in-process engine).
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    began = time.perf_counter()
    engine = GatedRollouts(None, dtype=dtype_name, max_model_len=2048)
    engine.start(branch_of(o))
    start_s = time.perf_counter() - began
    try:
        timed_rollouts(model, tokenizer, prompts[:1], o, gates, "gated vllm", args.seed, engine)  # warm-up
        runs = [timed_rollouts(model, tokenizer, prompts, o, gates, "gated vllm", args.seed + r, engine)
                for r in range(args.repeats)]
    finally:
        engine.close()
    seconds, tokens, _ = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    print(f"{dtype_name:9s} rollouts {'gated vllm':24s} {seconds:6.2f} s  {tokens:5d} tokens  {tokens / seconds:6.1f} "
          f"tokens/s (engine start {start_s:.0f} s)", flush=True)
    return [{"dtype": dtype_name, "phase": "rollouts gated vllm", "seconds": seconds, "tokens": tokens,
             "tokens_per_s": tokens / seconds},
            {"dtype": dtype_name, "phase": "vllm engine start", "seconds": start_s, "tokens": 0, "tokens_per_s": 0.0}]


def profile_table(model, tokenizer, prompts, options, gates, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    o = options
    with profile(activities=[ProfilerActivity.CPU]) as prof, gated(model, gates, sink=o.sink, window=o.window,
                                                                   mask=o.train_mask):
        rollouts(model, tokenizer, prompts, o, sample=True, copies=o.group_size)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="embedded", help="training problems, as `kvrl select --strategy rlkv --data`")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="measured repeats of each configuration (the median is shown)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch's operator table of one one-pass rollout per dtype")
    parser.add_argument("--engine", action="store_true",
                        help="also time the rollouts in vLLM's gated model (needs the vllm extra)")
    parser.add_argument("--csv", default=str(HERE / "results" / "rollouts.csv"))
    return parser.parse_args(argv)


def write_csv(path: Path, rows: list[dict], data: str) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["cpu", "data", "dtype", "phase", "seconds", "tokens", "tokens_per_s"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"cpu": cpu_name(), "data": data,
                             **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}})
    tmp.replace(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for dtype_name in args.dtypes.split(","):
        model, tokenizer = load_embedded(dtype=getattr(torch, dtype_name))
        model.requires_grad_(False)
        learner = RLKV(RLKVOptions(data=args.data))
        learner.resolve(model)
        o = learner.options
        # a training stream (seeds from 2**32)
        problems = load_problems(o.data, o.prompts_per_step, 2**32 + args.seed, None)
        prompts = [chat_ids(tokenizer, p.prompt) for p in problems]
        gates = new_gates(model, 1.0)
        timed_rollouts(model, tokenizer, prompts[:1], o, gates, "gated loop one-pass", args.seed)  # warm-up
        for how in PATHS:
            runs = [timed_rollouts(model, tokenizer, prompts, o, gates, how, args.seed + r)
                    for r in range(args.repeats)]
            seconds, tokens, out = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            rows.append({"dtype": dtype_name, "phase": f"rollouts {how}", "seconds": seconds, "tokens": tokens,
                         "tokens_per_s": tokens / seconds})
            print(f"{dtype_name:9s} rollouts {how:24s} {seconds:6.2f} s  {tokens:5d} tokens  "
                  f"{tokens / seconds:6.1f} tokens/s", flush=True)
        if args.engine:
            rows += engine_rows(model, tokenizer, prompts, o, gates, dtype_name, args)
        backwards = [timed_backward(learner, model, tokenizer, problems, gates, out) for _ in range(args.repeats)]
        backward = sorted(backwards)[args.repeats // 2]
        rows.append({"dtype": dtype_name, "phase": "backward", "seconds": backward[0], "tokens": backward[1],
                     "tokens_per_s": backward[1] / backward[0]})
        print(f"{dtype_name:9s} backward {'':24s} {backward[0]:6.2f} s  {backward[1]:5d} tokens through the model",
              flush=True)
        if args.profile:
            print(profile_table(model, tokenizer, prompts, o, gates, rows=18))
        del model

    base = {r["dtype"]: r["seconds"] for r in rows if r["phase"] == "rollouts gated generate two-pass"}
    reference = base.get("float32") or next(iter(base.values()))
    print(f"\nCPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; data {args.data}, "
          f"{len(prompts)} prompts x {o.group_size}, at most {o.max_new_tokens} new tokens")
    print(f"{'dtype':9s} {'phase':33s} {'seconds':>8s} {'tokens/s':>9s} {'vs two-pass, fp32':>22s}")
    for r in rows:
        ratio = f"{reference / r['seconds']:.2f}x" if r["phase"].startswith("rollouts") else ""
        print(f"{r['dtype']:9s} {r['phase']:33s} {r['seconds']:8.2f} {r['tokens_per_s']:9.1f} {ratio:>22s}")
    if args.csv:
        write_csv(Path(args.csv), rows, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
