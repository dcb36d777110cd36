"""`kvrl serve`: bad input stops in one line before vLLM starts; a real server on 127.0.0.1 answers chat completions
with the executor's greedy answers under the same plan, and stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("vllm_installed")
RLKV_HEADS = REPO_ROOT / "benchmarks" / "results" / "heads-rlkv-embedded-count.safetensors"
KVRL = str(Path(sys.executable).with_name("kvrl"))


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0.5"], "--sparsity 0.5 needs --heads"),
    (["--heads", str(RLKV_HEADS), "--sparsity", "1.5"], "sparsity 1.5 is outside [0, 1]"),
    (["--heads", str(RLKV_HEADS), "--sparsity", "0.5", "--block-size", "16"], "--block-size is set by kvrl serve"),
    (["--model", "random:llama"], "loads a folder of weights or a hub id"),
])
def test_bad_input_is_one_line_before_vllm_starts(cli, args, message):
    result = cli("serve", *args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) <= 3  # click's usage line + the error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_until_healthy(url: str, server: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"kvrl serve exited with {server.returncode} before it listened")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"kvrl serve did not answer {url} within {seconds:.0f} s")


def test_serve_answers_chat_completions_as_the_executor(tmp_path):
    from kvpress_rl.embedded.data import prompt_ids
    from kvpress_rl.embedded.model import load_embedded
    from kvpress_rl.embedded.task import ANSWER_LIMITS, COUNTED_TASK, task_problems
    from kvpress_rl.executor import generate
    from kvpress_rl.plan import plan_from_scores
    from kvpress_rl.scores import HeadScores

    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([KVRL, "serve", "--heads", str(RLKV_HEADS), "--sparsity", "0.8", "--port", str(port),
                               "--max-model-len", "2048", "--dtype", "float32", "--max-num-seqs", "4"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", server)
        printed = (tmp_path / "serve.log").read_text()
        assert "compressed to 16 sink + 64 recent tokens" in printed and f"http://127.0.0.1:{port}/v1" in printed
        problems = task_problems(COUNTED_TASK, "test", 3)
        answers = [post(f"http://127.0.0.1:{port}/v1/chat/completions",
                        {"model": "embedded", "messages": [{"role": "user", "content": p.prompt()}], "temperature": 0,
                         "max_tokens": ANSWER_LIMITS[COUNTED_TASK]})["choices"][0]["message"]["content"] for p in problems]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    model, tokenizer = load_embedded()
    plan = plan_from_scores(HeadScores.load(RLKV_HEADS), 0.8)
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for problem, answer in zip(problems, answers):
        ids = torch.tensor([prompt_ids(tokenizer, problem)])
        with torch.inference_mode():
            out = generate(model, plan, ids, max_new_tokens=ANSWER_LIMITS[COUNTED_TASK], do_sample=False, eos_token_id=end_ids,
                           pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
