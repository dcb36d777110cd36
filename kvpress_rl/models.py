"""Model loading: a Hugging Face id, a local directory, a GGUF file, or a random-weight model from a config.

Only architectures whose attention the executor understands are accepted (`SUPPORTED_ARCHITECTURES`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpress_rl.embedded.model import EMBEDDED_MODEL, dequantized_copy, load_embedded
from kvpress_rl.errors import KvrlError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# `random:ARCH` builds a small random-weight model of that architecture (what unit tests and
# benchmarks build offline); `embedded` is the shipped reasoning model, the default.
RANDOM_PREFIX = "random:"
DEFAULT_MODEL = EMBEDDED_MODEL

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    """The attention layout a head pattern or a plan must match."""

    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_query_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_query_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_query_heads
        return cls(config.num_hidden_layers, num_kv_heads, num_query_heads, head_dim)

    @property
    def num_groups(self) -> int:
        return self.num_query_heads // self.num_kv_heads

    def check_heads_shape(self, shape: tuple[int, int], subject: str) -> None:
        """Refuse a per-(layer, KV head) object made for another model; `subject` opens the message ("plan has",
        "head scores have")."""
        expected = (self.num_layers, self.num_kv_heads)
        if tuple(shape) != expected:
            raise KvrlError(f"{subject} shape {shape[0]} layers x {shape[1]} KV heads, "
                            f"the model has {expected[0]} x {expected[1]}")


DEVICES = "cpu, cuda, cuda:N, mps"


def check_device(name: str) -> str:
    """The normalised device name (`cpu`, `cuda`, `cuda:N`, `mps`), or a one-line `KvrlError` for an unknown
    name or a device this machine does not have (no GPU, or N out of range)."""
    text = str(name).strip().lower()
    kind, sep, index = text.partition(":")
    if kind == "cpu" and not sep:
        return "cpu"
    if kind == "mps" and not sep:
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise KvrlError("--device mps: MPS is not available on this machine; use --device cpu")
        return "mps"
    if kind == "cuda" and (not sep or (index.isdigit() and index.isascii())):
        if not torch.cuda.is_available():
            raise KvrlError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if not sep:
            return "cuda"
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise KvrlError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return f"cuda:{int(index)}"
    raise KvrlError(f"unknown device {name!r}; accepted: {DEVICES}")


def available_device(requested: str | None) -> str:
    """The device to load on: `cuda` falls back to the CPU when there is no GPU (lm-eval's command line asks for
    `cuda` by default; HFLM does the same); under a data-parallel launch, plain `cuda` is this process's GPU."""
    if not requested or (requested.startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    if requested.startswith("cuda") and ":" not in requested and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one model copy per process
    return requested


def check_seed(seed: int, flag: str = "--seed") -> int:
    """Refuse a seed that torch and numpy do not accept: 0 <= seed < 2**32 (numpy's limit, the smaller one)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise KvrlError(f"{flag} must be an integer with 0 <= seed < 2**32 (= {2**32}), got {seed}")
    return seed


def model_spec(model: str | None) -> str:
    """What a `--model` value names: the value, else `$KVRL_MODEL`, else the embedded model."""
    return model or os.environ.get("KVRL_MODEL") or DEFAULT_MODEL


def auto_dtype(device: str, profile_dtype: str | None = None) -> str:
    """`--dtype auto`: bfloat16 on a GPU; on the CPU the dtype the model's profile asks for (None: float32)."""
    return "bfloat16" if device != "cpu" else profile_dtype or "float32"


def looks_like_path(spec: str) -> bool:
    """A --model value that is meant as a local path rather than a hub id."""
    return spec.endswith(".gguf") or ("/" in spec and spec.startswith((".", "/", "~")))


def check_supported(config: Any) -> None:
    """Raise `KvrlError` unless the executor supports this model's architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KvrlError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def small_config(arch: str = "llama", **overrides: Any):
    """A small config of a supported architecture (4 layers, 8 query heads over 4 KV heads).

    Tests and benchmarks override any field, e.g. `small_config("qwen2", num_key_value_heads=2)`.
    """
    from transformers import AutoConfig

    if arch not in SUPPORTED_ARCHITECTURES:
        raise KvrlError(f"unknown architecture {arch!r} for a random model; accepted: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    fields: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    if arch in ("mistral", "qwen2", "qwen3"):
        fields["sliding_window"] = None
    if arch == "qwen2":
        fields["use_sliding_window"] = False
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def random_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A causal LM with random weights built from `config` (no download)."""
    from transformers import AutoModelForCausalLM

    check_supported(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def load_model(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
):
    """Load `(model, tokenizer)`; the tokenizer is None for random-weight models.

    `model` is a Hugging Face id, a local directory, a `.gguf` file, `random:ARCH`, `embedded`, or
    None for the default (`KVRL_MODEL`, else `embedded`). `dtype` is `auto`, `float32`, `float16`
    or `bfloat16`. GGUF files are de-quantised once and cached (see `kvpress_rl.embedded.model`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = model_spec(model)
    if dtype != "auto" and dtype not in _DTYPES:
        raise KvrlError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(_DTYPES)}")
    torch_dtype = _DTYPES[auto_dtype(device) if dtype == "auto" else dtype]

    if spec == EMBEDDED_MODEL:
        return load_embedded(dtype=torch_dtype, device=device)
    if spec.startswith(RANDOM_PREFIX):
        lm = random_model(small_config(spec[len(RANDOM_PREFIX):]), dtype=torch_dtype)
        lm.name_or_path = spec
        return lm.to(device), None

    if looks_like_path(spec) and not Path(spec).expanduser().exists():  # not "Repo id must be in the form ..."
        what = "GGUF file not found" if spec.endswith(".gguf") else "the path does not exist"
        raise KvrlError(f"cannot load model {spec!r}: {what}")
    spec = str(Path(spec).expanduser()) if spec.startswith("~") else spec
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise KvrlError(f"GGUF file not found: {spec}")
        spec, gguf_file = str(path.parent), path.name
    elif gguf_file is not None and not (path / gguf_file).is_file():
        raise KvrlError(f"GGUF file not found: {path / gguf_file}")
    if gguf_file:  # de-quantise once, then load the cached safetensors copy like any directory
        label = str(Path(spec) / gguf_file)
        spec, gguf_file = str(dequantized_copy(Path(spec) / gguf_file)), None
        lm, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        lm.name_or_path = label
        return lm, tokenizer

    load_kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(spec, **load_kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KvrlError(f"cannot load model {spec!r}: {first_line}") from err
    check_supported(config)
    lm = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype, attn_implementation="sdpa", **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec, **load_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return lm.to(device).eval(), tokenizer


def model_id(model: Any) -> str:
    """The name recorded in provenance: the hub id or path the model was loaded from."""
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "unknown")


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for `model(...)` / `model.generate(...)`: transformers 5.24 names the cache argument `cache`,
    5.19 (the release vLLM's CPU build pins) `past_key_values`; the name is read off the model's own signature."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@contextmanager
def frozen(model: Any) -> Iterator[Any]:
    """The model's own weights take no gradient inside (gates trained around it still do); each parameter's
    `requires_grad` is given back on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)


@contextmanager
def using_attention(model: Any, implementation: str) -> Iterator[Any]:
    """The model runs `implementation` (a name transformers' `AttentionInterface` knows: "sdpa", "eager", or
    one kvrl registered) inside the block, set through transformers' public `set_attn_implementation`; the
    previous one is set back on exit."""
    previous = model.config._attn_implementation  # the only read of the private field: transformers has no getter
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
