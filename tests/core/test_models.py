import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvpress_rl import KvrlError, ModelShape, load_model
from kvpress_rl.models import SUPPORTED_ARCHITECTURES, check_device, check_seed, small_config


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_random_models_of_every_supported_architecture(arch):
    model, tokenizer = load_model(f"random:{arch}")
    assert tokenizer is None
    assert ModelShape.from_config(model.config) == ModelShape(4, 4, 8, 16)


def test_local_directory_loads_with_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = small_config("qwen2", vocab_size=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(31)} | {"<unk>": 31}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype="float32")
    assert model.config.model_type == "qwen2" and tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None  # a pad token is set so batches with left padding work


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(KvrlError, match="unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path))


def test_missing_model_and_bad_dtype_are_clear_errors(tmp_path):
    with pytest.raises(KvrlError, match="cannot load model"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(KvrlError, match="unknown dtype"):
        load_model("random:llama", dtype="float8")
    with pytest.raises(KvrlError, match="GGUF file not found"):
        load_model(str(tmp_path / "m.gguf"))


def test_dtype_option_is_applied():
    model, _ = load_model("random:llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_check_device_normalises_known_names_and_refuses_others(monkeypatch):
    assert check_device("cpu") == "cpu" and check_device(" CPU ") == "cpu"
    for bad in ("bogus", "cuda:x", "cpu:0", "cuda:-1", ""):
        with pytest.raises(KvrlError, match="unknown device") as caught:
            check_device(bad)
        assert "\n" not in str(caught.value) and "cpu, cuda, cuda:N" in str(caught.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KvrlError, match="no CUDA GPU"):
        check_device("cuda")
    with pytest.raises(KvrlError, match="no CUDA GPU"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda") == "cuda" and check_device("CUDA:01") == "cuda:1"
    with pytest.raises(KvrlError, match="2 CUDA GPU\\(s\\), cuda:0 to cuda:1"):
        check_device("cuda:2")


def test_seeds_must_fit_torch_and_numpy():
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 99999999999999999999999):
        with pytest.raises(KvrlError, match="0 <= seed < 2\\*\\*32"):
            check_seed(bad)


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "~/no-such-kvrl-model/x"])
def test_a_missing_model_path_is_called_a_missing_path(spec):
    with pytest.raises(KvrlError, match="the path does not exist") as caught:
        load_model(spec)
    assert "Repo id" not in str(caught.value)
