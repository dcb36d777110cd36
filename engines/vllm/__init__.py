"""kvpress-rl head plans inside vLLM: full heads keep their whole history in vLLM's paged cache, compressed heads
keep 16 sink + 64 recent tokens and the blocks in between go back to vLLM's block pool.

- `layout.py`: the plan as vLLM sees it (pure Python: what a compressed head keeps, which blocks it frees, capacity).
- `cache.py`: the KV-cache spec and manager of compressed heads, registered with vLLM's `KVCacheSpecRegistry`.
- `backend.py`: what compressed heads' KV-cache groups build per step (the slots each request keeps), on the device.
- `kept_attention.py`: compressed heads' decoding attention over their kept keys (pure torch, no vLLM).
- `paged_rows.py`: vLLM's paged cache seen as rows of `[key | value]`: the one write and read of the caches that
  kvpress-rl's own backends fill (pure torch).
- `heads.py`: one layer's attention, two calls whatever the plan (full heads through the platform's kernel over a
  multi-head view of their caches, compressed heads batched), and the torch op `vllm::kvrl_plan_attention`.
- `cpu_full.py`: vLLM's CPU kernel with schedules for calls over several heads.
- `models.py`: Llama, Mistral, Qwen2 and Qwen3 under a plan (heads reordered, full first; one cache per KV head) or
  as the gated model.
- `gated.py`: the gated model of RLKV's rollouts (every head's whole cache, `alpha * full + (1 - alpha) * streaming`).
- `vllm_compat.py`: the vLLM internals the engine reads, checked against the installed version (vLLM's grouping
  rule is copied in `layout.py`, which runs before vLLM).
- `plugin.py`: `register()`, the `vllm.general_plugins` entry point (names only; nothing is patched).
- `engine.py`: the engine settings a plan needs, the embedded model's weight folder, and `VllmGenerator`.

Only `plugin.py`, `engine.py` and `layout.py` are imported before vLLM runs (`kept_attention.py` and `paged_rows.py`
load without vLLM too); everything else is imported by vLLM in its own processes through the names `register()`
gives it.
"""
