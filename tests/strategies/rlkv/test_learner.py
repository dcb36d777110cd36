import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.models import random_model, small_config
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions


def tiny_model_and_tokenizer():
    """A random Llama over a character vocabulary: its samples are random digit strings, so rewards vary."""
    chars = list("0123456789+=? ") + ["<pad>", "<eos>"]
    raw = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="?"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    model = random_model(small_config("llama", vocab_size=len(chars), num_hidden_layers=2), seed=0)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(20)))
    return path


def options(path, **extra):
    base = dict(data=str(path), steps=3, prompts_per_step=2, group_size=4, max_new_tokens=3, self_distillation=False,
                lr=0.05, checkpoint_every=1, micro_batch=4, sink=1, window=2)
    base.update(extra)
    return RLKVOptions(**base)


def test_rlkv_trains_gates_only_logs_and_records_provenance(tiny, data, tmp_path):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = RLKV(options(data)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(tmp_path / "run")))
    assert scores.shape == (2, 4) and scores.strategy == "rlkv"
    assert scores.options["steps"] == 3 and scores.seed == 0 and "reward_curve" in scores.extra
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"mean_reward", "mean_alpha", "beta_prime", "seconds"} <= set(log[0])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_rewards_move_the_gates(tiny, data, tmp_path):
    model, tokenizer = tiny
    scores = RLKV(options(data, steps=4)).select(model, tokenizer, SelectionContext(seed=1))
    assert not torch.all(scores.scores == 1.0)
    assert scores.scores.min() >= 0.0 and scores.scores.max() <= 1.0  # projected onto [0, 1] after every step


def test_constant_penalty_lowers_every_gate_when_rewards_carry_no_signal(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "impossible.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "answer": "123456789"}) + "\n")
    opts = options(path, steps=3, adaptive_penalty=False, beta=1.0)
    scores = RLKV(opts).select(model, tokenizer, SelectionContext(seed=0))
    assert torch.all(scores.scores < 1.0)  # every reward 0: no policy gradient, the L1 term alone acts


def test_resume_continues_from_the_checkpoint(tiny, data, tmp_path):
    model, tokenizer = tiny
    work = tmp_path / "run"
    full = RLKV(options(data, steps=4)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "a")))
    RLKV(options(data, steps=2)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "b")))
    # a run interrupted after 2 steps of 4: the checkpoint says step 2; resume runs steps 3 and 4
    state = torch.load(work / "b" / "checkpoint.pt", weights_only=False)
    state["options"]["steps"] = 4
    torch.save(state, work / "b" / "checkpoint.pt")
    resumed = RLKV(options(data, steps=4)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "b"), resume=True))
    steps = [json.loads(line)["step"] for line in (work / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert resumed.shape == full.shape


def test_bad_options_are_refused(tiny, data):
    model, tokenizer = tiny
    with pytest.raises(KvrlError, match="group or batch"):
        RLKV(options(data, advantage="token")).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="unknown training data"):
        RLKV(options("nonsense")).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="solves none"):
        RLKV(options(data, self_distillation=True, pool_size=4)).select(model, tokenizer, SelectionContext())


def test_unset_options_take_the_paper_values_or_the_embedded_ones(tiny):
    model, _ = tiny
    paper = RLKV(RLKVOptions())
    paper.resolve(model)
    assert (paper.options.steps, paper.options.lr, paper.options.beta, paper.options.window) == (185, 0.01, 1e-3, 256)
    assert (paper.options.prompts_per_step, paper.options.max_new_tokens) == (32, 7168)
    embedded = RLKV(RLKVOptions(lr=0.2))
    original = model.name_or_path
    model.name_or_path = "embedded"
    try:
        embedded.resolve(model)
    finally:
        model.name_or_path = original
    assert (embedded.options.steps, embedded.options.lr, embedded.options.beta, embedded.options.window) == (40, 0.2, 1e-2, 64)
    assert (embedded.options.prompts_per_step, embedded.options.max_new_tokens) == (6, 64)


def test_copies_of_a_prompt_share_one_prefill_and_generate_what_separate_rows_would(tiny):
    model, tokenizer = tiny
    from kvpress_rl.executor.gated import gated, new_gates

    learner = RLKV(RLKVOptions(max_new_tokens=6))
    prompts = [tokenizer("12+0=")["input_ids"], tokenizer("3+0=")["input_ids"]]  # unequal lengths: left padding
    gates = new_gates(model, 0.5)
    with gated(model, gates, sink=1, window=2):
        separate = learner.generate(model, tokenizer, [p for p in prompts for _ in range(3)], sample=False)
        shared = learner.generate(model, tokenizer, prompts, sample=False, copies=3)
    assert shared[2] == separate[2]
    assert torch.equal(shared[0], separate[0]) and torch.equal(shared[1], separate[1])


def test_rollouts_of_a_prompt_share_its_forward_in_the_backward_with_the_same_logprobs_and_gradients(tiny):
    model, tokenizer = tiny
    from kvpress_rl.executor.gated import gated, new_gates

    learner = RLKV(RLKVOptions(max_new_tokens=8))
    prompts = [tokenizer("12+0=")["input_ids"], tokenizer("3+0=")["input_ids"], tokenizer("456+78=")["input_ids"]]
    torch.manual_seed(0)
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.0, 1.0)
    with gated(model, gates, sink=1, window=2):
        sequences, mask, offset = learner.generate(model, tokenizer, prompts, sample=True, copies=4)
    completion = mask[:, offset:]
    assert completion.sum(1).min() < completion.shape[1]  # some rows stop early: right padding is exercised
    results = []
    model.requires_grad_(False)
    for shared in (False, True):
        gates.grad = None
        with gated(model, gates, sink=1, window=2):
            if shared:
                logp = learner.group_logprobs(model, sequences, mask, offset, copies=4)
            else:  # every row through the model on its own: the plain teacher-forced forward
                position = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = model(input_ids=sequences, attention_mask=mask, position_ids=position).logits[:, offset - 1:-1]
                logp = torch.log_softmax(logits.float(), -1).gather(-1, sequences[:, offset:, None]).squeeze(-1)
            (logp * completion).sum().backward()
        results.append((logp.detach() * completion, gates.grad.clone()))
    model.requires_grad_(True)
    assert results[0][1].abs().max() > 0
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
