"""kvpress-rl head plans inside vLLM: full heads keep their whole history in vLLM's paged cache, compressed heads
keep 16 sink + 64 recent tokens and the blocks in between go back to vLLM's block pool.

- `layout.py`: the plan as vLLM sees it (pure Python: what a compressed head keeps, which blocks it frees, capacity).
- `cache.py`: the KV-cache spec and manager of compressed heads, registered with vLLM's `KVCacheSpecRegistry`.
- `backend.py`: the attention backend of compressed heads (pure torch, exact over the kept tokens).
- `models.py`: Llama, Mistral, Qwen2 and Qwen3 with one attention sub-layer per KV head.
- `plugin.py`: `register()`, the `vllm.general_plugins` entry point (names only; nothing is patched).
- `engine.py`: the engine settings a plan needs, the embedded model's weight folder, and `VllmGenerator`.

Only `plugin.py`, `engine.py` and `layout.py` are imported before vLLM runs; everything else is imported by vLLM
in its own processes through the names `register()` gives it.
"""
