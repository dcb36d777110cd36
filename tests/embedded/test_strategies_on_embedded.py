"""Every strategy end to end on the embedded model (small options: this checks the path, not quality)."""

import pytest

from kvpress_rl import SelectionContext, load_model
from kvpress_rl.embedded.evaluate import evaluate
from kvpress_rl.embedded.task import problems
from kvpress_rl.plugins import discover_strategies
from kvpress_rl.strategies.duo import DuoOptions
from kvpress_rl.strategies.retrieval import RetrievalOptions
from kvpress_rl.strategies.rlkv import RLKVOptions

SMALL = {
    "rlkv": RLKVOptions(steps=1, prompts_per_step=1, group_size=2, pool_size=4, max_new_tokens=60),
    "duo": DuoOptions(steps=2, context_length=100, batch_size=1),
    "retrieval": RetrievalOptions(needles=1, lengths=(100,), depths=(0.5,)),
}


@pytest.fixture(scope="module")
def embedded():
    return load_model()


@pytest.mark.parametrize("name", ["rlkv", "duo", "retrieval", "random", "streaming", "snapkv", "h2o", "rkv"])
def test_strategy_end_to_end(embedded, name):
    model, tokenizer = embedded
    entry = discover_strategies()[name]
    selector = entry.cls(SMALL.get(name))
    scores = selector.select(model, tokenizer, SelectionContext(seed=0))
    assert scores.shape == (30, 3)
    result = evaluate(model, tokenizer, problems("test", 4), plan=selector.plan(scores, 0.5), batch_size=4)
    assert result.total == 4
