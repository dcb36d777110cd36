import json

import datasets
import pytest

from kvpress_rl import KvrlError
from kvpress_rl.evaluators.grid_spec import GridSpec
from kvpress_rl.evaluators.tasks import R1_INSTRUCTION, resolve_task, resolve_tasks


def test_unknown_task_lists_close_names():
    with pytest.raises(KvrlError, match=r"unknown task 'gsm8kk'.*close names: gsm8k"):
        resolve_task("gsm8kk", None)


def test_a_data_directory_without_the_file_is_refused(tmp_path):
    with pytest.raises(KvrlError, match=r"task 'aime24_r1' needs aime24/test.jsonl in the data directory"):
        resolve_task("aime24_r1", tmp_path)
    with pytest.raises(KvrlError, match=r"task 'gsm8k' needs gsm8k/train.jsonl"):
        resolve_task("gsm8k", tmp_path)


def test_code_tasks_need_permission_to_execute_code(shared_data):
    spec = GridSpec(strategies=[], sparsities=[0.5], seeds=[0], tasks=["mbpp_r1"], data_dir=str(shared_data))
    with pytest.raises(KvrlError, match="pass --allow-code-execution"):
        resolve_tasks(spec)
    spec.allow_code_execution = True
    assert [c.name for c in resolve_tasks(spec)] == ["mbpp_r1"]


def test_uncontained_code_tasks_are_refused():
    with pytest.raises(KvrlError, match="outside kvpress-rl's sandbox"):
        resolve_task("mbpp_plus", None)


def load_docs(config):
    files = config.spec["dataset_kwargs"]["data_files"]
    dataset = datasets.load_dataset("json", data_files=files)
    split = config.spec.get("test_split", "test")
    return config.spec["process_docs"](dataset[split])


def test_local_aime24_takes_lm_eval_schema_with_integer_answers(shared_data):
    raw = [json.loads(line) for line in (shared_data / "aime24" / "test.jsonl").read_text().splitlines()]
    padded = {r["id"]: r["answer"] for r in raw if r["answer"].startswith("0")}
    docs = {d["ID"]: d for d in load_docs(resolve_task("aime24", shared_data))}
    assert padded and set(next(iter(docs.values()))) >= {"ID", "Problem", "Solution", "Answer"}
    assert all(docs[i]["Answer"] == int(answer) and str(docs[i]["Answer"]) != answer for i, answer in padded.items())


def test_r1_tasks_use_the_r1_prompt_and_score_with_their_verifier(shared_data):
    config = resolve_task("gsm8k_r1", shared_data)
    doc = load_docs(config)[0]
    assert config.spec["doc_to_text"](doc).endswith(R1_INSTRUCTION)
    assert config.chat_template is True and config.spec["generation_kwargs"]["max_total_tokens"] == 8192
    assert config.spec["process_results"](doc, [f"... \\boxed{{{doc['gold']}}}"]) == {"acc": 1.0}
    assert config.spec["process_results"](doc, ["\\boxed{-1}"]) == {"acc": 0.0}
    assert resolve_task("aime24_r1", shared_data).spec["generation_kwargs"]["max_total_tokens"] == 16384


def test_hub_tasks_are_refused_offline_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("KVRL_DATA_DIR", raising=False)
    with pytest.raises(KvrlError, match=r"task 'gsm8k_r1' reads its data from the Hugging Face hub.*pass --data-dir"):
        resolve_tasks(GridSpec(strategies=[], sparsities=[0.5], seeds=[0], tasks=["gsm8k_r1"]))
    embedded_only = GridSpec(strategies=[], sparsities=[0.5], seeds=[0], tasks=["embedded"])
    assert [c.name for c in resolve_tasks(embedded_only)] == ["embedded"]


def test_decoding_simulation_is_the_r1_default_only(shared_data):
    from kvpress_rl.evaluators.tasks import R1_DECODING_SIMULATION

    assert R1_DECODING_SIMULATION == 50
    for name in ("gsm8k_r1", "math500_r1", "aime24_r1"):
        assert resolve_task(name, shared_data).spec["generation_kwargs"]["decoding_simulation"] == 50
    assert "decoding_simulation" not in resolve_task("embedded", None).spec["generation_kwargs"]
    gsm8k = resolve_task("gsm8k", shared_data).spec
    assert "decoding_simulation" not in (gsm8k.get("generation_kwargs") or {})


def test_the_embedded_tasks_carry_their_own_answer_limits_and_lengths():
    from kvpress_rl.embedded.task import COUNTED_MAX_NEW_TOKENS, EMBEDDED_MAX_NEW_TOKENS

    counted = resolve_task("embedded_count", None).spec
    assert counted["generation_kwargs"]["max_gen_toks"] == COUNTED_MAX_NEW_TOKENS
    assert resolve_task("embedded", None).spec["generation_kwargs"]["max_gen_toks"] == EMBEDDED_MAX_NEW_TOKENS
    # --max-new-tokens
    assert resolve_task("embedded_count", None, embedded_tokens=40).spec["generation_kwargs"]["max_gen_toks"] == 40
    rows = counted["custom_dataset"]()["test"]
    assert len(rows) == 500 and rows[0]["prompt"].startswith("Take ") and {"hops", "links"} <= set(rows.column_names)
