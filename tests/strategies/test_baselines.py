import pytest
import torch

from kvpress_rl import SelectionContext
from kvpress_rl.executor import compressed
from kvpress_rl.models import random_model, small_config
from kvpress_rl.plugins import discover_strategies
from kvpress_rl.strategies.duo import DuoGates, DuoOptions
from kvpress_rl.strategies.retrieval import RetrievalHeads, RetrievalOptions, copy_hits

TOKEN_STRATEGIES = ["streaming", "snapkv", "h2o", "rkv"]


@pytest.fixture(scope="module")
def model():
    return random_model(small_config("llama"), seed=0)


def test_every_baseline_is_listed_with_its_kind():
    found = discover_strategies()
    for name in TOKEN_STRATEGIES:
        assert found[name].cls.kind == "token"
    for name in ("random", "file", "retrieval", "duo"):
        assert found[name].cls.kind == "head"


@pytest.mark.parametrize("name", TOKEN_STRATEGIES)
def test_token_strategies_compress_every_head_at_the_matching_budget(model, name):
    selector = discover_strategies()[name].cls()
    scores = selector.select(model, None, SelectionContext())
    assert torch.all(scores.scores == 0)  # no head ranks above another
    plan = selector.plan(scores, 0.6)
    assert plan.num_compressed == 16
    assert plan.policy.budget(1000) == 480  # int(1000 * 0.4) + 80
    ids = torch.randint(0, 256, (2, 150))
    with compressed(model, plan) as session:
        session.generate(ids, max_new_tokens=30, do_sample=False)
        cache = session.last_cache
    # the last generated token is never fed back, so the cache saw 179 tokens
    expected = min(179, plan.policy.budget(179))
    slack = plan.policy.slack()
    assert all(expected <= layer.compressed_keys.shape[2] <= expected + slack for layer in cache.layers)


def test_fixed_budget_option(model):
    from kvpress_rl.strategies.h2o import H2OOptions, H2OTokens

    plan = H2OTokens(H2OOptions(fixed_budget=50)).plan(H2OTokens().select(model, None, SelectionContext()), 0.3)
    assert plan.policy.budget(10_000) == 50


def test_retrieval_score_ranks_a_planted_copying_head_first():
    # 2 layers x 4 query heads over a 12-token sequence; needle at positions 2..5; the copy starts at 8
    tokens = torch.tensor([50, 51, 10, 11, 12, 13, 52, 53, 10, 11, 12, 13])
    copy_positions, targets = torch.tensor([8, 9, 10]), torch.tensor([11, 12, 13])
    attentions = [torch.zeros(4, 12, 12) for _ in range(2)]
    for attention in attentions:
        attention[:, :, 0] = 0.1  # every other head looks at the first token
    for step, q in enumerate(copy_positions.tolist()):
        attentions[1][2, q, 3 + step] = 1.0  # layer 1, head 2 looks at the needle token being copied
        attentions[0][0, q, q] = 1.0  # layer 0, head 0 looks at itself (same token, outside the needle)
    hits = copy_hits(attentions, tokens, (2, 6), copy_positions, targets, torch.tensor([True, True, True]))
    assert hits[1, 2] == 3 and hits.sum() == 3
    # a step the model got wrong does not count
    assert copy_hits(attentions, tokens, (2, 6), copy_positions, targets, torch.tensor([True, False, True]))[1, 2] == 2


def test_retrieval_runs_end_to_end(model):
    options = RetrievalOptions(needles=1, lengths=(40,), depths=(0.5,), aggregate="max")
    scores = RetrievalHeads(options).select(model, None, SelectionContext(seed=1))
    assert scores.shape == (4, 4) and scores.extra["samples"] == 1
    assert model.config._attn_implementation == "sdpa"  # eager was only borrowed


def test_duo_lowers_gates_of_heads_whose_streaming_version_changes_nothing(model):
    # contexts shorter than sink + window: streaming attention equals full attention for every head,
    # so distillation gives no reason to keep a gate and the L1 penalty pulls them all down
    options = DuoOptions(steps=15, context_length=20, passkey_length=4, batch_size=1, sink=16, window=64)
    scores = DuoGates(options).select(model, None, SelectionContext())
    assert scores.scores.max() < 0.95
    assert all(p.requires_grad for p in model.parameters())  # the model is given back as it was


def test_duo_keeps_heads_that_matter_above_those_that_do_not(model):
    # the same training twice; only the window differs. With a 4-token window the streaming branch loses the
    # passkey, so distillation holds up the gates of the heads that carry it against the L1 pull; with a window
    # that covers the whole context nothing is lost and every gate falls alike
    def gates(sink, window):
        options = DuoOptions(steps=15, context_length=120, passkey_length=4, batch_size=1, sink=sink, window=window)
        return DuoGates(options).select(model, None, SelectionContext()).scores

    needed, not_needed = gates(2, 4), gates(16, 200)
    assert not_needed.max() - not_needed.min() < 0.02  # no head matters: no gate is preferred
    assert needed.max() > not_needed.max() + 0.05  # some heads matter: their gates stay up


@pytest.mark.parametrize("policy_name", ["snapkv", "h2o", "rkv"])
def test_hybrid_plan_head_selection_with_a_token_policy_on_compressed_heads(model, policy_name):
    from kvpress_rl.policies import BUDGET_BASE, make_policy
    from kvpress_rl.strategies.random import RandomHeads

    selector = RandomHeads()
    scores = selector.select(model, None, SelectionContext(seed=0))
    policy = make_policy(policy_name, fixed_budget=BUDGET_BASE, **({"buffer": 0} if policy_name == "rkv" else {}))
    plan = selector.plan(scores, 0.5, policy)
    assert plan.num_compressed == 8 and plan.policy.name == policy_name
    with compressed(model, plan) as session:
        session.generate(torch.randint(0, 256, (1, 150)), max_new_tokens=20, do_sample=False)
    for layer in session.last_cache.layers:
        if layer.has_compressed:
            assert layer.compressed_keys.shape[2] == BUDGET_BASE  # same memory as 16 + 64
        if layer.has_full:
            assert layer.keys.shape[2] == 169
