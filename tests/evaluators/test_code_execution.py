import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from kvpress_rl.evaluators import code_execution
from kvpress_rl.evaluators.code_execution import last_python_block, run_tests, score_mbpp

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def test_right_and_wrong_code():
    assert run_tests("def add(a, b):\n    return a + b", TESTS).passed
    assert run_tests("def add(a, b):\n    return a - b", TESTS).reason == "failed"


def test_code_that_loops_forever_is_stopped():
    outcome = run_tests("def add(a, b):\n    while True:\n        pass", TESTS, time_limit_s=2)
    assert not outcome.passed and outcome.reason == "timeout"


def test_code_that_allocates_without_bound_is_stopped():
    outcome = run_tests("def add(a, b):\n    hoard = []\n    while True:\n        hoard.append(bytearray(1 << 26))",
                        TESTS, time_limit_s=5)
    assert not outcome.passed and outcome.reason in ("memory", "failed")


def test_secrets_of_the_environment_are_not_inherited(monkeypatch):
    monkeypatch.setenv("KVRL_TEST_SECRET", "s3cret")
    reads_secret = ("import os\ndef add(a, b):\n    assert os.environ.get('KVRL_TEST_SECRET') == 's3cret'\n    return "
                    "a + b")
    assert not run_tests(reads_secret, TESTS).passed
    assert os.environ["KVRL_TEST_SECRET"] == "s3cret"


def test_each_program_gets_its_own_directory(tmp_path):
    writes = (f"import os\nopen('left.txt', 'w').write('x')\nassert os.getcwd() != {str(tmp_path)!r}\ndef add(a, b):\n "
              "   return a + b")
    assert run_tests(writes, TESTS).passed
    assert not (tmp_path / "left.txt").exists() and not os.path.exists("left.txt")


def test_the_last_python_block_is_the_answer():
    response = ("First try:\n```python\ndef add(a, b):\n    return 0\n```\nFixed:\n```python\ndef add(a, b):\n    "
                "return a + b\n```")
    assert "a + b" in last_python_block(response)
    assert score_mbpp(response, {"test_list": TESTS}).passed
    assert score_mbpp("I cannot do that.", {"test_list": TESTS}).reason == "no code"


# The promises of run_tests.


WRONG = "def add(a, b):\n    return a - b\n"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init counts as gone
    except FileNotFoundError:
        return True


def _reap(pids, seconds=2.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if not _gone(pid)]


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.parametrize("exit_early", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))",
    "import atexit, sys\natexit.register(lambda: sys.exit(0))",
])
def test_exiting_before_the_tests_end_is_not_a_pass(exit_early):
    outcome = run_tests(WRONG + exit_early, TESTS)
    assert not outcome.passed and outcome.reason == "failed"
    assert run_tests("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    pass", TESTS).passed


def test_background_children_die_with_the_program_on_time_out_and_on_exit():
    spawn = ("import subprocess\nkids = [subprocess.Popen(['sleep', '60']) for _ in range(5)]\nprint(*[k.pid for k in "
             "kids], flush=True)\n")
    for body, limit, reason in ((spawn + "while True:\n    pass\n", 2, "timeout"), (spawn, 10, "passed")):
        outcome = run_tests(body + "def add(a, b):\n    return a + b", TESTS, time_limit_s=limit)
        pids = [int(word) for word in outcome.stdout.split()]
        try:
            assert outcome.reason == reason and len(pids) == 5
            assert _reap(pids) == []
        finally:
            _kill(pids)


def test_the_number_of_processes_is_limited():
    if code_execution.sandbox_user() is None and os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC is not enforced for root and programs could not be run as another user here")
    forks = ("import os, time\nmade = []\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except "
             "OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    "
             "made.append(pid)\nprint(*made, flush=True)\ndef add(a, b):\n    return a + b")
    outcome = run_tests(forks, TESTS)
    pids = [int(word) for word in outcome.stdout.split()]
    try:
        assert outcome.passed and 0 < len(pids) < code_execution.PROCESS_LIMIT
        assert _reap(pids) == []
    finally:
        _kill(pids)


def test_the_callers_environment_cannot_be_read_through_proc(tmp_path):
    if os.geteuid() == 0 and code_execution.sandbox_user() is None:
        pytest.skip("running as root and no interpreter is usable by the sandbox user: /proc/<pid>/environ stays "
                    "readable")
    if os.geteuid() != 0:
        pytest.skip("not root: programs run as the caller, who may read its own /proc/<pid>/environ (documented)")
    # The secret must be in the caller's initial environment (what /proc/<pid>/environ shows), so the caller is a fresh
    # process.
    snoop = ("import os\nseen = b''\nwalked = 0\npid = os.getppid()\nwhile pid > 0:\n    walked += 1\n    try:\n"
             "        seen += open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        pass\n"
             "    pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
             "for name in os.listdir('/proc'):\n    if name.isdigit():\n        try:\n"
             "            seen += open(f'/proc/{name}/environ', 'rb').read()\n        except OSError:\n            "
             "pass\nprint('walked', walked)\nassert b'kvrl-s3cret-value' not in seen, 'secret found'\n"
             "def add(a, b):\n    return a + b")
    caller = ("import sys\nfrom kvpress_rl.evaluators.code_execution import run_tests\n"
              f"outcome = run_tests({snoop!r}, "
              f"{TESTS!r})\nprint(outcome.reason)\nprint(outcome.stdout)\nprint(outcome.stderr[-2000:])")
    done = subprocess.run([sys.executable, "-c", caller], env={**os.environ, "KVRL_TEST_SECRET": "kvrl-s3cret-value"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("passed") and "walked" in done.stdout, done.stdout


def test_a_straggler_writing_into_the_folder_does_not_abort_the_run():
    # a detached grandchild that lets go of every inherited pipe and keeps writing into the folder
    straggler = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        here = "
                 "os.getcwd()\n        null = os.open(os.devnull, os.O_RDWR)\n        for fd in (0, 1, 2):\n           "
                 " os.dup2(null, fd)\n        os.closerange(3, 4096)\n"
                 "        end = time.time() + 4\n        n = 0\n        while time.time() < end:\n            n = (n + "
                 "1) % 20\n            try:\n                os.makedirs(os.path.join(here, 'd', str(n)), "
                 "exist_ok=True)\n                open(os.path.join(here, 'd', str(n), 'f'), 'w').write('x')\n         "
                 "       time.sleep(0.001)\n            except OSError:\n                pass\n        os._exit(0)\n   "
                 " os._exit(0)\ntime.sleep(0.3)\ndef add(a, b):\n    return a + b")
    outcome = run_tests(straggler, TESTS)  # today: OSError "Directory not empty" from the clean-up
    assert outcome.passed, (outcome.reason, outcome.stdout[-500:], outcome.stderr[-1500:])


def test_folders_of_dead_callers_are_removed(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = os.path.join(tempfile.gettempdir(), f"{code_execution.FOLDER_PREFIX}{finished.pid}-test")
    live = os.path.join(tempfile.gettempdir(), f"{code_execution.FOLDER_PREFIX}1-test")
    for folder in (stale, live):
        os.makedirs(os.path.join(folder, "inner"), exist_ok=True)
    def ours() -> set[str]:
        return {name for name in os.listdir(tempfile.gettempdir())
                if name.startswith(f"{code_execution.FOLDER_PREFIX}{os.getpid()}-")}

    try:
        before = ours()
        assert run_tests("def add(a, b):\n    return a + b", TESTS).passed
        assert not os.path.exists(stale) and os.path.exists(live)
        assert ours() <= before  # a normal run leaves nothing behind
    finally:
        for folder in (stale, live):
            code_execution._remove(folder)


def test_huge_output_is_capped():
    outcome = run_tests("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\nprint('end')\n"
                        "def add(a, b):\n    return a + b", TESTS)
    assert outcome.passed
    assert len(outcome.stdout) <= code_execution.OUTPUT_LIMIT_BYTES + 100
    assert "bytes dropped" in outcome.stdout and outcome.stdout.rstrip().endswith("end")
