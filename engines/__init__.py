"""Serving engines that run kvpress-rl head plans with the compressed heads' memory really freed.

Floor 1, beside `strategies/` and `evaluators/`: it imports the core only, and the core never imports it
(nor vLLM). `kvpress_rl.engines.vllm` is a vLLM plugin (found through vLLM's `vllm.general_plugins` entry point).
"""
