import json
import math
from types import SimpleNamespace

import pytest
import torch

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.distributed import rng_state
from kvpress_rl.executor.gated import gated, new_gates
from kvpress_rl.models import frozen, random_model, small_config
from kvpress_rl.profiles import EMBEDDED_RLKV
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions
from kvpress_rl.strategies.rlkv import learner as learner_module
from kvpress_rl.strategies.rlkv.backward import completion_logprobs
from kvpress_rl.strategies.rlkv.checkpoints import TrainingRun, load_checkpoint, resume, save_checkpoint
from kvpress_rl.strategies.rlkv.grpo import batch_advantages
from kvpress_rl.strategies.rlkv.problems import Problem
from kvpress_rl.strategies.rlkv.rollouts import generate, rollouts


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+0=", "answer": str(i % 3)}) + "\n" for i in range(20)))
    return path


def options(path, **extra):
    base = dict(data=str(path), steps=3, prompts_per_step=2, group_size=4, max_new_tokens=3, self_distillation=False,
                lr=0.05, checkpoint_every=1, micro_batch_tokens=40, sink=1, window=2, train_mask="token", gradient_checkpointing=False)
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
    assert {"mean_reward", "mean_alpha", "beta_prime", "seconds", "reward_level", "epoch", "micro_batches"} <= set(log[0])
    assert log[0]["reward_level"] == "batch" and log[0]["micro_batches"] > 1  # 40 tokens: several micro-batches
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
    opts = options(path, steps=3, prompts_per_step=1, adaptive_penalty=False, beta=1.0)
    scores = RLKV(opts).select(model, tokenizer, SelectionContext(seed=0))
    assert torch.all(scores.scores < 1.0)  # every reward 0: no policy gradient, the L1 term alone acts


def test_resume_continues_from_the_checkpoint(tiny, data, tmp_path):
    model, tokenizer = tiny
    work = tmp_path / "run"
    # a constant L1 weight: every step has a gradient, so AdamW's moments at the checkpoint shape the next steps
    given = dict(adaptive_penalty=False, beta=0.05)
    full = RLKV(options(data, steps=4, **given)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "a")))
    RLKV(options(data, steps=2, **given)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "b")))
    # a run interrupted after 2 steps of 4: the checkpoint says step 2; resume runs steps 3 and 4
    state = torch.load(work / "b" / "checkpoint.pt", weights_only=False)
    assert state["optimizer"]["state"]  # the optimizer has stepped before the checkpoint
    state["options"]["steps"] = 4
    torch.save(state, work / "b" / "checkpoint.pt")
    resumed = RLKV(options(data, steps=4, **given)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "b"), resume=True))
    steps = [json.loads(line)["step"] for line in (work / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not torch.all(full.scores == 1.0)  # the gates moved: the comparison below can fail
    assert torch.allclose(resumed.scores, full.scores, rtol=0.0, atol=1e-7)  # the RNG and AdamW's moments restored


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


def fake_model(model_type: str, profile: str | None = None):
    """A model as `resolve` sees it: a config with a `model_type` and, where a loader attached one, a profile."""
    config = SimpleNamespace(model_type=model_type)
    if profile is not None:
        config.kvrl_profile = profile
    return SimpleNamespace(name_or_path="some/model", config=config)


def resolved(model, **given):
    learner = RLKV(RLKVOptions(**given))
    learner.resolve(model)
    return learner.options


def test_unset_options_take_the_official_values_per_model_family_or_the_embedded_ones():
    llama = resolved(fake_model("llama"))
    assert (llama.steps, llama.prompts_per_step, llama.max_new_tokens, llama.lr) == (186, 32, 7168, 0.01)
    assert (llama.beta, llama.tau, llama.temperature, llama.sink, llama.window) == (1e-3, 0.5, 1.0, 128, 256)
    assert (llama.train_mask, llama.reward_level, llama.pool_size, llama.train_set_size) == ("block", "batch", 40315, 3000)
    assert (llama.gradient_checkpointing, llama.rollout_batch, llama.micro_batch_tokens) == (True, 8, 7680)
    qwen2 = resolved(fake_model("qwen2"))
    assert (qwen2.beta, qwen2.tau, qwen2.temperature) == (1e-3, 0.55, 1.0)
    qwen3 = resolved(fake_model("qwen3"))
    assert (qwen3.beta, qwen3.tau, qwen3.temperature) == (2.5e-3, 0.5, 0.6)
    assert resolved(fake_model("qwen3"), tau=0.7, temperature=1.0).tau == 0.7  # given values win
    embedded = resolved(fake_model("llama", profile="embedded"), lr=0.2)
    assert (embedded.steps, embedded.lr, embedded.beta, embedded.tau, embedded.sink, embedded.window) == (40, 0.2, 1e-2, 0.5, 16, 64)
    assert (embedded.prompts_per_step, embedded.max_new_tokens, embedded.train_mask, embedded.reward_level) == (6, 64, "token", "batch")
    assert (embedded.pool_size, embedded.train_set_size, embedded.rollout_batch, embedded.gradient_checkpointing) == (64, 64, 6, False)
    assert all(getattr(embedded, k) == v for k, v in EMBEDDED_RLKV.items() if v is not None and k != "lr")  # the profile's values
    assert resolved(fake_model("llama", profile="embedded"), pool_size=10).train_set_size == 10  # every solved problem of its pool
    named = SimpleNamespace(name_or_path="embedded", config=SimpleNamespace(model_type="llama"))
    assert resolved(named).steps == 186  # the name does not matter: only the attached profile
    counted = resolved(fake_model("llama", profile="embedded"), data="embedded-count")
    assert (counted.max_new_tokens, counted.steps) == (80, 40)  # room for its longer chains; the rest as the profile
    assert resolved(fake_model("llama", profile="embedded"), data="embedded-count", max_new_tokens=50).max_new_tokens == 50
    assert resolved(fake_model("llama"), data="embedded-count").max_new_tokens == 7168  # only the embedded profile


def test_the_embedded_profile_s_values_are_printed_with_it_as_their_source():
    learner = RLKV(RLKVOptions(lr=0.2))
    learner.resolve(fake_model("llama", profile="embedded"))
    text = learner.resolved_options_text()
    assert "model family: embedded" in text and "steps = 40  [profile embedded]" in text and "lr = 0.2\n" in text
    assert "train_set_size = 64  [profile embedded: the whole pool]" in text
    assert "rollout_batch = 6  [profile embedded: the whole step]" in text


def test_resolved_options_are_printable_with_their_source():
    learner = RLKV(RLKVOptions(beta=0.5))
    learner.resolve(fake_model("qwen2"))
    text = learner.resolved_options_text()
    assert "model family: qwen2" in text and "tau = 0.55  [official qwen2]" in text
    assert "beta = 0.5\n" in text + "\n" and "steps = 186  [official]" in text


# --- the official batch advantage by default on real models; r_bar of the whole batch ------------------------
def test_real_models_default_to_the_official_batch_advantage_and_the_embedded_model_keeps_the_group_one():
    for model_type in ("qwen2", "llama", "qwen3"):
        assert resolved(fake_model(model_type)).advantage == "batch"
    assert resolved(fake_model("qwen2"), advantage="group").advantage == "group"  # the paper's form: an option
    assert resolved(fake_model("llama", profile="embedded")).advantage == "group"
    printed = {}
    for name, model in (("qwen2", fake_model("qwen2")), ("embedded", fake_model("llama", profile="embedded"))):
        learner = RLKV(RLKVOptions())
        learner.resolve(model)
        printed[name] = next(line for line in learner.resolved_options_text().splitlines() if line.startswith("  advantage = "))
    assert printed["qwen2"] == "  advantage = 'batch'  [official]  (token-weighted batch z-score of (r - 0.5) * 10, the official training's adv_norm)"
    assert printed["embedded"] == ("  advantage = 'group'  [profile embedded]  "
                                   "(z-score within each prompt's group, the paper's text)")


def step_advantages_seen(model, tokenizer, learner) -> tuple[torch.Tensor, torch.Tensor]:
    """`(advantages, completion tokens)` that one `_step` hands the backward, for two problems of 4 rollouts: the
    first solved by every rollout, the second by every other one."""
    every_other = iter([True, False] * 2)
    problems = [Problem("1+0=", "1", lambda text, answer: True, "agree"), Problem("2+0=", "2", lambda text, answer: next(every_other), "split")]
    seen = {}

    def backward(model, gates, sequences, mask, offset, advantages, rewards, sink, window, **kwargs):
        seen.update(advantages=advantages.clone(), tokens=mask[:, offset:].sum(1))
        return {"tokens": 1, "micro_batches": 1, "beta_prime": 0.0, "mean_reward": rewards.mean().item(), "reward_level": "batch"}

    learner.policy_backward = backward
    learner.resolve(model)
    gates = new_gates(model, 1.0)
    learner._step(model, tokenizer, gates, torch.optim.AdamW([gates], lr=0.1), problems)
    return seen["advantages"], seen["tokens"]


def test_on_a_real_model_a_group_whose_rollouts_agree_still_gets_an_advantage(tiny, data):
    _, tokenizer = tiny
    qwen2 = random_model(small_config("qwen2", vocab_size=len(tokenizer), num_hidden_layers=2), seed=0)
    advantages, tokens = step_advantages_seen(qwen2, tokenizer, RLKV(options(data)))
    assert (advantages[:4] > 0).all()  # rewards 1, 1, 1, 1 under a batch mean below +5
    torch.testing.assert_close(advantages, batch_advantages(torch.tensor([1.0] * 4 + [1.0, 0.0] * 2), tokens))
    qwen2.config.kvrl_profile = "embedded"  # the embedded profile keeps the paper's per-group z-score
    advantages, _ = step_advantages_seen(qwen2, tokenizer, RLKV(options(data)))
    assert advantages.tolist() == pytest.approx([0.0] * 4 + [1.0, -1.0] * 2, abs=1e-4)


def test_the_default_l1_weight_takes_r_bar_over_the_whole_batch_not_per_micro_batch(tiny):
    model, tokenizer = tiny  # a real model's defaults (llama): reward_level left unset
    learner = RLKV(RLKVOptions(max_new_tokens=8, sink=1, window=2, train_mask="token", gradient_checkpointing=False,
                               micro_batch_tokens=1, beta=1.0, tau=0.5))
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0])  # micro-batches (one group each) at r_bar 1, 0.75, 0.25
    stats = learner.policy_backward(model, gates, sequences, mask, offset, torch.zeros(12), rewards, 1, 2)
    assert learner.options.reward_level == "batch" and learner.sources["reward_level"] == "official"
    assert stats["micro_batches"] == 3 and stats["mean_reward"] == pytest.approx(8 / 12)
    assert stats["beta_prime"] == pytest.approx(math.exp(8 / 12) - 1)  # per micro-batch it would be ~ (e - 1) and (e^0.75 - 1)
    torch.testing.assert_close(gates.grad, torch.full_like(gates, stats["beta_prime"] / gates.numel()))


def test_training_on_an_evaluation_split_is_refused_unless_allowed(tiny):
    model, tokenizer = tiny
    with pytest.raises(KvrlError, match="--allow-eval-data") as error:
        RLKV(options("math500")).select(model, tokenizer, SelectionContext())
    assert "math500_r1" in str(error.value) and "--data FILE.jsonl" in str(error.value)
    with pytest.raises(KvrlError, match="needs --data-dir"):  # allowed: gets as far as loading the data
        RLKV(options("math500", allow_eval_data=True)).select(model, tokenizer, SelectionContext())
    with pytest.raises(KvrlError, match="needs --data-dir"):  # gsm8k is its train split: fine
        RLKV(options("gsm8k")).select(model, tokenizer, SelectionContext())


def test_steps_walk_a_fixed_set_of_distinct_problems_epoch_by_epoch(tiny, data):
    model, tokenizer = tiny
    learner = RLKV(options(data, steps=7, prompts_per_step=2, train_set_size=5))
    seen = []

    def fake_step(model, tokenizer, gates, optimizer, problems, engine=None):
        seen.append([p.source for p in problems])
        return {"mean_reward": 0.0, "mean_alpha": 1.0}

    learner._step = fake_step
    learner.select(model, tokenizer, SelectionContext(seed=4))
    assert all(len(batch) == 2 for batch in seen) and len(seen) == 7
    first_five = {f"train.jsonl:{i}" for i in range(1, 6)}
    for epoch in (seen[0:2], seen[2:4], seen[4:6]):  # 5 problems, batches of 2: 2 steps an epoch, the 5th dropped
        drawn = [s for batch in epoch for s in batch]
        assert len(set(drawn)) == 4 and set(drawn) <= first_five  # distinct within an epoch
    assert seen[0:2] != seen[2:4] or seen[2:4] != seen[4:6]  # reshuffled each epoch


def test_copies_of_a_prompt_share_one_prefill_and_generate_what_separate_rows_would(tiny):
    model, tokenizer = tiny
    opts = RLKVOptions(max_new_tokens=6)
    prompts = [tokenizer("12+0=")["input_ids"], tokenizer("3+0=")["input_ids"]]  # unequal lengths: left padding
    gates = new_gates(model, 0.5)
    with gated(model, gates, sink=1, window=2):
        separate = generate(model, tokenizer, [p for p in prompts for _ in range(3)], opts, sample=False)
        shared = generate(model, tokenizer, prompts, opts, sample=False, copies=3)
    assert shared[2] == separate[2]
    assert torch.equal(shared[0], separate[0]) and torch.equal(shared[1], separate[1])


def random_gates_and_rollouts(model, tokenizer, opts, seed: int):
    """Gates drawn uniformly in [0, 1] and 4 sampled rollouts of each of 3 prompts under them (sink 1, window 2)."""
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=", "456+78=")]
    torch.manual_seed(seed)
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.0, 1.0)
    with gated(model, gates, sink=1, window=2):
        return gates, generate(model, tokenizer, prompts, opts, sample=True, copies=4)


def test_rollouts_of_a_prompt_share_its_forward_in_the_backward_with_the_same_logprobs_and_gradients(tiny):
    model, tokenizer = tiny
    gates, (sequences, mask, offset) = random_gates_and_rollouts(model, tokenizer, RLKVOptions(max_new_tokens=8), seed=0)
    completion = mask[:, offset:]
    assert completion.sum(1).min() < completion.shape[1]  # some rows stop early: right padding is exercised
    results = []
    for shared in (False, True):
        gates.grad = None
        with frozen(model), gated(model, gates, sink=1, window=2):
            if shared:
                logp = completion_logprobs(model, sequences, mask, offset, 4, shared=True)
            else:  # every row through the model on its own: the plain teacher-forced forward
                position = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = model(input_ids=sequences, attention_mask=mask, position_ids=position).logits[:, offset - 1:-1]
                logp = torch.log_softmax(logits.float(), -1).gather(-1, sequences[:, offset:, None]).squeeze(-1)
            (logp * completion).sum().backward()
        results.append((logp.detach() * completion, gates.grad.clone()))
    assert results[0][1].abs().max() > 0
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def sampled_step(model, tokenizer, learner, gates):
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=", "456+78=")]
    torch.manual_seed(0)
    with gated(model, gates, sink=1, window=2):
        return rollouts(model, tokenizer, prompts, learner.options, sample=True, copies=4)


def backward_options(**extra):
    base = dict(max_new_tokens=8, sink=1, window=2, train_mask="token", gradient_checkpointing=False, micro_batch_tokens=10_000)
    base.update(extra)
    return RLKVOptions(**base)


def test_rollouts_in_batches_of_prompts_join_into_the_batch_one_call_gives(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(t)["input_ids"] for t in ("12+0=", "3+0=", "456+78=")]
    gates = new_gates(model, 0.5)
    results = []
    for batch in (None, 1):
        with gated(model, gates, sink=1, window=2):
            results.append(rollouts(model, tokenizer, prompts, backward_options(rollout_batch=batch), sample=False, copies=2))
    (seq_a, mask_a, off_a), (seq_b, mask_b, off_b) = results
    assert off_a == off_b and torch.equal(mask_a, mask_b)
    assert torch.equal(seq_a[mask_a.bool()], seq_b[mask_b.bool()])


@pytest.mark.parametrize("level, expected", [
    ("batch", 1.0 * (math.exp(0.75) - 1)),                                           # r_bar = 9 / 12
    ("group", (0.0 + (math.exp(0.75) - 1) + (math.exp(1.0) - 1)) / 3),             # groups 0.5 (off), 0.75, 1.0
])
def test_the_l1_weight_takes_r_bar_at_the_chosen_level(tiny, level, expected):
    model, tokenizer = tiny
    learner = RLKV(backward_options(reward_level=level, beta=1.0, tau=0.5))
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    stats = learner.policy_backward(model, gates, sequences, mask, offset, torch.zeros(12), rewards, 1, 2)
    assert stats["beta_prime"] == pytest.approx(expected) and stats["reward_level"] == level
    torch.testing.assert_close(gates.grad, torch.full_like(gates, expected / gates.numel()))  # only the L1 term acts


@pytest.mark.parametrize("level", ["batch", "group", "micro-batch"])
def test_with_advantages_the_gradient_is_the_surrogate_s_plus_the_l1_penalty_s(tiny, level):
    model, tokenizer = tiny
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    sequences, mask, offset = sampled_step(model, tokenizer, RLKV(backward_options()), gates)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = torch.linspace(-1.0, 1.0, 12)
    grads, stats = [], []
    for beta in (0.0, 1.0):  # the surrogate alone, then with the L1 term
        learner = RLKV(backward_options(reward_level=level, beta=beta, tau=0.5, micro_batch_tokens=1))
        gates.grad = None
        stats.append(learner.policy_backward(model, gates, sequences, mask, offset, advantages, rewards, 1, 2))
        grads.append(gates.grad.clone())
    tokens = mask[:, offset:].sum(1).reshape(3, 4).sum(1).float()
    weights = torch.tensor([0.0, math.exp(0.75) - 1, math.exp(1.0) - 1])  # groups at r_bar 0.5 (off), 0.75, 1.0
    expected = {"batch": math.exp(0.75) - 1, "group": float(weights.mean()),
                "micro-batch": float((weights * tokens).sum() / tokens.sum())}[level]
    assert stats[0]["beta_prime"] == 0.0 and stats[1]["beta_prime"] == pytest.approx(expected)
    assert grads[0].abs().max() > 0 and stats[1]["micro_batches"] == 3
    torch.testing.assert_close(grads[1], grads[0] + expected / gates.numel(), atol=1e-6, rtol=1e-5)


def test_the_micro_batch_level_weights_each_micro_batch_by_its_tokens(tiny):
    model, tokenizer = tiny
    learner = RLKV(backward_options(reward_level="micro-batch", beta=1.0, tau=0.5, micro_batch_tokens=1))  # one group each
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    stats = learner.policy_backward(model, gates, sequences, mask, offset, torch.zeros(12), rewards, 1, 2)
    tokens = mask[:, offset:].sum(1).reshape(3, 4).sum(1).float()
    weights = torch.tensor([0.0, math.exp(0.75) - 1, math.exp(1.0) - 1])
    assert stats["micro_batches"] == 3
    assert stats["beta_prime"] == pytest.approx(float((weights * tokens).sum() / tokens.sum()))


def test_activation_checkpointing_gives_the_same_gate_gradients(tiny):
    model, tokenizer = tiny
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    learner = RLKV(backward_options(beta=0.0))
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    advantages = torch.linspace(-1.0, 1.0, 12)
    grads, stats, runs = [], [], []
    calls = []  # the first decoder layer's attention runs: once per forward, and again when a checkpoint recomputes
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for checkpointing, budget in ((False, 10_000), (True, 10_000), (True, 1)):
            learner = RLKV(backward_options(beta=0.0, gradient_checkpointing=checkpointing, micro_batch_tokens=budget))
            gates.grad = None
            calls.clear()
            stats.append(learner.policy_backward(model, gates, sequences, mask, offset, advantages, torch.zeros(12), 1, 2))
            grads.append(gates.grad.clone())
            runs.append(len(calls))
    finally:
        hook.remove()
    assert grads[0].abs().max() > 0 and [s["micro_batches"] for s in stats] == [1, 1, 3]
    # without checkpointing: the shared prompt, then the completions (2 forwards); with it, each micro-batch's
    # whole sequences once forward and once recomputed in the backward
    assert runs == [2, 2, 6]
    assert stats[1]["forward_tokens"] > stats[0]["forward_tokens"]  # whole sequences: the prompt once per row
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters()) and "forward" not in model.model.layers[0].__dict__


def test_a_bfloat16_model_trains_float32_gates(tiny, data):
    _, tokenizer = tiny
    model = random_model(small_config("llama", vocab_size=len(tokenizer), num_hidden_layers=2), seed=0, dtype=torch.bfloat16)
    learner = RLKV(options(data, steps=2, gradient_checkpointing=True, beta=1.0, adaptive_penalty=False))
    scores = learner.select(model, tokenizer, SelectionContext(seed=0))
    assert scores.scores.dtype == torch.float32 and torch.all(scores.scores < 1.0)
    gates = new_gates(model, 0.5)
    sequences, mask, offset = sampled_step(model, tokenizer, learner, gates)
    learner.policy_backward(model, gates, sequences, mask, offset, torch.linspace(-1, 1, 12), torch.zeros(12), 1, 2)
    assert gates.dtype == torch.float32 and gates.grad.dtype == torch.float32 and gates.grad.abs().max() > 0


class Interrupted(Exception):
    pass


def test_a_resumed_run_reads_its_training_set_back_and_ends_with_the_gates_of_an_uninterrupted_one(tiny, data, tmp_path, monkeypatch):
    model, tokenizer = tiny

    def distill(model, tokenizer, pool, options, rng, engine=None):  # stands in for self-distillation: a seeded choice
        chosen = list(pool)
        rng.shuffle(chosen)
        return [(p, 10 + i) for i, p in enumerate(chosen[:8])], 0.5

    monkeypatch.setattr(learner_module, "self_distill", distill)
    opts = options(data, steps=5, prompts_per_step=2, self_distillation=True, pool_size=12, train_set_size=8, checkpoint_every=1)
    full = RLKV(opts).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(tmp_path / "a")))
    assert not torch.all(full.scores == 1.0)

    def interrupt(step, total, record):
        if step == 2:
            raise Interrupted

    work = tmp_path / "b"
    with pytest.raises(Interrupted):
        RLKV(opts).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), on_step=interrupt))
    saved = [json.loads(line) for line in (work / "train_set.jsonl").read_text().splitlines()]
    assert [r["solution_tokens"] for r in saved] == list(range(10, 18))
    assert {"prompt", "answer", "source", "verify"} <= set(saved[0]) and saved[0]["verify"] == "verify_math"
    assert (work / "train_set.jsonl").read_text() == (tmp_path / "a" / "train_set.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("self-distillation ran again on resume")

    monkeypatch.setattr(learner_module, "self_distill", refuse)
    with pytest.raises(KvrlError, match="other options \\(steps\\)"):  # refused before any self-distillation
        RLKV(replace_options(opts, steps=6)).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), resume=True))
    resumed = RLKV(opts).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), resume=True))
    assert torch.equal(resumed.scores, full.scores)
    assert resumed.extra["solved_fraction"] == full.extra["solved_fraction"] == 0.5  # kept in the checkpoint
    assert [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    lines = (work / "train_set.jsonl").read_text().splitlines()
    (work / "train_set.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # another order
    with pytest.raises(KvrlError, match="hash mismatch"):
        RLKV(opts).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), resume=True))


def replace_options(opts, **changes):
    from dataclasses import replace

    return replace(opts, **changes)


def test_checkpoints_keep_and_restore_the_cuda_rng_states(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7, 8], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    opts = backward_options()
    run = TrainingRun(opts, tmp_path, started=0.0, train_set_sha256="abc")
    gates = new_gates(model, 0.5)
    optimizer = torch.optim.AdamW([gates], lr=0.1)
    save_checkpoint(run, gates, optimizer, 3)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert torch.equal(state["rng"][0]["cuda"][0], torch.tensor([7, 8], dtype=torch.uint8))
    assert resume(TrainingRun(opts, tmp_path, started=0.0), load_checkpoint(tmp_path, opts), new_gates(model, 1.0), optimizer) == 3
    assert len(restored) == 1 and torch.equal(restored[0][0], torch.tensor([7, 8], dtype=torch.uint8))
    assert rng_state().keys() == {"cpu", "cuda"}


def test_each_process_samples_its_share_of_the_same_batch_with_its_own_seed(tiny, data, monkeypatch):
    model, tokenizer = tiny
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(learner_module, "world", lambda rank=rank: (rank, 2))

        def sample(model, tokenizer, prompts, options, sample, copies=1, rank=rank):
            seen[rank] = (torch.initial_seed(), [tokenizer.decode(p) for p in prompts])
            raise Interrupted

        monkeypatch.setattr(learner_module, "rollouts", sample)
        with pytest.raises(Interrupted):
            RLKV(options(data, prompts_per_step=4)).select(model, tokenizer, SelectionContext(seed=7))
    assert seen[0][0] == 7 and seen[1][0] == 8  # sampling seeded with seed + rank
    assert len(seen[0][1]) == len(seen[1][1]) == 2 and not set(seen[0][1]) & set(seen[1][1])  # disjoint halves of one batch
    monkeypatch.setattr(learner_module, "world", lambda: (0, 3))
    with pytest.raises(KvrlError, match="prompts-per-step 4 is not a multiple of the 3 processes"):
        RLKV(options(data, prompts_per_step=4)).select(model, tokenizer, SelectionContext(seed=7))


@pytest.mark.parametrize("shared", [False, True])
def test_the_output_head_in_chunks_gives_the_logprobs_and_gradients_of_one_call(tiny, monkeypatch, shared):
    from kvpress_rl.strategies.rlkv import backward

    model, tokenizer = tiny
    gates, (sequences, mask, offset) = random_gates_and_rollouts(model, tokenizer, RLKVOptions(max_new_tokens=8), seed=1)
    calls = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    results = []
    try:
        for chunk in (10_000, 3):
            monkeypatch.setattr(backward, "LOGPROB_CHUNK", chunk)
            calls.clear()
            gates.grad = None
            with frozen(model), gated(model, gates, sink=1, window=2):
                logp = backward.completion_logprobs(model, sequences, mask, offset, 4, shared=shared)
                logp.sum().backward()
            results.append((logp.detach(), gates.grad.clone(), list(calls)))
    finally:
        hook.remove()
    real = int(mask[:, offset:].sum())
    assert max(results[1][2]) <= 3 and sum(results[1][2]) == 2 * real  # chunks of 3 real tokens, each run again in the backward
    assert torch.equal(results[0][0] == 0, mask[:, offset:] == 0)  # padding gets 0, real tokens a log-probability < 0
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6) and results[0][1].abs().max() > 0


# --- reliability: a fresh run starts clean, resumes count their whole time, bad input is one line ----------------
def test_a_fresh_run_in_a_used_work_folder_starts_its_log_afresh(tiny, data, tmp_path):
    model, tokenizer = tiny
    work = tmp_path / "run"
    RLKV(options(data, steps=3)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work)))
    (work / "training.png").write_bytes(b"old plot")
    RLKV(options(data, steps=2)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work)))
    assert [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (work / "training.png").exists()
    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] == 2


def test_a_resumed_run_counts_the_time_before_the_interruption(tiny, data, tmp_path):
    model, tokenizer = tiny
    work = tmp_path / "run"

    def interrupt(step, total, record):
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        RLKV(options(data, steps=3)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work), on_step=interrupt))
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["elapsed_s"] > 0
    state["elapsed_s"] = 1000.0  # as if the first part had run for 1,000 s
    torch.save(state, work / "checkpoint.pt")
    resumed = RLKV(options(data, steps=3)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work), resume=True))
    assert 1000.0 < resumed.wall_time_s < 1000.0 + 120
    assert torch.load(work / "checkpoint.pt", weights_only=False)["elapsed_s"] > 1000.0


@pytest.mark.parametrize("damage", [lambda path: path.write_bytes(path.read_bytes()[:200]), lambda path: torch.save([1, 2], path),
                                    lambda path: path.write_bytes(b"")])
def test_resume_from_a_damaged_checkpoint_says_start_afresh(tiny, data, tmp_path, damage):
    model, tokenizer = tiny
    work = tmp_path / "run"
    RLKV(options(data, steps=1)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work)))
    damage(work / "checkpoint.pt")
    with pytest.raises(KvrlError, match="checkpoint.pt is damaged.*start afresh without --resume"):
        RLKV(options(data, steps=1)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work), resume=True))


@pytest.mark.parametrize("field_name, value, accepted", [("checkpoint_every", 0, ">= 1"), ("temperature", 0.0, "> 0"),
                                                         ("temperature", -1.0, "> 0"), ("lr", 0.0, "> 0"), ("beta", -1e-3, ">= 0"),
                                                         ("group_size", 1, ">= 2"), ("window", 0, ">= 1")])
def test_options_out_of_range_are_refused_when_built(data, field_name, value, accepted):
    flag = "--" + field_name.replace("_", "-")
    with pytest.raises(KvrlError, match=f"{flag} must be {accepted}, got"):
        options(data, **{field_name: value})


def test_groups_whose_advantages_are_all_zero_are_not_run_and_the_gradient_is_unchanged(tiny):
    from kvpress_rl.strategies.rlkv.grpo import clipped_surrogate

    model, tokenizer = tiny
    gates = new_gates(model, 1.0)
    with torch.no_grad():
        gates.uniform_(0.2, 0.9)
    sequences, mask, offset = sampled_step(model, tokenizer, RLKV(backward_options()), gates)
    advantages = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.2, -0.6, -0.6])  # the middle group agrees
    learner = RLKV(backward_options(beta=0.0))
    gates.grad = None
    stats = learner.policy_backward(model, gates, sequences, mask, offset, advantages, torch.ones(12), 1, 2)
    skipped = gates.grad.clone()
    gates.grad = None
    completion = mask[:, offset:].float()
    with frozen(model), gated(model, gates, sink=1, window=2):  # every row, the middle group included
        logp = completion_logprobs(model, sequences, mask, offset, 4, shared=False)
        (-clipped_surrogate(logp, logp.detach(), advantages, completion, 0.4) / completion.sum()).backward()
    torch.testing.assert_close(skipped, gates.grad, atol=1e-6, rtol=1e-5)
    assert skipped.abs().max() > 0
    prompt = int(mask[::4, :offset].sum(1).max())
    width = int(completion.sum(1).max())
    assert stats["forward_tokens"] <= 2 * (prompt + 4 * width)  # two of the three groups went through the model
