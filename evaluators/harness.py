"""The lm-evaluation-harness model `kvrl`: lm-eval's HF model, generating under a `CompressionPlan`.

    python -m kvpress_rl.evaluators.harness run --model kvrl \\
        --model_args pretrained=embedded,strategy=rlkv,heads=heads.safetensors,sparsity=0.6 --tasks gsm8k

takes every argument of `lm-eval run` (the module is lm-eval's command line with `kvrl`
registered). lm-eval 0.4.13 and earlier have no plugin door for models, so plain `lm-eval` cannot
see `kvrl` there; later releases read the `lm_eval.models` entry-point group (lm-eval pull request
4013), where pyproject.toml declares `kvrl = "kvpress_rl.evaluators.harness:KvrlLM"`, and
`lm-eval run --model kvrl ...` works directly. This module keeps working with both.
Data parallel: `accelerate launch -m kvpress_rl.evaluators.harness run --model kvrl ...` (one model
copy per process; lm-eval splits the requests and gathers the results).

Model arguments besides lm-eval's HF ones: `strategy` (any registered strategy; none = full
cache), `heads` (a scores file; without it the strategy's `select` runs), `sparsity`, `seed`,
`compressed_policy` (token policy of the compressed heads of head strategies), `plan_rule`
(`official`, the RLKV evaluation's quantile threshold, or `round`), `data_dir`,
`decoding_simulation` (prompt tokens; see below).
Generation adds the repetition early stop (the last 400 tokens hold fewer than 40 distinct ids),
counted in `stats`, and honours a `max_total_tokens` generation argument (prompt + answer).

Decoding simulation (RLKV's `eval/bench/pred.py`, `--decoding_simulation_length 50`): under a plan,
the prompt is prefilled without its last N tokens, those N are fed one at a time through the
cache (the compressed heads act as in decoding), then generation continues. N comes from the
task's `decoding_simulation` generation argument (50 for the paper's `*_r1` tasks, absent = 0
for the others) unless the `decoding_simulation` model argument overrides it for every task. A
full-cache run skips it (it would not change the result). The setting and the lengths used are
recorded in the results' `config` (`kvrl_decoding_simulation`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria
from transformers import StoppingCriteria, StoppingCriteriaList

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.scoring import REPETITION_DISTINCT, REPETITION_WINDOW
from kvpress_rl.evaluators.strategy_scores import strategy_scores
from kvpress_rl.executor import generate
from kvpress_rl.models import ModelShape, available_device, load_model
from kvpress_rl.plan import CompressionPlan, build_plan, kv_bytes_of
from kvpress_rl.plugins import discover_strategies, get_strategy
from kvpress_rl.throughput import Throughput

MODEL_NAME = "kvrl"


class PlanGenerator(Protocol):
    """An engine that generates under a plan (`kvpress_rl.engines.vllm.engine.PlanSwitchingEngine`): new token ids per
    prompt."""

    def generate(self, plan: CompressionPlan | None, prompts: list[list[int]], max_new_tokens: int, *,
                 stop_token_ids: list[int], stop: list[str] | None = None, temperature: float = 0.0,
                 seed: int | None = None) -> list[list[int]]: ...


class RepetitionStop(StoppingCriteria):
    """Stops a sequence once its last `window` generated tokens hold fewer than `distinct` ids."""

    def __init__(self, prompt_length: int, window: int = REPETITION_WINDOW,
                 distinct: int = REPETITION_DISTINCT) -> None:
        self.prompt_length, self.window, self.distinct = prompt_length, window, distinct
        self.stopped: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] - self.prompt_length >= self.window:
            tail = input_ids[:, -self.window:]
            distinct = torch.tensor([len(set(row.tolist())) for row in tail], device=input_ids.device)
            done = distinct < self.distinct
        self.stopped = done if self.stopped is None else self.stopped | done
        return done


@dataclass(kw_only=True)
class GenerationStats(Throughput):
    sequences: int = 0
    repetition_stops: int = 0
    kv_bytes_held: int = 0  # keys and values the caches held at the end of each generation (measured)
    kv_bytes_full: int = 0  # what a full cache would have held for the same sequences

    @property
    def kv_measured_fraction(self) -> float:
        """KV bytes held / a full cache's (-1: not measured, as on an engine)."""
        return self.kv_bytes_held / self.kv_bytes_full if self.kv_bytes_full else -1.0

    def add(self, other: GenerationStats) -> None:
        for counter in fields(self):
            setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))


class KvrlLM(HFLM):
    """lm-eval's `HFLM` whose generation runs through the head-wise cache executor.

    `pretrained` is anything `kvrl --model` accepts (hub id, directory, `.gguf`, `random:ARCH`,
    `embedded`) or a loaded model (then pass `tokenizer` too). Many cells run on one loaded model,
    each inside `cell_settings(plan=...)`, which counts the cell's generation apart.
    """

    engine: PlanGenerator | None = None  # what generates: None = the executor in this process (transformers)
    cell_stats: GenerationStats | None = None  # the generation of the cell in progress (`cell_settings`)

    def __init__(self, pretrained: Any = "embedded", strategy: str | None = None, heads: str | None = None,
                 sparsity: float = 0.0, seed: int = 0, compressed_policy: str = "streaming",
                 data_dir: str | None = None, plan_rule: str = "official", decoding_simulation: int | str | None = None,
                 tokenizer: Any = None, plan: CompressionPlan | None = None, on_samples: Any = None,
                 engine: PlanGenerator | None = None, **kwargs: Any) -> None:
        self.decoding_simulation = parse_decoding_simulation(decoding_simulation)
        self.decoding_simulation_used: set[int] = set()
        if isinstance(pretrained, str):
            dtype = str(kwargs.pop("dtype", "auto")).replace("torch.", "")
            model, tokenizer = load_model(pretrained, dtype=dtype, device=available_device(kwargs.pop("device", None)))
            if tokenizer is None:
                raise KvrlError(f"model {pretrained!r} has no tokenizer; lm-eval needs a real model")
        else:
            model = pretrained
        kwargs.pop("device", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self._join_data_parallel()
        self.stats = GenerationStats()
        self.on_samples = on_samples
        self.engine = engine
        self.plan = plan
        if plan is None and strategy:
            self.plan = plan_for(model, tokenizer, strategy, model_arg(sparsity, float, "sparsity"), heads=heads,
                                 seed=model_arg(seed, int, "seed"), compressed_policy=compressed_policy,
                                 data_dir=data_dir, rule=plan_rule)

    @contextmanager
    def cell_settings(self, *, plan: CompressionPlan | None,
                      decoding_simulation: int | None = None) -> Iterator[GenerationStats]:
        """Generate under `plan` (and `decoding_simulation` prompt tokens; None: the model's own setting) inside the
        block, which receives the block's own generation counts (added to `stats` as well); the previous settings
        come back on exit."""
        previous = self.plan, self.decoding_simulation, self.cell_stats
        self.plan = plan
        if decoding_simulation is not None:
            self.decoding_simulation = decoding_simulation
        self.cell_stats = GenerationStats()
        try:
            yield self.cell_stats
        finally:
            self.plan, self.decoding_simulation, self.cell_stats = previous

    def _count(self, counts: GenerationStats) -> None:
        """Add one batch's generation to the model's totals and to the cell in progress."""
        self.stats.add(counts)
        if self.cell_stats is not None:
            self.cell_stats.add(counts)

    def _join_data_parallel(self) -> None:
        """Under `accelerate launch`, take this process's share of the requests (HFLM does this only
        for models it loads itself; ours are loaded by `kvpress_rl.models.load_model`)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            # without a GPU, accelerate joins the processes only when told to use the CPU (gloo)
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes

    def get_model_info(self) -> dict:
        """lm-eval copies this into the results' `config`: the plan and the generation counters."""
        info = super().get_model_info()
        plan = self.plan
        info["kvrl_plan"] = None if plan is None else {
            "source": plan.source, "sparsity": plan.sparsity, "compressed_kv_heads": plan.num_compressed,
            "kv_heads": plan.full.numel(), "compressed_policy": plan.policy.describe(), "plan_rule": plan.rule}
        info["kvrl_decoding_simulation"] = {
            "setting": "task default" if self.decoding_simulation is None else self.decoding_simulation,
            "lengths_used": sorted(self.decoding_simulation_used)}
        info["kvrl_processes"] = self.world_size
        info["kvrl_generation"] = {"sequences": self.stats.sequences, "generated_tokens": self.stats.generated_tokens,
                                   "repetition_stops": self.stats.repetition_stops,
                                   "decode_tokens_per_s": self.stats.tokens_per_second}
        return info

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        # with a progress callback the caller shows its own bar
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self.on_samples is not None)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        task_simulation = int(generation_kwargs.pop("decoding_simulation", 0) or 0)
        simulation = task_simulation if self.decoding_simulation is None else self.decoding_simulation
        total = generation_kwargs.pop("max_total_tokens", None)
        if total:
            max_length = min(max_length, int(total))
        repetition = RepetitionStop(context.shape[1])
        criteria = StoppingCriteriaList([repetition])
        criteria.extend(stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0]))
        if generation_kwargs.get("temperature", 0.0) == 0.0 and not generation_kwargs.get("do_sample"):
            generation_kwargs.pop("temperature", None)
            generation_kwargs["do_sample"] = False
        if self.engine is not None:
            return self._engine_generate(context, max_length, stop, simulation, generation_kwargs)
        began = time.perf_counter()
        if self.plan is not None:
            self.decoding_simulation_used.add(simulation)
        caches: list = []
        with torch.inference_mode():
            out = generate(self.model, self.plan, context, decoding_simulation=simulation, caches=caches,
                           max_length=max_length, stopping_criteria=criteria, pad_token_id=self.tokenizer.pad_token_id,
                           use_cache=True, **generation_kwargs)
        seconds = time.perf_counter() - began
        new = out[:, context.shape[1]:]
        counts = self._kv_bytes(caches[0] if caches else None, out)
        counts.seconds, counts.sequences = seconds, out.shape[0]
        counts.generated_tokens = int((new != self.tokenizer.pad_token_id).sum())
        if repetition.stopped is not None:
            counts.repetition_stops = int(repetition.stopped.sum())
        self._count(counts)
        if self.on_samples:
            self.on_samples(out.shape[0])
        return out

    def _engine_generate(self, context: torch.Tensor, max_length: int, stop: list[str], simulation: int,
                         kwargs: dict) -> torch.Tensor:
        """`_model_generate` through the engine: the same prompts (left padding removed), answer limit,
        end-of-sequence ids and stop strings; the answers come back in the layout of `generate` (prompt, answer,
        padding)."""
        if simulation and self.plan is not None:
            raise KvrlError(f"the vLLM engine has no decoding simulation (this task asks for {simulation} tokens); "
                            "pass --decoding-simulation 0, or evaluate with --engine transformers")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(context) if mask is None else mask.to(context.device)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(context, mask)]
        eos = self.model.generation_config.eos_token_id
        end_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        sample = bool(kwargs.get("do_sample"))
        began = time.perf_counter()
        temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        answers = self.engine.generate(self.plan, prompts, max(1, max_length - context.shape[1]),
                                       stop_token_ids=end_ids, stop=stop, temperature=temperature, seed=None)
        self._count(GenerationStats(seconds=time.perf_counter() - began, generated_tokens=sum(map(len, answers)),
                                    sequences=len(answers)))
        width = max(len(a) for a in answers)
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([a + [pad] * (width - len(a)) for a in answers], dtype=context.dtype, device=context.device)
        if self.on_samples:
            self.on_samples(len(answers))
        return torch.cat([context, new], dim=1)

    def _kv_bytes(self, cache, out: torch.Tensor) -> GenerationStats:
        """What `cache` holds now (None: a full cache) and what a full cache would hold for these sequences."""
        shape = ModelShape.from_config(self.model.config)
        seen = cache.get_seq_length() if cache is not None else out.shape[1] - 1  # the last token is never fed back
        head_tokens = out.shape[0] * seen * shape.num_layers * shape.num_kv_heads
        full = kv_bytes_of(head_tokens, shape.head_dim, self.model.dtype)
        return GenerationStats(kv_bytes_full=full, kv_bytes_held=cache.kv_nbytes() if cache is not None else full)


def parse_decoding_simulation(value: int | str | None) -> int | None:
    """The `decoding_simulation` model argument: None (or "", "task") = each task's own default."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "task")):
        return None
    try:
        tokens = int(value)
    except (TypeError, ValueError):
        raise KvrlError(f"decoding_simulation must be a number of prompt tokens (0 = off), got {value!r}") from None
    if tokens < 0:
        raise KvrlError(f"decoding_simulation must be >= 0, got {tokens}")
    return tokens


def model_arg(value: Any, kind: type, name: str) -> Any:
    """A model argument as `kind` (lm-eval passes them as text), or a one-line `KvrlError`."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise KvrlError(f"model argument {name} must be a {kind.__name__}, got {value!r}") from None


def plan_for(model: Any, tokenizer: Any, strategy: str, sparsity: float, *, heads: str | None = None, seed: int = 0,
             compressed_policy: str = "streaming", data_dir: str | None = None,
             rule: str = "official") -> CompressionPlan:
    """The plan of `strategy` at `sparsity`: from a scores file, else by running its `select` (strategies that
    do not train; a training strategy needs `heads`, made by `kvrl select`)."""
    entry = get_strategy(strategy, discover_strategies())
    scores = strategy_scores(entry, strategy, model, tokenizer, heads=heads, seed=seed, data_dir=data_dir,
                             heads_argument="heads=")
    return build_plan(entry.cls(), scores, sparsity, compressed_policy, rule)


def register() -> None:
    """Make `kvrl` a model name of lm-eval (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(KvrlLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with `kvrl` among its models."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
