import os

from kvpress_rl.evaluators.code_execution import last_python_block, run_tests, score_mbpp

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def test_right_and_wrong_code():
    assert run_tests("def add(a, b):\n    return a + b", TESTS).passed
    assert run_tests("def add(a, b):\n    return a - b", TESTS).reason == "failed"


def test_code_that_loops_forever_is_stopped():
    outcome = run_tests("def add(a, b):\n    while True:\n        pass", TESTS, time_limit_s=2)
    assert not outcome.passed and outcome.reason == "timeout"


def test_code_that_allocates_without_bound_is_stopped():
    outcome = run_tests("def add(a, b):\n    hoard = []\n    while True:\n        hoard.append(bytearray(1 << 26))", TESTS, time_limit_s=5)
    assert not outcome.passed and outcome.reason in ("memory", "failed")


def test_secrets_of_the_environment_are_not_inherited(monkeypatch):
    monkeypatch.setenv("KVRL_TEST_SECRET", "s3cret")
    reads_secret = "import os\ndef add(a, b):\n    assert os.environ.get('KVRL_TEST_SECRET') == 's3cret'\n    return a + b"
    assert not run_tests(reads_secret, TESTS).passed
    assert os.environ["KVRL_TEST_SECRET"] == "s3cret"


def test_each_program_gets_its_own_directory(tmp_path):
    writes = f"import os\nopen('left.txt', 'w').write('x')\nassert os.getcwd() != {str(tmp_path)!r}\ndef add(a, b):\n    return a + b"
    assert run_tests(writes, TESTS).passed
    assert not (tmp_path / "left.txt").exists() and not os.path.exists("left.txt")


def test_the_last_python_block_is_the_answer():
    response = "First try:\n```python\ndef add(a, b):\n    return 0\n```\nFixed:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert "a + b" in last_python_block(response)
    assert score_mbpp(response, {"test_list": TESTS}).passed
    assert score_mbpp("I cannot do that.", {"test_list": TESTS}).reason == "no code"
