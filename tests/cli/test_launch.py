"""Data-parallel runs: the request every rank runs travels as JSON, and a rank that fails ends the whole run as one
line (the launching process stops every rank)."""

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from kvpress_rl.cli.eval_request import EvalRequest
from kvpress_rl.cli.launch import PEER_GRACE_S, decode_request, encode_request, failure_reported, first_report
from kvpress_rl.cli.select import SelectRequest
from tests.helpers import KVRL, only_error_line

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

REQUESTS = [
    SelectRequest(strategy="rlkv", strategy_args=("--steps", "2"), model=None, output="h.safetensors", seed=3,
                  resume=True),
    EvalRequest(tasks=None, strategies="random,rlkv", sparsities="0.2,0.5", seeds="0", model="embedded",
                heads="rlkv=h.safetensors", limit=4, batch_size=2, max_tokens=None, data_dir=None,
                compressed_policy="streaming", full_policy="snapkv", full_budgets="0.5,all", plan_rule="official",
                decoding_simulation=0, allow_code_execution=False, chat_template=None, device=None, dtype="auto",
                engine="transformers", output="out", recompute=True),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda request: type(request).__name__)
def test_a_request_comes_back_from_its_json_as_it_was(request_):
    kinds = {kind.__name__: kind for kind in (SelectRequest, EvalRequest)}
    assert decode_request(encode_request(request_), kinds) == request_


def test_the_failing_rank_s_own_report_wins_over_a_survivor_s_symptom(tmp_path):
    (tmp_path / "rank-0.peer").write_text("rank 0 of 2 lost another process")
    now = (tmp_path / "rank-0.peer").stat().st_mtime
    assert not failure_reported(tmp_path, now + 1)  # a symptom waits for the failing rank's own report...
    assert failure_reported(tmp_path, now + PEER_GRACE_S + 1)  # ...but not for ever
    assert first_report(tmp_path) == "rank 0 of 2 lost another process"
    (tmp_path / "rank-1.error").write_text("rank 1 of 2 failed: RuntimeError: boom")
    assert failure_reported(tmp_path, now + 1) and first_report(tmp_path) == "rank 1 of 2 failed: RuntimeError: boom"


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


def run_bounded(*args: str, cwd: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """`kvrl ARGS`, failing the test instead of hanging it: past `timeout` s, kvrl and every process it started are
    killed."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", COLUMNS="200", **env)
    process = subprocess.Popen([KVRL, *args], cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
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
    # rank 0 waits in all_reduce
    ("step", "rank 1 of 2 failed: RuntimeError: injected failure after the first step (traceback: "),
    # rank 0 waits in init_process_group
    ("options", "rank 1 of 2: invalid options for strategy 'fails-on-rank-1': injected failure before joining"),
])
def test_a_rank_that_fails_ends_the_run_with_one_line(tiny_rlkv, failing_site, tmp_path, fail, expected):
    work = tmp_path / "work"
    work.mkdir()
    args = list(tiny_rlkv())
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
