"""What `kvrl eval` checks before any model loads (and before any process is launched): bad input is one line and
exit 2, whether it runs in one process or would launch two."""

import time

import pytest

from kvpress_rl.cli.eval_request import eval_dtype, model_identity
from kvpress_rl.errors import KvrlError
from tests.helpers import error_line


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize("args, env, message", [
    (("--seeds=-1",), {}, "--seeds must be an integer with 0 <= seed"),
    (("--strategy", "rlkv", "--heads", "missing.safetensors"), {}, "head scores file not found: missing.safetensors"),
    (("--output", "a-file/out"), {}, "--output a-file/out is not writable"),
    (("--device", "tpu"), {}, "unknown device 'tpu'"),
    (("--strategy", "random,rlkv"), {}, "run `kvrl select --strategy rlkv --output heads-rlkv.safetensors` first"),
    ((), {"KVRL_MODEL": "./no-such-model"}, "model path does not exist: ./no-such-model"),
])
def test_bad_input_is_one_line_before_the_model_loads(cli, monkeypatch, tmp_path, processes, args, env, message):
    monkeypatch.delenv("KVRL_MODEL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "a-file").write_text("")
    began = time.monotonic()
    assert message in error_line(cli("eval", "--num-processes", processes, *args))
    assert time.monotonic() - began < 60  # no model was loaded, no process launched
    assert not (tmp_path / "kvrl-eval" / "grid.csv").exists() and not (tmp_path / "kvrl-eval" / "results").exists()


def test_the_model_is_recorded_as_named_a_local_path_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert model_identity("embedded") == "embedded" and model_identity("random:llama") == "random:llama"
    assert model_identity("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"  # a hub id
    assert model_identity("./model") == str((tmp_path / "model").resolve())
    with pytest.raises(KvrlError, match="model path does not exist: ./absent"):
        model_identity("./absent")


def test_auto_is_bfloat16_on_a_gpu_and_the_profile_s_on_the_cpu():
    assert eval_dtype("auto", "embedded", "cuda:0") == "bfloat16"
    assert eval_dtype("auto", "embedded", "cpu") == "bfloat16"  # the embedded model's profile
    assert eval_dtype("auto", "Qwen/Qwen2.5-7B", "cpu") == "float32"
    assert eval_dtype("float16", "embedded", "cpu") == "float16"
