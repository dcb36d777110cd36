"""Built-in strategies, registered through the `kvpress_rl` entry-point group like any plugin."""

from __future__ import annotations

from kvpress_rl.plugins import hookimpl


@hookimpl
def kvrl_strategies():
    from kvpress_rl.strategies.duo import DuoGates
    from kvpress_rl.strategies.file import FileScores
    from kvpress_rl.strategies.h2o import H2OTokens
    from kvpress_rl.strategies.random import RandomHeads
    from kvpress_rl.strategies.retrieval import RetrievalHeads
    from kvpress_rl.strategies.rkv import RKVTokens
    from kvpress_rl.strategies.rlkv import RLKV
    from kvpress_rl.strategies.snapkv import SnapKVTokens
    from kvpress_rl.strategies.streaming import StreamingLLM

    return [RLKV, RandomHeads, FileScores, RetrievalHeads, DuoGates, StreamingLLM, SnapKVTokens, H2OTokens, RKVTokens]
