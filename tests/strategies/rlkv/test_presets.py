"""RLKV's unset options, resolved per model (`presets.py`) and printed with where each value came from."""

from types import SimpleNamespace

from kvpress_rl.profiles import EMBEDDED_RLKV
from kvpress_rl.strategies.rlkv import RLKV, RLKVOptions


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
    assert (llama.train_mask, llama.reward_level, llama.pool_size, llama.train_set_size) == ("block", "batch", 40315,
                                                                                             3000)
    assert (llama.gradient_checkpointing, llama.rollout_batch, llama.micro_batch_tokens) == (True, 8, 7680)
    qwen2 = resolved(fake_model("qwen2"))
    assert (qwen2.beta, qwen2.tau, qwen2.temperature) == (1e-3, 0.55, 1.0)
    qwen3 = resolved(fake_model("qwen3"))
    assert (qwen3.beta, qwen3.tau, qwen3.temperature) == (2.5e-3, 0.5, 0.6)
    assert resolved(fake_model("qwen3"), tau=0.7, temperature=1.0).tau == 0.7  # given values win
    embedded = resolved(fake_model("llama", profile="embedded"), lr=0.2)
    assert (embedded.steps, embedded.lr, embedded.beta, embedded.tau, embedded.sink,
            embedded.window) == (40, 0.2, 1e-2, 0.5, 16, 64)
    assert (embedded.prompts_per_step, embedded.max_new_tokens, embedded.train_mask,
            embedded.reward_level) == (6, 64, "token", "batch")
    assert (embedded.pool_size, embedded.train_set_size, embedded.rollout_batch,
            embedded.gradient_checkpointing) == (64, 64, 6, False)
    # the profile's values
    assert all(getattr(embedded, k) == v for k, v in EMBEDDED_RLKV.items() if v is not None and k != "lr")
    # every solved problem of its pool
    assert resolved(fake_model("llama", profile="embedded"), pool_size=10).train_set_size == 10
    named = SimpleNamespace(name_or_path="embedded", config=SimpleNamespace(model_type="llama"))
    assert resolved(named).steps == 186  # the name does not matter: only the attached profile
    counted = resolved(fake_model("llama", profile="embedded"), data="embedded-count")
    assert (counted.max_new_tokens, counted.steps) == (80, 40)  # room for its longer chains; the rest as the profile
    assert resolved(fake_model("llama", profile="embedded"), data="embedded-count",
                    max_new_tokens=50).max_new_tokens == 50
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


def test_real_models_default_to_the_official_batch_advantage_and_the_embedded_model_keeps_the_group_one():
    for model_type in ("qwen2", "llama", "qwen3"):
        assert resolved(fake_model(model_type)).advantage == "batch"
    assert resolved(fake_model("qwen2"), advantage="group").advantage == "group"  # the paper's form: an option
    assert resolved(fake_model("llama", profile="embedded")).advantage == "group"
    printed = {}
    for name, model in (("qwen2", fake_model("qwen2")), ("embedded", fake_model("llama", profile="embedded"))):
        learner = RLKV(RLKVOptions())
        learner.resolve(model)
        printed[name] = next(line for line in learner.resolved_options_text().splitlines()
                             if line.startswith("  advantage = "))
    assert printed["qwen2"] == ("  advantage = 'batch'  [official]  (token-weighted batch z-score of (r - 0.5) * 10, "
                                "the official training's adv_norm)")
    assert printed["embedded"] == ("  advantage = 'group'  [profile embedded]  "
                                   "(z-score within each prompt's group, the paper's text)")
