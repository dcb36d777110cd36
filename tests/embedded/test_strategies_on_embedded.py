"""Every strategy end to end on the embedded model (small options: this checks the path, not quality)."""

import pytest
import torch

from kvpress_rl import ModelShape, SelectionContext, build_plan, compressed, load_model
from kvpress_rl.embedded.data import left_pad, prompt_ids
from kvpress_rl.embedded.evaluate import evaluate
from kvpress_rl.embedded.task import problems
from kvpress_rl.plugins import discover_strategies
from kvpress_rl.strategies.duo import DuoOptions
from kvpress_rl.strategies.retrieval import RetrievalOptions
from kvpress_rl.strategies.rlkv import RLKVOptions

pytestmark = pytest.mark.slow

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
    assert scores.shape == (30, 3) and scores.strategy == name and scores.model_id == "embedded"
    plan = build_plan(selector, scores, 0.5)
    if entry.cls.kind == "head":  # the official rule compresses ceil(89 * 0.5) = 45 of the 90 KV heads, 80 tokens each
        assert plan.num_compressed == 45 and plan.policy.budget(270) == 80
    else:  # every head, at the budget that matches head sparsity 0.5 in KV memory
        assert plan.num_compressed == 90 and plan.policy.name == name and plan.policy.budget(270) == 135 + 80
    items = problems("test", 4)
    with compressed(model, plan) as session:  # the plan really runs: the cache holds what the plan says
        ids, mask = left_pad([prompt_ids(tokenizer, p) for p in items], tokenizer.pad_token_id)
        session.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
        held = session.last_cache.kv_nbytes()
    length = ids.shape[1] + 8 - 1  # the last generated token is never fed back
    shape = ModelShape.from_config(model.config)
    planned, full = (bytes_(length, 4, head_dim=shape.head_dim, dtype=torch.float32)
                     for bytes_ in (plan.kv_bytes, plan.full_kv_bytes))
    assert held < full and (held == planned or plan.policy.slack())  # R-KV may hold its buffer above the budget
    result = evaluate(model, tokenizer, items, plan=plan, batch_size=4)
    assert result.total == 4 and all(result.output_lengths)
