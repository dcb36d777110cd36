"""Run model-written Python against MBPP's tests, contained.

Each program runs in a fresh `python -I` subprocess (isolated mode: no user site, no PYTHON*
variables), in its own temporary directory, with an environment that holds nothing of ours (no
tokens, keys or paths leak into it), a wall-clock limit (10 s by default) and limits on address
space, CPU time, file size and processes set with `resource` before the program starts.
This is containment for honest mistakes (infinite loops, runaway allocation), not a security
boundary against hostile code: run untrusted models in a container.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30  # 1 GiB of address space


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "failed", "timeout", "memory", "no code"


_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def last_python_block(text: str) -> str | None:
    """The last fenced code block of a response, else the text before lm-eval's `[DONE]`, else None."""
    blocks = _BLOCK.findall(text)
    if blocks:
        return blocks[-1]
    if "[DONE]" in text:
        return text.split("[DONE]")[0]
    return text if re.search(r"^\s*def \w+\(", text, re.MULTILINE) else None


def _limit_resources(memory_bytes: int, cpu_seconds: int) -> None:  # runs in the child, before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
    os.setsid()


def run_tests(code: str, tests: list[str], setup: str = "", time_limit_s: float = TIME_LIMIT_S,
              memory_bytes: int = MEMORY_LIMIT_BYTES) -> Outcome:
    """Run `setup`, `code` and the assert lines of `tests`; passed only if the process exits 0."""
    program = "\n".join([setup, code, *tests, ""])
    with tempfile.TemporaryDirectory(prefix="kvrl-mbpp-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w") as handle:
            handle.write(program)
        environment = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=work, env=environment, capture_output=True, check=False,
                                  timeout=time_limit_s, preexec_fn=lambda: _limit_resources(memory_bytes, int(time_limit_s) + 1))
        except subprocess.TimeoutExpired:
            return Outcome(False, "timeout")
    if done.returncode == 0:
        return Outcome(True, "passed")
    if b"MemoryError" in done.stderr:
        return Outcome(False, "memory")
    if done.returncode < 0:  # killed by a signal: CPU limit (SIGXCPU) or the kernel
        return Outcome(False, "timeout" if -done.returncode in (9, 24) else "failed")
    return Outcome(False, "failed")


def score_mbpp(response: str, doc: dict) -> Outcome:
    code = last_python_block(response)
    if code is None:
        return Outcome(False, "no code")
    return run_tests(code, list(doc["test_list"]), doc.get("test_setup_code", "") or "")
