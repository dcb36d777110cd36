"""kvpress-rl head plans inside vLLM: full heads keep their whole history in vLLM's paged cache, compressed heads
keep 16 sink + 64 recent tokens and the blocks in between go back to vLLM's block pool.

- `layout.py`: the plan as vLLM sees it (pure Python: what a compressed head keeps, which blocks it frees, capacity).
- `cache.py`: the KV-cache spec and manager of compressed heads, registered with vLLM's `KVCacheSpecRegistry`.
- `backend.py`: what compressed heads' KV-cache groups build per step (the slots each request keeps), on the device.
- `kept_attention.py`: compressed heads' decoding attention over their kept keys (pure torch, no vLLM).
- `heads.py`: one layer's attention, two calls whatever the plan (full heads through the platform's kernel over a
  multi-head view of their caches, compressed heads batched), and the torch op `vllm::kvrl_plan_attention`.
- `cpu_full.py`: vLLM's CPU kernel with schedules for calls over several heads.
- `models.py`: Llama, Mistral, Qwen2 and Qwen3 under a plan: heads reordered (full first), one cache per KV head.
- `vllm_compat.py`: the vLLM internals the engine reads, checked against the installed version.
- `plugin.py`: `register()`, the `vllm.general_plugins` entry point (names only; nothing is patched).
- `engine.py`: the engine settings a plan needs, the embedded model's weight folder, and `VllmGenerator`.

Only `plugin.py`, `engine.py`, `layout.py` and `kept_attention.py` are imported before vLLM runs; everything else is imported by vLLM
in its own processes through the names `register()` gives it.
"""
