"""A task's settings are defaults and the user's flags win (`--chat-template`/`--no-chat-template`,
`--max-tokens`); a chat template asked for on a tokenizer without one, or an answer limit the model cannot hold, is
refused with one line before lm-eval runs."""

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.chat_template import chat_template_setting, check_chat_template, folder_has_chat_template
from kvpress_rl.evaluators.grid import run_cell, run_grid
from kvpress_rl.evaluators.grid_spec import CellSetting, GridSpec
from kvpress_rl.evaluators.harness import GenerationStats
from kvpress_rl.evaluators.resume import cell_definition
from kvpress_rl.evaluators.tasks import R1_TASKS, TaskConfig, embedded_config, r1_config
from kvpress_rl.models import small_config

EMBEDDED = embedded_config(count=2)  # the task asks for the chat template
LM_EVAL = TaskConfig("gsm8k", "gsm8k", "")  # no preference: the tokenizer's own
FULL_CACHE = CellSetting.full_cache()


def spec(chat_template=None, **changes) -> GridSpec:
    return GridSpec(strategies=[], sparsities=[], seeds=[0], limit=1, tasks=["embedded"], model="/models/plain",
                    chat_template=chat_template, **changes)


def fake_lm(template: str | None, max_length: int = 32768):
    return SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template), max_length=max_length,
                           cell_settings=lambda **settings: nullcontext(GenerationStats()),
                           model=SimpleNamespace(config=small_config("llama")))


@pytest.fixture
def evaluate_calls(monkeypatch):
    """lm-eval's `simple_evaluate` replaced by a recorder (it returns None, as on a rank that does not report)."""
    import lm_eval

    calls = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize("flag, task, setting", [
    (False, EMBEDDED, False),  # --no-chat-template wins over the task's preference
    (True, LM_EVAL, True),
    (None, EMBEDDED, True),  # no flag: the task's preference
    (None, LM_EVAL, None),  # neither: the tokenizer's own
])
def test_the_users_flag_wins_over_the_tasks_preference(flag, task, setting):
    assert chat_template_setting(spec(flag), task) is setting
    assert cell_definition(spec(flag), task, FULL_CACHE)["chat_template"] is setting


def test_no_chat_template_is_what_the_cell_uses_and_records(evaluate_calls, tmp_path):
    assert run_cell(fake_lm("{{ messages }}"), spec(False), EMBEDDED, FULL_CACHE, None, tmp_path) is None
    assert evaluate_calls[0]["apply_chat_template"] is False and evaluate_calls[0]["fewshot_as_multiturn"] is False
    run_cell(fake_lm("{{ messages }}"), spec(), LM_EVAL, FULL_CACHE, None, tmp_path)
    assert evaluate_calls[1]["apply_chat_template"] is True  # no flag, no preference: the tokenizer has one


def test_max_tokens_replaces_the_tasks_total_length_cap(evaluate_calls, tmp_path):
    run_cell(fake_lm(None), spec(max_new_tokens=12000), LM_EVAL, FULL_CACHE, None, tmp_path)
    assert evaluate_calls[0]["gen_kwargs"] == {"max_gen_toks": 12000, "max_total_tokens": None}
    run_cell(fake_lm(None), spec(), LM_EVAL, FULL_CACHE, None, tmp_path)
    assert evaluate_calls[1]["gen_kwargs"] is None  # no flag: the task's own limits


@pytest.mark.parametrize("flag, task, message", [
    (None, EMBEDDED, "task 'embedded' uses the chat template by default, but the tokenizer of model /models/plain "
                     "has none; "
                     "pass --no-chat-template"),
    (True, LM_EVAL, "--chat-template: the tokenizer of model /models/plain has no chat template; "
                    "pass --no-chat-template"),
])
def test_a_template_the_tokenizer_lacks_is_refused_in_one_line(flag, task, message, evaluate_calls, tmp_path):
    with pytest.raises(KvrlError) as refused:
        run_cell(fake_lm(None), spec(flag), task, FULL_CACHE, None, tmp_path)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert evaluate_calls == []


@pytest.mark.parametrize("flag, task, has_template", [
    (False, EMBEDDED, False), (None, LM_EVAL, False), (None, EMBEDDED, True), (True, EMBEDDED, None),
    (None, EMBEDDED, None)])
def test_combinations_that_run(flag, task, has_template):
    check_chat_template(spec(flag), [task], has_template)  # None: not known before loading, checked again after


def test_run_grid_refuses_before_any_cell(evaluate_calls, tmp_path):
    # a tokenizer known only once loaded (a hub id, a .gguf): refused before the first cell, nothing written
    with pytest.raises(KvrlError, match="task 'embedded' uses the chat template by default"):
        run_grid(fake_lm(None), spec(), tmp_path)
    assert evaluate_calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("files, expected", [
    ({"tokenizer_config.json": {"eos_token": "</s>"}}, False),
    ({"tokenizer_config.json": {"chat_template": "{{ messages }}"}}, True),
    ({"tokenizer_config.json": {}, "chat_template.jinja": "{{ messages }}"}, True),
    ({"tokenizer_config.json": {}, "chat_template.json": {"chat_template": "{{ messages }}"}}, True),
    ({"tokenizer.json": {}}, None),  # no tokenizer_config.json: the loaded tokenizer will tell
    ({"tokenizer_config.json": "not json"}, None),
])
def test_a_folders_chat_template_is_read_before_loading(tmp_path, files, expected):
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    assert folder_has_chat_template(str(tmp_path)) is expected


@pytest.mark.parametrize("model", ["embedded", "random:llama", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "/no/such/folder"])
def test_what_is_not_a_folder_is_known_only_once_loaded(model):
    assert folder_has_chat_template(model) is None


@pytest.mark.parametrize("max_tokens, task, message", [
    (8192, LM_EVAL, "--max-tokens 8192: model /models/plain reads at most 8192 tokens (prompt and answer); "
                    "pass --max-tokens below 8192"),
    (None, r1_config(R1_TASKS["gsm8k_r1"], None),
     "task 'gsm8k_r1' answers in up to 8192 new tokens, but model /models/plain reads at most 8192 tokens"),
])
def test_an_answer_limit_the_model_cannot_hold_is_one_line(max_tokens, task, message, evaluate_calls, tmp_path):
    with pytest.raises(KvrlError) as refused:
        run_cell(fake_lm("{{ messages }}", max_length=8192), spec(max_new_tokens=max_tokens), task, FULL_CACHE, None,
                 tmp_path)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert evaluate_calls == []
    run_cell(fake_lm("{{ messages }}", max_length=8192), spec(max_new_tokens=8191), task, FULL_CACHE, None, tmp_path)
    assert len(evaluate_calls) == 1  # --max-tokens below the model's length wins over the task's limit
