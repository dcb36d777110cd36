import pytest
import torch
from transformers import AutoConfig

import kvpress_rl
from kvpress_rl import HeadScores
from tests.helpers import error_line, run_kvrl


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"kvrl {kvpress_rl.__version__}"


def test_strategies_table_and_detail(cli):
    listing = cli("strategies")
    assert listing.exit_code == 0
    assert "random" in listing.output and "file" in listing.output and "built-in" in listing.output
    detail = cli("strategies", "file")
    assert "--path" in detail.output and "head pattern" in detail.output


def test_select_writes_scores_with_provenance(cli, tmp_path):
    result = cli("select", "--strategy", "random", "--model", "random:llama", "--seed", "4", "--output", "r.safetensors")
    assert result.exit_code == 0, result.output
    scores = HeadScores.load(tmp_path / "r.safetensors")
    assert scores.seed == 4 and scores.model_id == "random:llama" and scores.shape == (4, 4)
    assert scores.extra["weights"] == "random:llama" and scores.extra["code"].startswith(kvpress_rl.__version__)


def test_select_sets_strategy_options_from_the_command_line(cli, tmp_path):
    HeadScores(torch.rand(4, 4)).to_tsv(tmp_path / "p.tsv")
    result = cli("select", "--strategy", "file", "--model", "random:llama", "--path", "p.tsv", "--output", "f.tsv")
    assert result.exit_code == 0, result.output
    assert torch.allclose(HeadScores.load(tmp_path / "f.tsv").scores, HeadScores.load(tmp_path / "p.tsv").scores)


def test_plan_prints_the_plan_and_memory(cli, head_patterns):
    result = cli("plan", "--heads", str(head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv"), "--sparsity", "0.5", "--seq-len", "1000")
    assert result.exit_code == 0, result.output
    assert "56/112 KV heads compressed" in result.output
    # 56 full x 1000 + 56 x 80 tokens out of 112 x 1000
    assert "54.0%" in result.output


def test_unknown_strategy_lists_the_available_ones(cli):
    assert error_line(cli("select", "--strategy", "nope")) == "Error: unknown strategy 'nope'; available: duo, file, h2o, random, retrieval, rkv, rlkv, snapkv, streaming"


def test_unknown_strategy_option_lists_accepted(cli, tmp_path):
    line = error_line(cli("select", "--strategy", "file", "--depth", "3"))
    assert "unknown option --depth" in line and "--path" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sparsity", ["1.5", "-0.2"])
def test_sparsity_outside_unit_interval(cli, head_patterns, sparsity):
    line = error_line(cli("plan", "--heads", str(head_patterns / "Qwen-2.5-7B-R1" / "rlkv.tsv"), "--sparsity", sparsity))
    assert "outside [0, 1]" in line


def test_scores_for_another_model_are_refused_and_nothing_written(cli, head_patterns, tmp_path):
    line = error_line(cli("select", "--strategy", "file", "--model", "random:llama", "--path", str(head_patterns / "Llama-3.1-8B-R1" / "rlkv.tsv"), "--output", "x.safetensors"))
    assert "32 layers x 8 KV heads, the model has 4 x 4" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_and_corrupted_files(cli, tmp_path):
    assert "not found" in error_line(cli("plan", "--heads", "absent.safetensors", "--sparsity", "0.5"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert "not a readable head-scores file" in error_line(cli("plan", "--heads", "bad.safetensors", "--sparsity", "0.5"))


def test_unsupported_architecture(cli, tmp_path):
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    line = error_line(cli("select", "--strategy", "random", "--model", str(tmp_path / "gpt2")))
    assert "unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3" in line
    assert not (tmp_path / "heads-random.safetensors").exists()


def test_existing_output_needs_overwrite(cli, tmp_path):
    assert cli("select", "--strategy", "random", "--model", "random:llama", "--seed", "1").exit_code == 0
    before = (tmp_path / "heads-random.safetensors").read_bytes()
    assert "pass --overwrite" in error_line(cli("select", "--strategy", "random", "--model", "random:llama", "--seed", "2"))
    assert (tmp_path / "heads-random.safetensors").read_bytes() == before
    assert cli("select", "--strategy", "random", "--model", "random:llama", "--seed", "2", "--overwrite").exit_code == 0
    assert HeadScores.load(tmp_path / "heads-random.safetensors").seed == 2


def test_errors_from_the_real_command_are_one_line_without_traceback(tmp_path):
    result = run_kvrl("plan", "--heads", "absent.tsv", "--sparsity", "0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "Error: head scores file not found: absent.tsv"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["--strategy", "rlkv", "--rollout-engine", "sglang"], "unknown --rollout-engine 'sglang'; accepted: transformers, vllm"),
    (["--strategy", "random", "--rollout-engine", "vllm"], "'random' samples nothing"),
    (["--strategy", "rlkv", "--rollout-engine", "vllm", "--model", "random:qwen2"], "loads a folder of weights or a hub id"),
    (["--strategy", "rlkv", "--rollout-engine", "vllm", "--num-processes", "2"], "drop --num-processes"),
])
def test_rollout_engine_is_refused_where_it_cannot_run(cli, tmp_path, args, expected):
    assert expected in error_line(cli("select", *args))
    assert list(tmp_path.iterdir()) == []  # nothing written, no model loaded


def test_select_runs_the_embedded_profile_in_bfloat16_unless_a_dtype_is_given():
    from rich.console import Console

    from kvpress_rl.cli.main import in_select_dtype
    from kvpress_rl.models import random_model, small_config
    from kvpress_rl.profiles import EMBEDDED_PROFILE, attach_profile

    quiet = Console(quiet=True)
    profiled = random_model(small_config("llama"))
    attach_profile(profiled, EMBEDDED_PROFILE)
    assert in_select_dtype(profiled, "auto", "cpu", quiet).dtype == torch.bfloat16
    for model, dtype, device in ((random_model(small_config("llama")), "auto", "cpu"), (profiled.float(), "float32", "cpu"),
                                 (profiled.float(), "auto", "cuda")):
        assert in_select_dtype(model, dtype, device, quiet).dtype == torch.float32  # plain profile, explicit dtype, or a GPU
