"""`--heads`: one file for the one learned head strategy, or NAME=FILE pairs; a strategy that trains needs its file."""

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.cli.options import check_training_strategies, parse_heads
from kvpress_rl.plugins import discover_strategies


def chosen(*names):
    found = discover_strategies()
    return [(name, found[name]) for name in names]


def test_heads_option_forms():
    assert parse_heads("h.safetensors", chosen("rlkv", "random", "snapkv")) == {"rlkv": "h.safetensors"}
    assert parse_heads("rlkv=a,duo=b", chosen("rlkv", "duo")) == {"rlkv": "a", "duo": "b"}
    with pytest.raises(KvrlError, match="exactly one head strategy"):
        parse_heads("h.safetensors", chosen("rlkv", "duo"))
    with pytest.raises(KvrlError, match="does not list"):
        parse_heads("duo=b", chosen("rlkv"))


def test_a_training_strategy_needs_its_scores_from_select():
    check_training_strategies(chosen("retrieval", "random", "snapkv"), {})  # these score without training
    check_training_strategies(chosen("rlkv"), {"rlkv": "heads.safetensors"})
    for name in ("rlkv", "duo"):
        with pytest.raises(KvrlError, match=f"kvrl select --strategy {name} --output heads-{name}.safetensors"):
            check_training_strategies(chosen("random", name), {})
