"""The vLLM internals kvpress-rl's engine reads, in one place, for the vLLM release it is written against (0.32).

Everything else in `kvpress_rl.engines.vllm` uses vLLM's public extension points (model registry, attention backends,
KV-cache spec registry, general plugins); what is here reaches past them (private names) and is checked against the
installed version when this module is imported (`scheduler.py` also extends one private method of vLLM's scheduler,
and checks it when imported). One rule of vLLM's is copied instead, in plain Python:
`layout.vllm_group_size` (its grouping of KV-cache layers), which the driver needs before vLLM runs.
"""

from __future__ import annotations

from typing import Any

import torch
import vllm
from vllm import _custom_ops
from vllm.config import CompilationConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.attention import get_attention_context

SUPPORTED = ("0.32.",)
if not vllm.__version__.startswith(SUPPORTED):  # pragma: no cover - depends on the installed vLLM
    raise ImportError(f"kvpress-rl's engine is written against vLLM {' or '.join(SUPPORTED)}x; "
                      f"vLLM {vllm.__version__} is installed")

ops = _custom_ops  # vLLM's compiled kernels (the CPU attention's: `cpu_full.py`)


def layer_context(layer_name: str) -> tuple[Any, Any, Any]:
    """`(attention metadata, attention layer, slot mapping)` of a registered attention layer in the current step
    (metadata None in vLLM's profiling and warm-up runs)."""
    metadata, layer, _, slot_mapping = get_attention_context(layer_name)
    return metadata, layer, slot_mapping


def metadata_for_heads(metadata: Any, heads: int) -> Any:
    """The metadata of one attention call over `heads` KV heads of a group built for one: vLLM's CPU kernel sizes its
    schedule by head count (`cpu_full.FullHeadsCPUBuilder`); the other platforms' metadata does not depend on it."""
    for_heads = getattr(metadata, "for_heads", None)
    return metadata if for_heads is None else for_heads(heads)


def remove_blocks(manager: Any, request_id: str, start: int, stop: int) -> None:
    """Give a request's blocks `start..stop-1` of one KV-cache group back to vLLM's pool (null block in their
    place)."""
    manager._remove_blocks_in_range(request_id, start, stop)


def forward_module(name: str) -> Any:
    """A module registered in vLLM's static forward context under `name` (how vLLM's own custom ops find their
    layer)."""
    return get_forward_context().no_compile_layers[name]


def splitting_ops(*ours: str) -> list[str]:
    """vLLM's own attention ops (where its piecewise compilation and CUDA graphs cut the model) and `ours`."""
    return [*CompilationConfig._attention_ops, *ours]


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The instruction set vLLM's CPU attention kernel uses for these settings (only on vLLM's CPU build)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, "auto")
