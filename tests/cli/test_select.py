"""`kvrl select`: scores with provenance, strategy options from the command line; bad input is one line and exit 2
before any work; what a plugin's select returns is checked; a fresh rlkv run starts a clean work folder; a run
outside a terminal prints one plain line per step; `--num-processes N` on CPU processes."""

import json
import os

import pytest
import torch
from rich.console import Console
from transformers import AutoConfig

import kvpress_rl
import kvpress_rl.cli.output as output
from kvpress_rl import HeadScores, HeadSelector
from kvpress_rl.cli.select import in_select_dtype
from kvpress_rl.models import random_model, small_config
from kvpress_rl.plugins import StrategyEntry
from kvpress_rl.profiles import EMBEDDED_PROFILE, attach_profile
from tests.helpers import error_line, only_error_line, run_kvrl

RANDOM = ("select", "--strategy", "random", "--model", "random:llama")
TINY = ("--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "64",
        "--no-self-distillation")


def test_select_writes_scores_with_provenance(cli, tmp_path):
    result = cli(*RANDOM, "--seed", "4", "--output", "r.safetensors")
    assert result.exit_code == 0, result.output
    scores = HeadScores.load(tmp_path / "r.safetensors")
    assert scores.seed == 4 and scores.model_id == "random:llama" and scores.shape == (4, 4)
    assert scores.extra["weights"] == "random:llama" and scores.extra["code"].startswith(kvpress_rl.__version__)


def test_select_sets_strategy_options_from_the_command_line(cli, tmp_path):
    HeadScores(torch.rand(4, 4)).to_tsv(tmp_path / "p.tsv")
    result = cli("select", "--strategy", "file", "--model", "random:llama", "--path", "p.tsv", "--output", "f.tsv")
    assert result.exit_code == 0, result.output
    assert torch.allclose(HeadScores.load(tmp_path / "f.tsv").scores, HeadScores.load(tmp_path / "p.tsv").scores)


def test_select_prints_one_plain_line_per_step_outside_a_terminal(cli):
    # CliRunner's output is not a terminal: no progress bar, no colours, one line per step
    result = cli("select", "--strategy", "duo", "--model", "random:llama", "--steps", "2", "--context-length", "40",
                 "--output", "duo.safetensors")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith("duo step ")]
    assert [line.split(",")[0] for line in steps] == ["duo step 1/2", "duo step 2/2"]
    assert all("loss" in line for line in steps)
    assert "\x1b[" not in result.output and "━" not in result.output
    assert "wrote duo.safetensors" in result.output


def test_existing_output_needs_overwrite(cli, tmp_path):
    assert cli(*RANDOM, "--seed", "1").exit_code == 0
    before = (tmp_path / "heads-random.safetensors").read_bytes()
    assert "pass --overwrite" in error_line(cli(*RANDOM, "--seed", "2"))
    assert (tmp_path / "heads-random.safetensors").read_bytes() == before
    assert cli(*RANDOM, "--seed", "2", "--overwrite").exit_code == 0
    assert HeadScores.load(tmp_path / "heads-random.safetensors").seed == 2


def test_select_runs_the_embedded_profile_in_bfloat16_unless_a_dtype_is_given():
    quiet = Console(quiet=True)
    profiled = random_model(small_config("llama"))
    attach_profile(profiled, EMBEDDED_PROFILE)
    assert in_select_dtype(profiled, "auto", "cpu", quiet).dtype == torch.bfloat16
    # a plain profile, an explicit dtype, or a GPU
    for model, dtype, device in ((random_model(small_config("llama")), "auto", "cpu"),
                                 (profiled.float(), "float32", "cpu"), (profiled.float(), "auto", "cuda")):
        assert in_select_dtype(model, dtype, device, quiet).dtype == torch.float32


# --- one line, exit 2, before any work -------------------------------------------------------------
def test_unknown_strategy_lists_the_available_ones(cli):
    assert error_line(cli("select", "--strategy", "nope")) == (
        "Error: unknown strategy 'nope'; available: duo, file, h2o, random, retrieval, rkv, rlkv, snapkv, streaming")


def test_unknown_strategy_option_lists_accepted(cli, tmp_path):
    line = error_line(cli("select", "--strategy", "file", "--depth", "3"))
    assert "unknown option --depth" in line and "--path" in line
    assert list(tmp_path.iterdir()) == []


def test_scores_for_another_model_are_refused_and_nothing_written(cli, head_patterns, tmp_path):
    line = error_line(cli("select", "--strategy", "file", "--model", "random:llama", "--path",
                          str(head_patterns / "Llama-3.1-8B-R1" / "rlkv.tsv"), "--output", "x.safetensors"))
    assert "32 layers x 8 KV heads, the model has 4 x 4" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_unsupported_architecture(cli, tmp_path):
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    line = error_line(cli("select", "--strategy", "random", "--model", str(tmp_path / "gpt2")))
    assert "unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3" in line
    assert not (tmp_path / "heads-random.safetensors").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--strategy", "rlkv", "--rollout-engine", "sglang"],
     "unknown --rollout-engine 'sglang'; accepted: auto, transformers, vllm"),
    (["--strategy", "random", "--rollout-engine", "vllm"], "'random' samples nothing"),
    (["--strategy", "rlkv", "--rollout-engine", "vllm", "--model", "random:qwen2"],
     "loads a folder of weights or a hub id"),
    (["--strategy", "rlkv", "--rollout-engine", "vllm", "--num-processes", "2"], "drop --num-processes"),
])
def test_rollout_engine_is_refused_where_it_cannot_run(cli, tmp_path, args, expected):
    assert expected in error_line(cli("select", *args))
    assert list(tmp_path.iterdir()) == []  # nothing written, no model loaded


@pytest.mark.parametrize("device", ["bogus", "cuda:banana", "cpu:3"])
def test_an_unknown_device_is_one_line(cli, device):
    assert "unknown device" in error_line(cli(*RANDOM, "--device", device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(cli):
    assert "no CUDA GPU" in error_line(cli(*RANDOM, "--device", "cuda"))


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", str(2**32)])
def test_a_seed_torch_or_numpy_refuses_is_one_line(cli, seed):
    assert "--seed must be an integer with 0 <= seed < 2**32" in error_line(cli(*RANDOM, "--seed", seed))


def test_output_under_a_file_is_refused_before_the_work(cli, tmp_path):
    (tmp_path / "taken").write_text("")
    line = error_line(cli(*RANDOM, "-o", "taken/heads.safetensors"))
    assert "taken is a file, not a folder" in line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_output_into_a_read_only_folder_is_refused_before_the_work(cli, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("kvpress_rl.models.load_model", never)
    assert "cannot write in /proc" in error_line(cli(*RANDOM, "-o", "/proc/heads.safetensors"))


def test_a_work_folder_that_is_a_file_is_refused_before_the_work(cli, tmp_path):
    (tmp_path / "heads.run").write_text("")
    assert "heads.run: it is a file" in error_line(cli(*RANDOM, "-o", "heads.safetensors"))


@pytest.mark.parametrize("option, value, accepted", [("--checkpoint-every", "0", ">= 1"), ("--temperature", "0", "> 0"),
                                                      ("--temperature", "-0.5", "> 0"), ("--group-size", "1", ">= 2")])
def test_rlkv_options_out_of_range_are_refused_with_the_range(cli, option, value, accepted):
    line = error_line(cli("select", "--strategy", "rlkv", option, value))
    assert f"{option} must be {accepted}, got" in line


def test_a_missing_model_path_says_so(cli):
    line = error_line(cli("select", "--strategy", "random", "--model", "./models/nothing-here"))
    assert "the path does not exist" in line and "Repo id" not in line


# --- what a plugin's select returns -------------------------------------------------------------------
class WrongShape(HeadSelector):
    name = "wrong-shape"

    def select(self, model, tokenizer, context):
        return self.scores(torch.rand(3, 2), "m", context, 0.0)


class BareTensor(HeadSelector):
    name = "bare-tensor"

    def select(self, model, tokenizer, context):
        return torch.rand(4, 4)


class Exits(HeadSelector):
    name = "exits"

    def select(self, model, tokenizer, context):
        raise SystemExit(0)


def with_plugin_strategies(monkeypatch, *classes, origin="kvrl-plugin"):
    real = output.discover_strategies

    def discover():
        return {**real(), **{cls.name: StrategyEntry(cls, origin) for cls in classes}}

    monkeypatch.setattr(output, "discover_strategies", discover)


@pytest.mark.parametrize("cls, expected", [
    (WrongShape, "returned the wrong shape: head scores have shape 3 layers x 2 KV heads, the model has 4 x 4"),
    (BareTensor, "returned Tensor, not HeadScores"),
    (Exits, "called exit(0) in select"),
])
def test_what_a_plugin_select_returns_is_checked_before_writing(cli, monkeypatch, tmp_path, cls, expected):
    with_plugin_strategies(monkeypatch, cls, origin="kvrl-odd")
    line = error_line(cli("select", "--strategy", cls.name, "--model", "random:llama", "-o", "out.safetensors"))
    assert f"strategy '{cls.name}' (kvrl-odd)" in line and expected in line
    assert not (tmp_path / "out.safetensors").exists()


# --- rlkv: work folder, resume, progress -------------------------------------------------------------
def logged_steps(work):
    return [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()]


def test_an_overwriting_run_starts_a_clean_work_folder(cli, tiny_rlkv, tmp_path):
    assert cli(*tiny_rlkv(), "-o", "h.safetensors").exit_code == 0
    assert logged_steps(tmp_path / "h.run") == [1, 2, 3]
    again = cli(*tiny_rlkv(steps=2), "-o", "h.safetensors", "--overwrite")
    assert again.exit_code == 0, again.output
    assert logged_steps(tmp_path / "h.run") == [1, 2]  # not 1, 2, 3, 1, 2
    assert torch.load(tmp_path / "h.run" / "checkpoint.pt", weights_only=False)["step"] == 2
    # an earlier run's folder without its output (an interrupted run): neither resumed nor replaced silently
    (tmp_path / "h.safetensors").unlink()
    line = error_line(cli(*tiny_rlkv(steps=2), "-o", "h.safetensors"))
    assert "h.run holds an earlier run" in line and "--resume" in line and "--overwrite" in line


def test_resume_from_a_damaged_checkpoint_is_one_line(cli, tiny_rlkv, tmp_path):
    work = tmp_path / "h.run"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    line = error_line(cli(*tiny_rlkv(), "-o", "h.safetensors", "--resume"))
    assert "checkpoint.pt is damaged" in line and "without --resume" in line


@pytest.mark.slow
def test_outside_a_terminal_every_step_prints_one_plain_line(tiny_rlkv, tmp_path):
    result = run_kvrl(*tiny_rlkv(steps=2), "-o", "h.tsv", cwd=tmp_path, timeout=170)  # stdout is a pipe
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("rlkv step ")]
    assert [line.split(",")[0] for line in lines] == ["rlkv step 1/2", "rlkv step 2/2"]
    assert all("reward " in line and "mean alpha " in line and line.endswith(" s") for line in lines)
    assert "\x1b[" not in result.stdout  # no terminal control codes in a log file


# --- --num-processes N: the same select under `accelerate launch`, on the embedded model and CPU processes ---
@pytest.mark.slow
def test_rlkv_select_on_two_processes_writes_one_file(tmp_path):
    result = run_kvrl("select", "--strategy", "rlkv", "--num-processes", "2", *TINY, "--output", "heads.safetensors",
                      cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote heads.safetensors") == 1  # rank 0 alone reports
    assert "2 processes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.run", "heads.safetensors"]
    assert not list((tmp_path / "heads.run").glob("rank*"))
    scores = HeadScores.load(tmp_path / "heads.safetensors")
    assert scores.shape == (30, 3) and scores.strategy == "rlkv"
    # the checkpoint's gates (rank 0's, every process having taken the same all-reduced step) are the file's, and moved
    checkpoint = torch.load(tmp_path / "heads.run" / "checkpoint.pt", weights_only=False)
    assert len(checkpoint["rng"]) == 2  # both processes took part (their sampling states are gathered)
    assert torch.equal(scores.scores, checkpoint["gates"].float())
    assert (scores.scores < 1.0).any()
    assert len((tmp_path / "heads.run" / "train_log.jsonl").read_text().splitlines()) == 1  # one step, logged once


def test_bad_input_for_two_processes_is_refused_before_any_rank_starts(cli):
    line = error_line(cli("select", "--strategy", "rlkv", "--num-processes", "2", "--no-such-option", "1"))
    assert "unknown option --no-such-option" in line


@pytest.mark.slow
def test_bad_input_inside_the_ranks_is_one_line(tmp_path):
    # refused inside the ranks (every rank fails to load the model): still shown once
    result = run_kvrl("select", "--strategy", "rlkv", "--num-processes", "2", "--model", str(tmp_path / "missing"),
                      *TINY, cwd=tmp_path)
    assert "cannot load model" in only_error_line(result)
    assert not list(tmp_path.glob("heads-*"))


def test_auto_rollout_engine_keeps_transformers_where_vllm_cannot_run_the_model(cli, tiny_rlkv, tmp_path):
    """The tiny model's 16-wide heads are not a size vLLM's CPU attention runs: `auto` says so and samples in
    transformers."""
    pytest.importorskip("vllm")
    result = cli(*tiny_rlkv(steps=1), "-o", "h.safetensors")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "--rollout-engine auto: transformers (not vllm: vLLM's CPU attention runs head sizes 32, 64," in said
    assert "this model's is 16)" in said
    assert HeadScores.load(tmp_path / "h.safetensors").extra["rollout_engine"] == "transformers"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's head sizes")
def test_auto_rollout_engine_picks_vllm_for_the_embedded_model():
    """What `kvrl select --strategy rlkv` on the embedded model samples with where vLLM is installed (before any
    engine starts), and what it keeps for strategies that sample nothing or for several processes."""
    pytest.importorskip("vllm")
    from kvpress_rl.cli.select import chosen_rollout_engine
    from kvpress_rl.plugins import get_strategy

    show = Console(record=True, width=200)
    rlkv, random = get_strategy("rlkv"), get_strategy("random")
    assert chosen_rollout_engine("auto", rlkv, None, None, 1, show) == "vllm"
    assert chosen_rollout_engine("auto", rlkv, None, None, 2, show) == "transformers"
    assert chosen_rollout_engine("auto", random, None, None, 1, show) == "transformers"
    assert chosen_rollout_engine("auto", rlkv, "random:llama", None, 1, show) == "transformers"
    lines = show.export_text().splitlines()
    assert lines[0] == "--rollout-engine auto: vllm (--rollout-engine transformers for the learner's own loop)"
    assert lines[1] == "--rollout-engine auto: transformers (not vllm: it runs in one process)"
    assert lines[2].startswith("--rollout-engine auto: transformers (not vllm: the vLLM engine loads a folder")
    assert len(lines) == 3  # a strategy that samples nothing says nothing
