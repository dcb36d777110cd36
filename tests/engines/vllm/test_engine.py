"""Head plans through the vLLM plugin: greedy tokens equal the executor's (tiny random Llama, Mistral, Qwen2 and
Qwen3, the embedded model on 20 counted problems at s = 0.5 and 0.8), the KV capacity vLLM reports at a fixed cache
size, and `kvrl eval --engine vllm` (`PlanSwitchingEngine`): the same grid gives the transformers path's answers, its
cells are keyed by engine, and what the engine cannot run is refused in one line before anything loads."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kvpress_rl.engines.vllm.engine import EngineSettings, VllmGenerator, model_folder
from kvpress_rl.engines.vllm.layout import EnginePlan, ideal_capacity_ratio
from kvpress_rl.plan import CompressionPlan, plan_from_scores
from kvpress_rl.policies import Streaming
from kvpress_rl.scores import HeadScores
from tests.conftest import REPO_ROOT
from tests.engines.vllm.conftest import tiny_folder

pytestmark = [pytest.mark.usefixtures("vllm_installed"), pytest.mark.engine]
RLKV_HEADS = REPO_ROOT / "benchmarks" / "results" / "heads-rlkv-embedded-count.safetensors"
NEW_TOKENS = 200


def executor_tokens(model, plan, prompt: list[int], new_tokens: int) -> list[int]:
    from kvpress_rl.executor import generate

    with torch.inference_mode():
        out = generate(model, plan, torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch, eager",
                         [("llama", True), ("mistral", True), ("qwen2", True), ("qwen3", True), ("llama", False)])
def test_greedy_tokens_equal_the_executor_on_a_random_model(tmp_path_factory, arch, eager):
    """`eager=False`: vLLM's compiled model (torch.compile, as CUDA builds run it): each layer's attention is one op."""
    model, folder = tiny_folder(tmp_path_factory, arch)
    full = torch.tensor([[True, False], [False, True]])
    plan = CompressionPlan(full, Streaming(), 0.5)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (20, 80, 300)]
    settings = EngineSettings(model=folder, plan=EnginePlan.from_plan(plan), max_model_len=1024, dtype="float32",
                              eager=eager)
    with VllmGenerator(settings) as engine:
        got = [out.token_ids for out in engine.generate(prompts, NEW_TOKENS)]
    differs_from_full = 0
    for prompt, tokens in zip(prompts, got):
        expected = executor_tokens(model, plan, prompt, NEW_TOKENS)
        difference = first_difference(tokens, expected)
        assert list(tokens) == expected, f"prompt of {len(prompt)} tokens: first difference at {difference}"
        differs_from_full += expected != executor_tokens(model, None, prompt, NEW_TOKENS)
    assert differs_from_full  # the plan changes the answer: the equality says something about the compressed heads


def test_two_tensor_parallel_ranks_give_the_executors_tokens(tmp_path_factory, monkeypatch):
    """Each rank serves its KV heads' part of the plan (rank 0: layer 0's head full, layer 1's compressed; rank 1 the
    other way round), its sub-layers named by the model's head index; vLLM's CPU build runs the two ranks on two
    cores."""
    model, folder = tiny_folder(tmp_path_factory, "llama")
    plan = CompressionPlan(torch.tensor([[True, False], [False, True]]), Streaming(), 0.5)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (20, 100, 300)]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    settings = EngineSettings(model=folder, plan=EnginePlan.from_plan(plan), max_model_len=1024, dtype="float32",
                              tensor_parallel_size=2, gpu_memory_utilization=0.2)
    with VllmGenerator(settings) as engine:
        got = [list(out.token_ids) for out in engine.generate(prompts, NEW_TOKENS)]
    expected = [executor_tokens(model, plan, prompt, NEW_TOKENS) for prompt in prompts]
    mismatched = [(len(p), first_difference(a, b)) for p, a, b in zip(prompts, got, expected) if a != b]
    assert not mismatched, f"prompts whose tokens differ (prompt length, first token): {mismatched}"
    assert any(e != executor_tokens(model, None, p, NEW_TOKENS) for p, e in zip(prompts, expected))


def preemptions(generator: VllmGenerator) -> float:
    return sum(metric.value for metric in generator.llm.get_metrics() if metric.name == "vllm:num_preemptions")


@pytest.mark.parametrize("batched_tokens", [None, 2048])  # one prompt a step at most, or several
def test_a_preempted_request_gets_the_tokens_it_gets_alone(tmp_path_factory, batched_tokens):
    """Six requests at once in a KV cache for about two: preempted requests are recomputed (prompt and generated
    tokens), and every answer is the one the request gets alone in the engine."""
    _, folder = tiny_folder(tmp_path_factory, "llama")
    plan = CompressionPlan(torch.tensor([[True, False], [False, True]]), Streaming(), 0.5)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (100, 120, 90, 110, 130, 95)]
    settings = EngineSettings(model=folder, plan=EnginePlan.from_plan(plan), max_model_len=512, dtype="float32",
                              kv_cache_memory_bytes=600_000, max_num_batched_tokens=batched_tokens,
                              log_stats=True)
    with VllmGenerator(settings) as engine:
        loaded = [list(out.token_ids) for out in engine.generate(prompts, 350)]
        preempted = preemptions(engine)
        alone = [list(engine.generate([prompt], 350)[0].token_ids) for prompt in prompts]
        assert preemptions(engine) == preempted  # one request at a time fits
    assert preempted > 0, "the KV cache was meant to force preemptions"
    mismatched = [(i, first_difference(a, b)) for i, (a, b) in enumerate(zip(loaded, alone)) if a != b]
    assert not mismatched, f"requests whose tokens differ under load (request, first token): {mismatched}"


def first_difference(a, b) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.fixture(scope="module")
def embedded():
    from kvpress_rl.embedded.model import load_embedded

    return load_embedded()


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_greedy_tokens_equal_the_executor_on_the_embedded_model(embedded, sparsity):
    from kvpress_rl.embedded.data import left_pad, prompt_ids
    from kvpress_rl.embedded.task import ANSWER_LIMITS, COUNTED_TASK, task_problems
    from kvpress_rl.executor import generate

    model, tokenizer = embedded
    plan = plan_from_scores(HeadScores.load(RLKV_HEADS), sparsity)
    prompts = [prompt_ids(tokenizer, p) for p in task_problems(COUNTED_TASK, "test", 20)]
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    limit = ANSWER_LIMITS[COUNTED_TASK]
    settings = EngineSettings(model=model_folder("embedded"), plan=EnginePlan.from_plan(plan), max_model_len=2048,
                              dtype="float32")
    with VllmGenerator(settings) as engine:
        got = [list(out.token_ids) for out in engine.generate(prompts, limit, stop_token_ids=end_ids)]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.inference_mode():
        out = generate(model, plan, ids, attention_mask=mask, max_new_tokens=limit, do_sample=False,
                       eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    expected = [row.tolist() for row in out[:, ids.shape[1]:]]
    # the engine returns the stop token; the executor pads after it
    got = [[t for t in row if t not in end_ids] for row in got]
    expected = [[t for t in row if t not in end_ids] for row in expected]
    mismatched = [(i, first_difference(a, b)) for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert sum(map(len, got)) > 20 * 30  # whole answers, not empty ones
    assert not mismatched, f"problems whose tokens differ (problem, first token): {mismatched}"


def reported_capacity(folder: str, plan: EnginePlan | None, length: int) -> tuple[int, float]:
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    settings = EngineSettings(model=folder, plan=plan, max_model_len=length, dtype="float32", exact_prefill=False,
                              # the cache holds one full-cache sequence of 8,192 tokens
                              max_num_batched_tokens=64, kv_cache_memory_bytes=512 * 2**20)
    with VllmGenerator(settings) as engine:
        core = engine.llm.llm_engine.engine_core.engine_core  # in-process engine core (tests/engines/vllm/conftest.py)
        return get_kv_cache_capacity(core.vllm_config, core.scheduler.kv_cache_config)


@pytest.mark.parametrize("length", [4096, 8192])
def test_capacity_at_a_fixed_cache_size_is_near_the_ideal(length):
    folder = model_folder("embedded")
    full_tokens, full_requests = reported_capacity(folder, None, length)
    scores = HeadScores.load(RLKV_HEADS)
    for sparsity in (0.5, 0.8):
        plan = EnginePlan.from_plan(plan_from_scores(scores, sparsity))
        tokens, requests = reported_capacity(folder, plan, length)
        ideal = ideal_capacity_ratio(plan.num_compressed / plan.num_heads, length)
        assert requests / full_requests >= 0.9 * ideal, (sparsity, requests / full_requests, ideal)
        assert tokens / full_tokens >= 0.9 * ideal


GRID = ["eval", "--tasks", "embedded_count", "--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--sparsity", "0.8",
        "--limit", "6", "--dtype", "float32", "--batch-size", "6"]


def responses(folder) -> dict[str, list[str]]:
    found = {}
    for path in sorted((folder / "samples" / "embedded_count").glob("*.jsonl")):
        found[path.stem] = [json.loads(line)["filtered_resps"][0] for line in path.read_text().splitlines()]
    return found


def test_the_engine_answers_as_the_executor_and_its_cells_are_its_own(cli, tmp_path):
    engine = cli(*GRID, "--engine", "vllm", "--output", "vllm")
    assert engine.exit_code == 0, engine.output
    executor = cli(*GRID, "--output", "transformers")
    assert executor.exit_code == 0, executor.output
    answers = responses(tmp_path / "vllm")
    assert answers and answers == responses(tmp_path / "transformers")  # every answer, full cache and s = 0.8
    rows = list(csv.DictReader((tmp_path / "vllm" / "grid.csv").open()))
    assert {json.loads(row["definition"])["engine"] for row in rows} == {"vllm"}
    resumed = cli(*GRID, "--output", "vllm")  # the transformers path does not resume the engine's cells
    assert resumed.exit_code == 2 and "--engine" in resumed.output


@pytest.mark.parametrize("args, message", [
    (["--strategy", "streaming"], "not token strategies (streaming)"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--compressed-policy", "snapkv"],
     "--compressed-policy other than streaming"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--decoding-simulation", "50"], "no decoding simulation"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--num-processes", "2"], "runs in one process"),
    (["--strategy", "rlkv", "--heads", str(RLKV_HEADS), "--model", "random:llama"],
     "loads a folder of weights or a hub id"),
])
def test_what_the_engine_cannot_run_is_refused_in_one_line(cli, tmp_path, args, message):
    result = cli("eval", "--tasks", "embedded_count", "--sparsity", "0.5", "--limit", "2", "--engine", "vllm", *args,
                 "--output", "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()
