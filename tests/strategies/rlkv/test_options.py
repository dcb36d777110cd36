"""RLKV's options refused in one line: out of range when built, or unusable once resolved."""


import pytest

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.strategies.rlkv import RLKV
from tests.strategies.rlkv.helpers import (
    options,
)


def test_bad_options_are_refused(tiny, data):
    model, tokenizer = tiny
    with pytest.raises(KvrlError, match="group or batch"):
        RLKV(options(data, advantage="token")).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="unknown training data"):
        RLKV(options("nonsense")).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="solves none"):
        RLKV(options(data, self_distillation=True, pool_size=4)).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="reward-level"):
        RLKV(options(data, reward_level="token")).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="train-mask"):
        RLKV(options(data, train_mask="dense")).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="fewer than one step"):
        RLKV(options(data, train_set_size=1)).select(model, tokenizer, SelectionContext())


@pytest.mark.parametrize("field_name, value, accepted", [("checkpoint_every", 0, ">= 1"), ("temperature", 0.0, "> 0"),
                                                         ("temperature", -1.0, "> 0"), ("lr", 0.0, "> 0"),
                                                         ("beta", -1e-3, ">= 0"),
                                                         ("group_size", 1, ">= 2"), ("window", 0, ">= 1")])
def test_options_out_of_range_are_refused_when_built(data, field_name, value, accepted):
    flag = "--" + field_name.replace("_", "-")
    with pytest.raises(KvrlError, match=f"{flag} must be {accepted}, got"):
        options(data, **{field_name: value})
