"""Whether a cell's prompts go through the chat template: the user's flag, else the task's preference, else whether
the tokenizer has one; a template asked for on a tokenizer without one is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.grid_spec import GridSpec
from kvpress_rl.evaluators.tasks import TaskConfig, resolve_tasks

# beside tokenizer_config.json
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


def chat_template_setting(spec: GridSpec, config: TaskConfig) -> bool | None:
    """What a cell asks for: `--chat-template`/`--no-chat-template` if given, else the task's preference.

    None: the tokenizer's own (on when it has one), which the model recorded beside it fixes."""
    return spec.chat_template if spec.chat_template is not None else config.chat_template


def tokenizer_has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def cell_uses_chat_template(spec: GridSpec, config: TaskConfig, tokenizer: Any) -> bool:
    """Whether the cell's prompts go through the template (refused in one line when it is asked for and missing)."""
    has_template = tokenizer_has_chat_template(tokenizer)
    check_chat_template(spec, [config], has_template)
    setting = chat_template_setting(spec, config)
    return has_template if setting is None else setting


def folder_has_chat_template(model: str) -> bool | None:
    """Whether the tokenizer in model folder `model` has a chat template, read from its files before the model loads.

    None when it cannot be told from files here (a hub id, `embedded`, a `.gguf`, no tokenizer_config.json):
    the loaded tokenizer answers then. Any template file counts as one, so a folder is never refused wrongly."""
    folder = Path(model)
    tokenizer_config = folder / "tokenizer_config.json"
    if not folder.is_absolute() or not tokenizer_config.is_file():  # a folder is recorded resolved; `embedded`: a name
        return None
    if any((folder / name).exists() for name in TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return None


def check_chat_template(spec: GridSpec, configs: list[TaskConfig], has_template: bool | None) -> None:
    """A chat template asked for (by the user, or by a task with no flag given) on a tokenizer without one: one line.

    `has_template` None: not known yet (checked again once the tokenizer loads)."""
    if has_template is not False:
        return
    if spec.chat_template:
        raise KvrlError(f"--chat-template: the tokenizer of model {spec.model} has no chat template; "
                        "pass --no-chat-template (plain prompts) or a model whose tokenizer has one")
    for config in configs:
        if chat_template_setting(spec, config):
            raise KvrlError(f"task {config.name!r} uses the chat template by default, but the tokenizer of model "
                            f"{spec.model} has none; pass --no-chat-template to run it on plain prompts")


def check_chat_template_before_loading(spec: GridSpec) -> None:
    """`check_chat_template` on what the model folder's files say, before the model (and its tokenizer) loads."""
    check_chat_template(spec, resolve_tasks(spec), folder_has_chat_template(spec.model))
