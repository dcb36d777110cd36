"""`register()`: the `vllm.general_plugins` entry point of kvpress-rl (pyproject.toml).

vLLM calls it once in each of its processes. It only gives vLLM names: the four model classes (`models.py`, imported
lazily by vLLM), the attention backends (`BACKENDS`), the compressed heads' KV-cache spec with the manager that frees
its blocks, and the torch op of a head plan's layer attention. It patches nothing, and a model that does not ask for a
`Kvrl...` architecture runs exactly as without the plugin.
"""

from __future__ import annotations

from kvpress_rl.engines.vllm.layout import ARCHITECTURES

MODELS_MODULE = "kvpress_rl.engines.vllm.models"
SINK_WINDOW_BACKEND = "KVRL_SINK_WINDOW"  # compressed heads (`backend.py`)
CPU_FULL_BACKEND = "KVRL_CPU_FULL"  # full heads on vLLM's CPU build (`cpu_full.py`, imported by vLLM there only)
BACKENDS = {
    SINK_WINDOW_BACKEND: "kvpress_rl.engines.vllm.backend.SinkWindowBackend",
    CPU_FULL_BACKEND: "kvpress_rl.engines.vllm.cpu_full.FullHeadsCPUBackend",
}


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, register_all_kvcache_specs
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from kvpress_rl.engines.vllm.cache import SinkWindowManager, SinkWindowSpec, TaggedFullSpec
    from kvpress_rl.engines.vllm.heads import register_op

    known = set(ModelRegistry.get_supported_archs())
    for ours in ARCHITECTURES.values():
        if ours not in known:
            ModelRegistry.register_model(ours, f"{MODELS_MODULE}:{ours}")
    for name, backend in BACKENDS.items():
        if name not in AttentionBackendEnum.__members__:
            register_backend(name, backend)
    # vLLM registers its own specs only into an empty registry: register them first, or they would be skipped.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)
    KVCacheSpecRegistry.register(TaggedFullSpec, FullAttentionManager, uniform_type_base_spec=FullAttentionSpec)
    register_op()  # torch.ops.vllm.kvrl_plan_attention: a head plan's layer attention
