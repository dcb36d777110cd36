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
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.usefixtures("vllm_installed"), pytest.mark.engine]
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


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to `kvrl serve`'s process group (SIGKILL after a minute), and wait for it."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


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
        requests = [{"model": "embedded", "messages": [{"role": "user", "content": p.prompt()}], "temperature": 0,
                     "max_tokens": ANSWER_LIMITS[COUNTED_TASK]} for p in problems]
        answers = [post(f"http://127.0.0.1:{port}/v1/chat/completions", request)["choices"][0]["message"]["content"]
                   for request in requests]
    finally:
        stop(server)
        log.close()
    model, tokenizer = load_embedded()
    plan = plan_from_scores(HeadScores.load(RLKV_HEADS), 0.8)
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for problem, answer in zip(problems, answers):
        ids = torch.tensor([prompt_ids(tokenizer, problem)])
        with torch.inference_mode():
            out = generate(model, plan, ids, max_new_tokens=ANSWER_LIMITS[COUNTED_TASK], do_sample=False,
                           eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.parametrize("args, message", [
    (["--heads", str(RLKV_HEADS), "--sparsity", "0.5", "--speculative-config", "{}"],
     "speculative decoding is refused under a head plan"),
    (["--concurrency", "0"], "--concurrency must be a positive number"),
    (["--kv-cache-memory-bytes", "lots"], "--kv-cache-memory-bytes takes a number of bytes"),
    (["--enable-chunked-prefill"], "--enable-chunked-prefill is set by kvrl serve"),
    (["--dtype", "fp7"], "--dtype 'fp7' is not a dtype vLLM serves here"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 on the CPU build needs --kv-cache-memory-bytes"),
    (["--tensor-parallel-size", "2", "--concurrency", "4"], "--concurrency sizes a one-device cache"),
    (["--tensor-parallel-size", "2", "--kv-cache-memory-bytes", "100000000"],
     "the model's 3 KV heads do not divide by the tensor parallel size 2"),
    (["-tp", "2"], "pass the tensor parallel size as --tensor-parallel-size"),
])
def test_what_serve_cannot_run_exactly_is_refused_in_one_line(cli, args, message):
    result = cli("serve", *args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) <= 3


def status_of(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def preemptions(base: str) -> float:
    """vLLM's count of preempted requests since the server started (its Prometheus counter)."""
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def test_serve_stays_up_under_preemption_and_bad_requests_and_exits_when_its_engine_dies(tmp_path):
    """Concurrent long requests under a KV cache for about 2 of them (preemptions forced), seeded sampling beside them,
    bad requests: every good request completes with its length, bad ones get 4xx, the server answers after them; then
    the engine core is killed and `kvrl serve` exits 1 with one line, leaving nothing running."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    server = subprocess.Popen([KVRL, "serve", "--heads", str(RLKV_HEADS), "--sparsity", "0.5", "--port", str(port),
                               "--max-model-len", "1024", "--kv-cache-memory-bytes", "60000000", "--dtype", "float32",
                               "--max-num-seqs", "8"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{base}/health", server)
        printed = log_path.read_text()
        assert "KV cache: 57 MiB (--kv-cache-memory-bytes)" in printed
        assert "warning: --max-num-seqs 8 is more than" in printed
        generator = torch.Generator().manual_seed(0)
        # short prompts, long answers: all are admitted, then their growth outruns the cache
        lengths = (150, 120, 100, 140, 130, 110)
        prompts = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in lengths]
        greedy = [{"model": "embedded", "prompt": p, "max_tokens": 600, "temperature": 0,
                   "ignore_eos": True} for p in prompts]
        seeded = [{"model": "embedded", "prompt": prompts[0], "max_tokens": 40, "temperature": 0.8, "seed": s,
                   "ignore_eos": True} for s in (1, 2)]
        with ThreadPoolExecutor(len(greedy) + len(seeded)) as pool:
            answers = list(pool.map(lambda body: post(f"{base}/v1/completions", body), greedy + seeded))
        assert [a["usage"]["completion_tokens"] for a in answers] == [600] * len(greedy) + [40] * len(seeded)
        assert preemptions(base) > 0, "the KV cache was meant to force preemptions"
        bad = [b"{not json", json.dumps({"model": "embedded", "prompt": prompts[0], "max_tokens": -1}).encode(),
               json.dumps({"model": "embedded", "prompt": prompts[0] * 8, "max_tokens": 10}).encode()]
        assert all(400 <= status_of(f"{base}/v1/completions", body) < 500 for body in bad)
        after = post(f"{base}/v1/completions",
                     {"model": "embedded", "prompt": prompts[1], "max_tokens": 5, "temperature": 0})
        assert after["usage"]["completion_tokens"] == 5
        engine_cores = [pid for pid in descendants(server.pid)
                        if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                        or "EngineCore" in Path(f"/proc/{pid}/comm").read_text()]
        assert engine_cores, "vLLM's engine core runs in its own process"
        tree = descendants(server.pid)
        os.kill(engine_cores[0], signal.SIGKILL)
        assert server.wait(timeout=120) == 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    logged = log_path.read_text()
    assert "exiting 1 so that a supervisor restarts it" in logged or "stopping the server (exit 1)" in logged
    time.sleep(2)
    assert not [pid for pid in tree
                if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]


def test_an_answer_does_not_depend_on_the_load(tmp_path):
    """The same greedy completions sent all at once (batched with each other, prompts of different lengths prefilled
    together) and one at a time to a server at its default sizing (nothing preempted): the same tokens."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([KVRL, "serve", "--heads", str(RLKV_HEADS), "--sparsity", "0.8", "--port", str(port),
                               "--max-model-len", "1024", "--concurrency", "6", "--dtype", "float32"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{base}/health", server)
        assert "admits 6 concurrent sequences" in (tmp_path / "serve.log").read_text()
        generator = torch.Generator().manual_seed(1)
        bodies = [{"model": "embedded", "prompt": torch.randint(100, 40000, (n,), generator=generator).tolist(),
                   "max_tokens": 120, "temperature": 0, "ignore_eos": True} for n in (90, 400, 650, 200, 530, 300)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = pool.map(lambda body: post(f"{base}/v1/completions", body), bodies)
            loaded = [a["choices"][0]["text"] for a in answers]
        idle = [post(f"{base}/v1/completions", body)["choices"][0]["text"] for body in bodies]
        assert preemptions(base) == 0
    finally:
        stop(server)
        log.close()
    assert loaded == idle
