"""`rlkv`: RL-guided head gates (Du et al., "Which Heads Matter for Reasoning? RL-Guided KV Cache
Compression", arXiv 2510.08525). See `learner.py`."""

from kvpress_rl.strategies.rlkv.learner import RLKV, RLKVOptions

__all__ = ["RLKV", "RLKVOptions"]
