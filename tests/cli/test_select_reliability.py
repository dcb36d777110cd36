"""`kvrl select` and the CLI: bad input is one line and exit 2 before any work; plugins cannot break kvrl; a fresh
rlkv run starts a clean work folder; a run outside a terminal prints one plain line per step."""

import json
import os
import subprocess
import time

import psutil
import pytest
import torch

import kvpress_rl.cli.output as output
import kvpress_rl.plugins as plugins
from kvpress_rl import HeadSelector, hookimpl
from kvpress_rl.cli.launch import PEER_GRACE_S, failure_reported, first_report
from kvpress_rl.plugins import StrategyEntry
from tests.helpers import KVRL, error_line, only_error_line, run_kvrl, tiny_model_and_tokenizer

RANDOM = ("select", "--strategy", "random", "--model", "random:llama")


# --- one line, exit 2, before any work -------------------------------------------------------------
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


def test_a_tsv_of_random_bytes_is_one_line(cli, tmp_path):
    (tmp_path / "noise.tsv").write_bytes(os.urandom(512) + b"\xff\xfe")
    assert "not a TSV of numbers" in error_line(cli("plan", "--heads", "noise.tsv", "--sparsity", "0.5"))
    (tmp_path / "empty.tsv").write_text("")
    assert "is empty" in error_line(cli("plan", "--heads", "empty.tsv", "--sparsity", "0.5"))


# --- plugins ----------------------------------------------------------------------------------------
class Quitter:
    name, dist = "quitter", type("Dist", (), {"name": "kvrl-quitter"})()

    def load(self):
        raise SystemExit(0)


def test_a_plugin_that_exits_on_import_does_not_silence_kvrl(cli, monkeypatch):
    real = plugins.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real(group=group), Quitter()])
    listing = cli("strategies")
    assert listing.exit_code == 0 and "random" in listing.output and "rlkv" in listing.output
    assert "'quitter' from kvrl-quitter failed to load" in listing.output
    selected = cli(*RANDOM, "-o", "r.tsv")
    assert selected.exit_code == 0 and "wrote r.tsv" in selected.output


class Marked(HeadSelector):
    """Doc with [bold]markup[/bold] and 1[r_bar > tau] in it."""

    name = "marked"
    description = "closes a tag it never opened [/bold] and [red]colours[/red]"


def with_plugin_strategies(monkeypatch, *classes, origin="kvrl-plugin"):
    real = output.discover_strategies

    def discover():
        return {**real(), **{cls.name: StrategyEntry(cls, origin) for cls in classes}}

    monkeypatch.setattr(output, "discover_strategies", discover)


def test_user_text_is_printed_as_is_never_as_markup(cli, monkeypatch):
    with_plugin_strategies(monkeypatch, Marked)
    listing = cli("strategies")
    assert listing.exit_code == 0, listing.output
    assert "[/bold]" in " ".join(listing.output.split())
    detail = cli("strategies", "marked")
    assert detail.exit_code == 0, detail.output
    text = " ".join(detail.output.split())
    assert "[/bold] and [red]colours[/red]" in text and "[bold]markup[/bold] and 1[r_bar > tau]" in text
    rlkv = " ".join(cli("strategies", "rlkv").output.split())
    assert "1[r_bar > tau]" in rlkv


def test_a_plugin_warning_with_markup_is_printed_as_is(cli, monkeypatch):
    module = type("M", (), {})()

    @hookimpl
    def kvrl_strategies():
        raise RuntimeError("[/red] broken [bold]")

    module.kvrl_strategies = kvrl_strategies
    monkeypatch.setattr(output, "discover_strategies", lambda: plugins.discover_strategies([("odd-dist", module)]))
    listing = cli("strategies")
    assert listing.exit_code == 0 and "[/red] broken [bold]" in listing.output


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


@pytest.mark.parametrize("cls, expected", [(WrongShape, "returned the wrong shape: head scores have shape 3 layers x 2 KV heads, the model has 4 x 4"),
                                           (BareTensor, "returned Tensor, not HeadScores"),
                                           (Exits, "called exit(0) in select")])
def test_what_a_plugin_select_returns_is_checked_before_writing(cli, monkeypatch, tmp_path, cls, expected):
    with_plugin_strategies(monkeypatch, cls, origin="kvrl-odd")
    line = error_line(cli("select", "--strategy", cls.name, "--model", "random:llama", "-o", "out.safetensors"))
    assert f"strategy '{cls.name}' (kvrl-odd)" in line and expected in line
    assert not (tmp_path / "out.safetensors").exists()


# --- rlkv: work folder, resume, progress -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a tokenizer, saved like a local model, and a training file."""
    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(20)))
    return root


def tiny_rlkv(tiny_dir, steps=3):
    return ("select", "--strategy", "rlkv", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "train.jsonl"),
            "--steps", str(steps), "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "3", "--no-self-distillation",
            "--lr", "0.05", "--checkpoint-every", "1", "--micro-batch-tokens", "40", "--sink", "1", "--window", "2",
            "--train-mask", "token", "--no-gradient-checkpointing", "--rollout-batch", "2")


def logged_steps(work):
    return [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()]


def test_an_overwriting_run_starts_a_clean_work_folder(cli, tiny_dir, tmp_path):
    assert cli(*tiny_rlkv(tiny_dir), "-o", "h.safetensors").exit_code == 0
    assert logged_steps(tmp_path / "h.run") == [1, 2, 3]
    again = cli(*tiny_rlkv(tiny_dir, steps=2), "-o", "h.safetensors", "--overwrite")
    assert again.exit_code == 0, again.output
    assert logged_steps(tmp_path / "h.run") == [1, 2]  # not 1, 2, 3, 1, 2
    assert torch.load(tmp_path / "h.run" / "checkpoint.pt", weights_only=False)["step"] == 2
    # an earlier run's folder without its output (an interrupted run): neither resumed nor replaced silently
    (tmp_path / "h.safetensors").unlink()
    line = error_line(cli(*tiny_rlkv(tiny_dir, steps=2), "-o", "h.safetensors"))
    assert "h.run holds an earlier run" in line and "--resume" in line and "--overwrite" in line


def test_resume_from_a_damaged_checkpoint_is_one_line(cli, tiny_dir, tmp_path):
    work = tmp_path / "h.run"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    line = error_line(cli(*tiny_rlkv(tiny_dir), "-o", "h.safetensors", "--resume"))
    assert "checkpoint.pt is damaged" in line and "without --resume" in line


def test_outside_a_terminal_every_step_prints_one_plain_line(tiny_dir, tmp_path):
    result = run_kvrl(*tiny_rlkv(tiny_dir, steps=2), "-o", "h.tsv", cwd=tmp_path, timeout=170)  # stdout is a pipe
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("rlkv step ")]
    assert [line.split(",")[0] for line in lines] == ["rlkv step 1/2", "rlkv step 2/2"]
    assert all("reward " in line and "mean alpha " in line and line.endswith(" s") for line in lines)
    assert "\x1b[" not in result.stdout  # no terminal control codes in a log file


# --- a rank that fails ends the whole data-parallel run, as one line ---------------------------------
FAILING_PLUGIN = """
import os

from kvpress_rl import hookimpl
from kvpress_rl.errors import KvrlError
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions

FAIL = os.environ.get("KVRL_TEST_FAIL") if os.environ.get("RANK") == "1" else None


class FailingOptions(RLKVOptions):
    def __post_init__(self):
        super().__post_init__()
        if FAIL == "options":  # on rank 1 alone, before it joins the process group
            raise KvrlError("injected failure before joining")


class FailsOnRank1(RLKV):
    name = "fails-on-rank-1"
    Options = FailingOptions

    def _step(self, *args, **kwargs):
        record = super()._step(*args, **kwargs)
        if FAIL == "step":  # after the first step: rank 0 goes on and waits in the next collective
            raise RuntimeError("injected failure after the first step")
        return record


@hookimpl
def kvrl_strategies():
    return [FailsOnRank1]
"""


@pytest.fixture(scope="module")
def failing_site(tmp_path_factory):
    """A plugin strategy that fails on rank 1, installed as a distribution (entry point) on a PYTHONPATH folder."""
    site = tmp_path_factory.mktemp("failing-site")
    (site / "kvrl_failing.py").write_text(FAILING_PLUGIN)
    info = site / "kvrl_failing-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvrl-failing\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kvpress_rl]\nfailing = kvrl_failing\n")
    return site


def run_bounded(*args: str, cwd, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """`kvrl ARGS`, failing the test instead of hanging it: past `timeout` s, kvrl and every process it started are killed."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", **env)
    process = subprocess.Popen([KVRL, *args], cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True):  # the ranks have sessions of their own
            child.kill()
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s (a rank waits for one that failed): {stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def processes_in(folder) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cwd"]):
        if process.info["cwd"] == str(folder):
            found.append(process)
    return found


@pytest.mark.parametrize("fail, expected", [
    ("step", "rank 1 of 2 failed: RuntimeError: injected failure after the first step (traceback: "),  # rank 0 in all_reduce
    ("options", "rank 1 of 2: invalid options for strategy 'fails-on-rank-1': injected failure before joining"),  # rank 0 in init_process_group
])
def test_a_rank_that_fails_ends_the_run_with_one_line(tiny_dir, failing_site, tmp_path, fail, expected):
    work = tmp_path / "work"
    work.mkdir()
    args = list(tiny_rlkv(tiny_dir))
    args[args.index("rlkv")] = "fails-on-rank-1"
    began = time.monotonic()
    result = run_bounded(*args, "--num-processes", "2", "-o", "h.safetensors", cwd=work, timeout=240,
                         PYTHONPATH=str(failing_site), KVRL_TEST_FAIL=fail, TMPDIR=str(tmp_path))
    line = only_error_line(result)  # exit 2, no traceback, no torchrun failure report
    assert expected in line, line
    assert time.monotonic() - began < 200
    assert not processes_in(work), "a rank outlived the run"
    assert not (work / "h.safetensors").exists()
    if fail == "step":
        trace = line.split("(traceback: ")[1].rstrip(")")
        assert trace.startswith(str(tmp_path)) and "RuntimeError: injected failure" in open(trace).read()


def test_the_failing_rank_s_own_report_wins_over_a_survivor_s_symptom(tmp_path):
    (tmp_path / "rank-0.peer").write_text("rank 0 of 2 lost another process")
    now = (tmp_path / "rank-0.peer").stat().st_mtime
    assert not failure_reported(tmp_path, now + 1)  # a symptom waits for the failing rank's own report...
    assert failure_reported(tmp_path, now + PEER_GRACE_S + 1)  # ...but not for ever
    assert first_report(tmp_path) == "rank 0 of 2 lost another process"
    (tmp_path / "rank-1.error").write_text("rank 1 of 2 failed: RuntimeError: boom")
    assert failure_reported(tmp_path, now + 1) and first_report(tmp_path) == "rank 1 of 2 failed: RuntimeError: boom"
