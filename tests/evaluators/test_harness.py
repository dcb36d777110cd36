"""The lm-eval model `kvrl`: lm-eval's own command line with it, and the repetition stop."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from kvpress_rl import KvrlError, plan_from_scores
from kvpress_rl.evaluators import harness
from kvpress_rl.evaluators.harness import GenerationStats, KvrlLM, RepetitionStop, model_arg, parse_decoding_simulation
from kvpress_rl.models import random_model, small_config
from kvpress_rl.policies import Streaming


def test_repetition_stop_fires_on_a_loop_only():
    prompt = torch.arange(5)[None]
    looping = torch.cat([prompt, torch.arange(10).repeat(40)[None]], dim=1)
    varied = torch.cat([prompt, torch.arange(400)[None]], dim=1)
    stop = RepetitionStop(prompt_length=5)
    assert stop(torch.cat([looping, varied]), None).tolist() == [True, False]
    assert stop(looping[:, :300], None).tolist() == [False]


def test_kvrl_is_declared_in_lm_evals_model_entry_point_group():
    """lm-eval releases with the `lm_eval.models` group (after 0.4.13) find `--model kvrl` here."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="lm_eval.models")}
    assert "kvrl" in found, ("no `kvrl` in the installed `lm_eval.models` entry points: reinstall with "
                             "`pip install --no-deps --no-build-isolation -e .` (a stale kvpress_rl.egg-info in the "
                             "working directory shadows the installed metadata)")
    assert found["kvrl"].value == "kvpress_rl.evaluators.harness:KvrlLM"
    assert found["kvrl"].load() is KvrlLM


def test_lm_eval_command_line_runs_the_kvrl_model(shared_data, tmp_path):
    task = tmp_path / "gsm8k_local.yaml"
    task.write_text(
        "task: gsm8k_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {shared_data / 'gsm8k' / 'test.jsonl'}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer.split('####')[-1].strip()}}\"\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "generation_kwargs:\n  until: [\"Question:\"]\n  do_sample: false\n  max_gen_toks: 8\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "kvpress_rl.evaluators.harness", "run", "--model", "kvrl",
               "--model_args", "pretrained=embedded,strategy=random,sparsity=0.5,seed=1",
               "--tasks", str(task), "--limit", "2", "--batch_size", "2", "--output_path", str(tmp_path / "out"),
               "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "kvrl"
    assert results["config"]["model_args"]["strategy"] == "random"
    plan = results["config"]["kvrl_plan"]
    assert plan["source"] == "random" and plan["compressed_kv_heads"] == 45
    assert plan["kv_heads"] == 90  # 30 layers x 3 KV heads
    assert results["n-samples"]["gsm8k_local"]["effective"] == 2


def bare_lm(plan=None) -> KvrlLM:
    """A `KvrlLM` on a small random model without lm-eval's set-up: only `_model_generate` runs."""
    lm = KvrlLM.__new__(KvrlLM)
    model = random_model(small_config("llama"), seed=0)
    lm.__dict__.update(_model=model, tokenizer=type("Tok", (), {"pad_token_id": 0})(), stats=GenerationStats(),
                       on_samples=None, plan=plan, decoding_simulation=None, decoding_simulation_used=set())
    return lm


def test_decoding_simulation_comes_from_the_task_unless_overridden(monkeypatch):
    assert parse_decoding_simulation(None) is None and parse_decoding_simulation("task") is None
    assert parse_decoding_simulation("50") == 50 and parse_decoding_simulation(0) == 0
    with pytest.raises(ValueError, match="decoding_simulation"):
        parse_decoding_simulation("-3")
    seen = []
    real = harness.generate

    def recording(model, plan, ids, decoding_simulation=0, **kwargs):
        seen.append(decoding_simulation)
        return real(model, plan, ids, decoding_simulation=decoding_simulation, **kwargs)

    monkeypatch.setattr(harness, "generate", recording)
    lm = bare_lm(plan_from_scores(torch.rand(4, 4), 1.0, Streaming(2, 3)))
    ids = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for override, task in ((None, 12), (None, None), (0, 12)):
        lm.decoding_simulation = override
        extra = {} if task is None else {"decoding_simulation": task}
        mask = torch.ones_like(ids)
        outputs[(override, task)] = lm._model_generate(ids, 40, [], attention_mask=mask, do_sample=False, **extra)
    assert seen == [12, 0, 0] and lm.decoding_simulation_used == {0, 12}
    assert torch.equal(outputs[(None, None)], outputs[(0, 12)])
    assert not torch.equal(outputs[(None, 12)], outputs[(0, 12)])


def test_a_cells_settings_and_counts_are_its_own():
    lm = bare_lm()
    plan = plan_from_scores(torch.rand(4, 4), 1.0, Streaming(2, 3))
    ids = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    lm._model_generate(ids, 40, [], attention_mask=torch.ones_like(ids), do_sample=False)  # outside any cell
    with lm.cell_settings(plan=plan, decoding_simulation=5) as cell:
        assert lm.plan is plan and lm.decoding_simulation == 5
        lm._model_generate(ids, 40, [], attention_mask=torch.ones_like(ids), do_sample=False)
    assert lm.plan is None and lm.decoding_simulation is None and lm.cell_stats is None  # the settings before the cell
    assert cell.sequences == 2 and lm.stats.sequences == 4 and lm.decoding_simulation_used == {5}
    assert 0 < cell.kv_bytes_held < cell.kv_bytes_full and 0 < cell.kv_measured_fraction < 1
    assert lm.stats.kv_bytes_full > cell.kv_bytes_full and lm.stats.generated_tokens > cell.generated_tokens > 0


def test_harness_input_errors_are_kvrl_errors():
    with pytest.raises(KvrlError, match="decoding_simulation"):
        parse_decoding_simulation("many")
    with pytest.raises(KvrlError, match="decoding_simulation must be >= 0"):
        parse_decoding_simulation(-1)
    with pytest.raises(KvrlError, match="sparsity must be a float"):
        model_arg("half", float, "sparsity")
