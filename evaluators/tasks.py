"""Evaluation tasks as lm-evaluation-harness task configs.

Three kinds, one name space:

- lm-eval's own tasks (`gsm8k`, `gsm8k_cot`, `aime24`, `minerva_math500`, `mbpp`, ...): passed to
  lm-eval by name and run as lm-eval defines them. With a data directory (`--data-dir`,
  `KVRL_DATA_DIR`, laid out like `shared/data`) the same config is read from lm-eval's YAML and
  pointed at the local JSON Lines instead of the hub, so it runs offline.
- the paper's setting, `<task>_r1`: the R1 prompt (`Please reason step by step, and put your final
  answer within \\boxed{}`), chat template, greedy, a cap on the total length (8,192 tokens; 16,384
  for AIME24), scored with math-verify (integers for AIME, the MBPP sandbox for code), and RLKV's
  decoding simulation: the prompt's last 50 tokens are fed one at a time through the compressed
  cache before generating (`decoding_simulation` in the generation arguments, read by the `kvrl`
  model; `kvrl eval --decoding-simulation N` overrides it). lm-eval's own tasks and `embedded`
  have none (0).
- `embedded`, `embedded_long`, `embedded_count`: the embedded model's tasks (500 generated test
  problems each; `kvpress_rl.embedded.task`).

MBPP, in every variant, runs code through `kvpress_rl.evaluators.code_execution` (a contained
subprocess) rather than lm-eval's in-process `exec`, and only when code execution is allowed
(`--allow-code-execution`; lm-eval's CLI: `--confirm_run_unsafe_code`).

A task's settings are defaults; `kvrl eval`'s flags win: `--chat-template`/`--no-chat-template`
(the `*_r1` and embedded tasks ask for the chat template, and on a tokenizer without one are refused
unless `--no-chat-template` is given), `--max-tokens` (new tokens per answer, in place of the task's
answer limit and of the `*_r1` cap on the total length) and `--decoding-simulation N`.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpress_rl.answers import embedded_equal, gsm8k_gold, integer_equal, math_equal
from kvpress_rl.embedded.task import ANSWER_LIMITS, EMBEDDED_TASK, EVAL_TASKS, task_problems
from kvpress_rl.errors import KvrlError
from kvpress_rl.evaluators.code_execution import score_mbpp
from kvpress_rl.evaluators.grid_spec import GridSpec

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
R1_TOTAL_TOKENS = 8192
R1_TOTAL_TOKENS_AIME = 16384
EMBEDDED_TEST_PROBLEMS = 500
R1_DECODING_SIMULATION = 50  # RLKV eval/bench/pred.py: --decoding_simulation_length 50
# gsm8k_r1's validation split: the last rows of GSM8K's train file (RLKV trains on its first)
GSM8K_VALIDATION_ROWS = 500
SPLITS = ("test", "validation")


@dataclass(frozen=True)
class LocalFiles:
    """Where an lm-eval task's splits lie in a data directory, and how its rows map to lm-eval's schema."""

    splits: dict[str, str]  # lm-eval split name -> file under the data directory
    to_schema: Callable[[dict], dict] | None = None


def _aime_to_hub(row: dict) -> dict:
    # lm-eval's aime24 reads Maxwell-Jia/AIME_2024 (ID, Problem, Solution, Answer as int); the
    # offline copy pads answers to three digits ("025"), so the integer is what is compared.
    return {"ID": row["id"], "Problem": row["problem"], "Solution": row["solution"], "Answer": int(row["answer"])}


_GSM8K_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
LM_EVAL_LOCAL = {
    "gsm8k": LocalFiles(_GSM8K_FILES),
    "gsm8k_cot": LocalFiles(_GSM8K_FILES),
    "gsm8k_cot_zeroshot": LocalFiles(_GSM8K_FILES),
    "gsm8k_cot_llama": LocalFiles(_GSM8K_FILES),
    "aime24": LocalFiles({"train": "aime24/test.jsonl"}, _aime_to_hub),
    "minerva_math500": LocalFiles({"test": "math500/test.jsonl"}),
    "mbpp": LocalFiles({"test": "mbpp/test.jsonl", "prompt": "mbpp/prompt.jsonl"}),
}


# --- the paper's setting: <task>_r1 ---------------------------------------------------------------
@dataclass(frozen=True)
class R1Task:
    name: str
    local_file: str  # under the data directory
    hub: tuple[str, str | None, str]  # (dataset path, name, split) when no data directory is given
    to_doc: Callable[[dict], dict]  # a row (local or hub) -> {"question", "gold", ...}
    correct: Callable[[str, dict], bool]
    total_tokens: int = R1_TOTAL_TOKENS
    code: bool = False
    # a validation split: (file under the data directory, how many of its last rows); None: the task has none
    validation: tuple[str, int] | None = None


def _gsm8k_doc(row: dict) -> dict:
    return {"question": row["question"], "gold": gsm8k_gold(row["answer"])}


def _math_doc(row: dict) -> dict:
    return {"question": row["problem"], "gold": row["answer"]}


def _aime_doc(row: dict) -> dict:
    return {"question": row.get("problem") or row["Problem"],
            "gold": str(int(str(row.get("answer", row.get("Answer"))).strip()))}


def _mbpp_doc(row: dict) -> dict:
    tests = "\n".join(row["test_list"])
    question = (f"{row['text']}\nYour code should pass these tests:\n{tests}\nWrite the function in a ```python``` "
                "code block.")
    return {"question": question, "gold": tests, "test_list": list(row["test_list"]),
            "test_setup_code": row.get("test_setup_code") or ""}


def _mbpp_correct(response: str, doc: dict) -> bool:
    return score_mbpp(response, doc).passed


R1_TASKS = {
    t.name: t
    for t in (
        R1Task("gsm8k_r1", "gsm8k/test.jsonl", ("openai/gsm8k", "main", "test"), _gsm8k_doc,
               lambda r, d: math_equal(r, d["gold"]),
               validation=("gsm8k/train.jsonl", GSM8K_VALIDATION_ROWS)),
        R1Task("math500_r1", "math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test"), _math_doc,
               lambda r, d: math_equal(r, d["gold"])),
        R1Task("aime24_r1", "aime24/test.jsonl", ("Maxwell-Jia/AIME_2024", None, "train"), _aime_doc,
               lambda r, d: integer_equal(r, d["gold"]), total_tokens=R1_TOTAL_TOKENS_AIME),
        R1Task("mbpp_r1", "mbpp/test.jsonl", ("google-research-datasets/mbpp", "full", "test"), _mbpp_doc,
               _mbpp_correct, code=True),
    )
}

CODE_TASKS = {"mbpp", "mbpp_r1"}
# lm-eval tasks that would exec model code in-process: refused rather than run outside the sandbox
UNCONTAINED_CODE_TASKS = {"mbpp_plus", "mbpp_instruct", "mbpp_plus_instruct", "humaneval", "humaneval_plus",
                          "humaneval_instruct"}
MBPP_FEWSHOT_IDS = (2, 3, 4)  # lm-eval's (and the paper's) three MBPP examples


@dataclass
class TaskConfig:
    """What `simple_evaluate` gets for one task, and how the grid reads its result."""

    name: str
    spec: str | dict[str, Any]  # a name lm-eval knows, or an inline config
    metric: str  # the accuracy key in lm-eval's results, e.g. "acc,none"
    # the task's preference, a default: an explicit --chat-template/--no-chat-template wins; None: the
    # tokenizer's own (on when it has one). A task that wants it on a tokenizer without one is refused.
    chat_template: bool | None = None
    unsafe_code: bool = False

    @property
    def reads_hub(self) -> bool:
        if isinstance(self.spec, str):
            return True
        return "custom_dataset" not in self.spec and self.spec.get("dataset_path") != "json"


def data_dir_from(value: str | None) -> Path | None:
    value = value or os.environ.get("KVRL_DATA_DIR")
    return Path(value) if value else None


def _require(data_dir: Path, relative: str, task: str) -> str:
    path = data_dir / relative
    if not path.is_file():
        raise KvrlError(f"task {task!r} needs {relative} in the data directory {data_dir}, which has no such file")
    return str(path)


def _accuracy_metric() -> list[dict]:
    return [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def r1_config(task: R1Task, data_dir: Path | None, split: str = "test") -> TaskConfig:
    validation = split == "validation"

    def process_docs(dataset):
        if validation:  # the file's last rows
            dataset = dataset.select(range(max(0, len(dataset) - task.validation[1]), len(dataset)))
        return dataset.map(task.to_doc, remove_columns=dataset.column_names)

    def process_results(doc: dict, results: list[str]) -> dict:
        return {"acc": float(task.correct(results[0], doc))}

    config: dict[str, Any] = {
        "task": task.name,
        "output_type": "generate_until",
        "test_split": "test",
        "process_docs": process_docs,
        "doc_to_text": lambda doc: f"{doc['question']}\n{R1_INSTRUCTION}",
        "doc_to_target": "{{gold}}",
        "process_results": process_results,
        "metric_list": _accuracy_metric(),
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": task.total_tokens,
                              "max_total_tokens": task.total_tokens,
                              "decoding_simulation": R1_DECODING_SIMULATION},
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": "kvpress-rl: the RLKV paper's evaluation setting"},
    }
    if validation and data_dir is None:
        raise KvrlError(f"the validation split of task {task.name!r} is read from the data directory; "
                        "pass --data-dir (a folder laid out like shared/data)")
    if data_dir is not None:
        local = task.validation[0] if validation else task.local_file
        config.update(dataset_path="json",
                      dataset_kwargs={"data_files": {"test": _require(data_dir, local, task.name)}})
        if validation:
            config["metadata"]["split"] = f"validation: the last {task.validation[1]} rows of {local}"
    else:
        path, name, hub_split = task.hub
        config.update(dataset_path=path, dataset_name=name, test_split=hub_split)
    if task.code:
        config["unsafe_code"] = True
    return TaskConfig(task.name, config, "acc,none", chat_template=True, unsafe_code=task.code)


EMBEDDED_TASKS = tuple(EVAL_TASKS)


def embedded_config(count: int = EMBEDDED_TEST_PROBLEMS, max_new_tokens: int | None = None, name: str = EMBEDDED_TASK,
                    split: str = "test") -> TaskConfig:
    """An embedded task's problems of `split` (test, or validation: other seeds, never trained on);
    `max_new_tokens` None: the task's own answer limit."""
    max_new_tokens = max_new_tokens or ANSWER_LIMITS[name]

    def dataset(**_: Any):
        import datasets

        rows = [{"prompt": p.prompt(), "answer": p.answer, "seed": p.seed, "hops": p.hops, "links": len(p.table)}
                for p in task_problems(name, split, count)]
        return {"test": datasets.Dataset.from_list(rows)}

    def process_results(doc: dict, results: list[str]) -> dict:
        return {"acc": float(embedded_equal(results[0], doc["answer"]))}

    config = {
        "task": name,
        "custom_dataset": dataset,
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "process_results": process_results,
        "metric_list": _accuracy_metric(),
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": f"kvpress-rl embedded task {name} ({split} split)"},
    }
    return TaskConfig(name, config, "acc,none", chat_template=True)


def _mbpp_results(doc: dict, results: list[str]) -> dict:
    return {"pass_at_1": float(score_mbpp(results[0], doc).passed)}


def lm_eval_config(name: str, data_dir: Path | None, task_manager) -> TaskConfig:
    """lm-eval's own task, pointed at the local files when a data directory is given."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if name in UNCONTAINED_CODE_TASKS:
        raise KvrlError(f"task {name!r} would run model-written code outside kvpress-rl's sandbox; use mbpp or mbpp_r1")
    code = name in CODE_TASKS
    if data_dir is None and not code:
        return TaskConfig(name, name, "")
    entry = task_manager.task_index[name]
    # MBPP's YAML imports a module that fetches `code_eval` from the hub: read it unresolved and
    # replace the two functions it names (the metric, the few-shot examples) with ours.
    config = dict(load_yaml(entry.yaml_path, resolve_func=not code))
    config.pop("tag", None)
    if data_dir is not None:
        local = LM_EVAL_LOCAL.get(name)
        if local is None:
            raise KvrlError(f"task {name!r} has no offline copy; with --data-dir the tasks are: "
                            f"{', '.join(offline_task_names())}")
        files = {split: _require(data_dir, path, name) for split, path in local.splits.items()}
        config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
        if local.to_schema is not None:
            config["process_docs"] = _then(local.to_schema, config.get("process_docs"))
    if code:  # our contained executor instead of lm-eval's in-process exec
        config.update(process_results=_mbpp_results, unsafe_code=True,
                      metric_list=[{"metric": "pass_at_1", "aggregation": "mean", "higher_is_better": True}])
        config["fewshot_config"] = {"sampler": "first_n", "samples": _mbpp_fewshot(data_dir)}
    return TaskConfig(name, config, "", unsafe_code=code)


def _mbpp_fewshot(data_dir: Path | None) -> list[dict]:
    if data_dir is not None:
        rows = [json.loads(line)
                for line in Path(_require(data_dir, "mbpp/prompt.jsonl", "mbpp")).read_text().splitlines()
                if line.strip()]
    else:
        import datasets

        rows = list(datasets.load_dataset("google-research-datasets/mbpp", "full", split="prompt"))
    chosen = [r for r in rows if r["task_id"] in MBPP_FEWSHOT_IDS]
    return [{**r, "is_fewshot": True} for r in sorted(chosen, key=lambda r: r["task_id"])]


def _then(to_schema: Callable[[dict], dict], original: Callable | None) -> Callable:
    def process_docs(dataset):
        mapped = dataset.map(to_schema, remove_columns=dataset.column_names)
        return original(mapped) if original else mapped

    return process_docs


def offline_task_names() -> list[str]:
    return [*EMBEDDED_TASKS, *LM_EVAL_LOCAL, *R1_TASKS]


def validation_task_names() -> list[str]:
    """The tasks with a validation split (problems apart from the test split, for choosing settings)."""
    return [*EMBEDDED_TASKS, *(name for name, task in R1_TASKS.items() if task.validation)]


def resolve_task(name: str, data_dir: Path | None, task_manager=None, embedded_tokens: int | None = None,
                 split: str = "test") -> TaskConfig:
    """The lm-eval config of task `name` on `split` (test, or validation where the task has one); unknown names get
    an error that lists the close ones."""
    if split not in SPLITS:
        raise KvrlError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    if split == "validation" and name not in validation_task_names():
        raise KvrlError(f"task {name!r} has no validation split, and settings are chosen on validation problems only; "
                        f"tasks with one: {', '.join(validation_task_names())}")
    if name in EMBEDDED_TASKS:
        return embedded_config(max_new_tokens=embedded_tokens, name=name, split=split)
    if name in R1_TASKS:
        return r1_config(R1_TASKS[name], data_dir, split)
    if task_manager is None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager()
    known = set(task_manager.all_tasks)
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known | set(offline_task_names())), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise KvrlError(f"unknown task {name!r}; offline tasks: {', '.join(offline_task_names())}{hint}")
    return lm_eval_config(name, data_dir, task_manager)


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task index (slow to build: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_tasks(spec: GridSpec) -> list[TaskConfig]:
    """Every task of a grid, checked (names, data files, code execution) before any model work."""
    manager = task_manager()
    data_dir = data_dir_from(spec.data_dir)
    configs = [resolve_task(name, data_dir, manager, embedded_tokens=spec.max_new_tokens, split=spec.split)
               for name in spec.tasks]
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    for config in configs:
        if offline and config.reads_hub:
            raise KvrlError(f"task {config.name!r} reads its data from the Hugging Face hub, which is offline here; "
                            "pass --data-dir (a folder laid out like shared/data)")
        if config.unsafe_code and not spec.allow_code_execution:
            raise KvrlError(f"task {config.name!r} runs model-written code; pass --allow-code-execution to allow it")
    return configs
