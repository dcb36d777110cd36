"""The shipped embedded model: loads offline, solves its task, and the default commands use it."""

import pytest
import torch
from transformers import DynamicCache

from kvpress_rl import load_model, plan_from_scores
from kvpress_rl.embedded.data import prompt_ids
from kvpress_rl.embedded.evaluate import evaluate
from kvpress_rl.embedded.model import ADAPTER_DIR
from kvpress_rl.embedded.task import COUNTED_TASK, Difficulty, make_problem, problems, task_problems
from kvpress_rl.executor import compressed
from tests.executor.reference import masked_reference, teacher_forced_logits
from tests.helpers import run_kvrl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    return load_model()  # no argument: the embedded default


def test_the_shipped_adapter_is_small():
    size = sum(p.stat().st_size for p in ADAPTER_DIR.iterdir())
    assert size <= 20 * 2**20


def test_loads_offline_as_a_supported_gqa_model(embedded):
    model, tokenizer = embedded
    assert model.name_or_path == "embedded" and model.config.model_type == "llama"
    assert model.config.num_hidden_layers * model.config.num_key_value_heads >= 16
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    assert tokenizer.padding_side == "left"


def test_solves_at_least_90_percent_of_a_test_slice(embedded):
    model, tokenizer = embedded
    result = evaluate(model, tokenizer, problems("test", 50), batch_size=25)
    assert result.accuracy >= 0.9, result.outputs[:3]


def test_solves_the_counted_task_and_both_tasks_fail_without_far_heads(embedded):
    model, tokenizer = embedded
    items = task_problems(COUNTED_TASK, "test", 24)
    assert evaluate(model, tokenizer, items, batch_size=24, max_new_tokens=128).accuracy >= 0.9
    streaming = evaluate(model, tokenizer, items, plan=plan_from_scores(torch.zeros(30, 3), 1.0), batch_size=24,
                         max_new_tokens=128)
    assert streaming.accuracy <= 0.3


def test_a_long_walk_through_the_executor_is_the_masked_reference(embedded):
    """The counted task's check: walks longer than those the heads were chosen on fail under compression; the executor
    must not be the cause. 14 hops and 48 links (a 300-token prompt, a 100-token chain), teacher-forced."""
    model, tokenizer = embedded
    problem = make_problem(20_900_000, Difficulty(hops=14, links=48))
    ids = torch.tensor([prompt_ids(tokenizer, problem)])
    mask = torch.ones_like(ids)
    chain = torch.tensor([tokenizer(problem.solution(), add_special_tokens=False)["input_ids"]])
    plan = plan_from_scores(torch.rand(30, 3, generator=torch.Generator().manual_seed(19)), 0.6)
    with torch.inference_mode():
        with masked_reference(model, plan.full, 16, 64):
            expected = teacher_forced_logits(model, ids, mask, chain, DynamicCache())
        with compressed(model, plan) as session:
            actual = teacher_forced_logits(model, ids, mask, chain, session.new_cache())
    assert chain.shape[1] > 80 and ids.shape[1] > 280  # the chain outgrows the compressed heads' 80 tokens
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_compressing_every_head_breaks_the_look_ups(embedded):
    model, tokenizer = embedded
    items = problems("test", 25)
    streaming = evaluate(model, tokenizer, items, plan=plan_from_scores(torch.zeros(30, 3), 1.0), batch_size=25)
    assert streaming.accuracy <= 0.3  # the table lies outside 16 + 64 tokens: the task needs the far look-ups


def test_select_and_eval_run_without_model(tmp_path):
    select = run_kvrl("select", "--strategy", "random", cwd=tmp_path)
    assert select.returncode == 0, select.stderr
    assert "30 layers x 3 KV heads" in select.stdout
    result = run_kvrl("eval", "--strategy", "random", "--sparsity", "0.5", "--seeds", "0", "--limit", "4", "--output",
                      "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    grid = (tmp_path / "out" / "grid.csv").read_text().splitlines()
    assert len(grid) == 3 and grid[1].startswith("embedded,full,0.0,0,")
