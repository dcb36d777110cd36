import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvpress_rl import KvrlError, ModelShape, load_model
from kvpress_rl.models import SUPPORTED_ARCHITECTURES, small_config


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
