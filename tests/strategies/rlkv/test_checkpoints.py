"""The work folder (`checkpoints.py`): resumes end where an uninterrupted run ends, keep their training set, RNG
states and time; a fresh run starts clean; a damaged checkpoint is one line."""

import json
from dataclasses import replace

import pytest
import torch

from kvpress_rl import KvrlError, SelectionContext
from kvpress_rl.distributed import rng_state
from kvpress_rl.executor.gated import new_gates
from kvpress_rl.strategies.rlkv import RLKV
from kvpress_rl.strategies.rlkv import learner as learner_module
from kvpress_rl.strategies.rlkv.checkpoints import TrainingRun, load_checkpoint, resume, save_checkpoint
from tests.strategies.rlkv.helpers import (
    Interrupted,
    backward_options,
    options,
)


def test_resume_continues_from_the_checkpoint(tiny, data, tmp_path):
    model, tokenizer = tiny
    work = tmp_path / "run"
    # a constant L1 weight: every step has a gradient, so AdamW's moments at the checkpoint shape the next steps
    given = dict(adaptive_penalty=False, beta=0.05)
    full = RLKV(options(data, steps=4, **given)).select(model, tokenizer,
                                                        SelectionContext(seed=3, work_dir=str(work / "a")))
    RLKV(options(data, steps=2, **given)).select(model, tokenizer, SelectionContext(seed=3, work_dir=str(work / "b")))
    # a run interrupted after 2 steps of 4: the checkpoint says step 2; resume runs steps 3 and 4
    state = torch.load(work / "b" / "checkpoint.pt", weights_only=False)
    assert state["optimizer"]["state"]  # the optimizer has stepped before the checkpoint
    state["options"]["steps"] = 4
    torch.save(state, work / "b" / "checkpoint.pt")
    resumed = RLKV(options(data, steps=4, **given)).select(model, tokenizer,
                                                           SelectionContext(seed=3, work_dir=str(work / "b"),
                                                                            resume=True))
    steps = [json.loads(line)["step"] for line in (work / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not torch.all(full.scores == 1.0)  # the gates moved: the comparison below can fail
    assert torch.allclose(resumed.scores, full.scores, rtol=0.0, atol=1e-7)  # the RNG and AdamW's moments restored


def test_a_resumed_run_reads_its_training_set_back_and_ends_with_the_gates_of_an_uninterrupted_one(tiny, data, tmp_path,
                                                                                                   monkeypatch):
    model, tokenizer = tiny

    def distill(model, tokenizer, pool, options, rng, engine=None):  # stands in for self-distillation: a seeded choice
        chosen = list(pool)
        rng.shuffle(chosen)
        return [(p, 10 + i) for i, p in enumerate(chosen[:8])], 0.5

    monkeypatch.setattr(learner_module, "self_distill", distill)
    opts = options(data, steps=5, prompts_per_step=2, self_distillation=True, pool_size=12, train_set_size=8,
                   checkpoint_every=1)
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
        RLKV(replace(opts, steps=6)).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), resume=True))
    resumed = RLKV(opts).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), resume=True))
    assert torch.equal(resumed.scores, full.scores)
    assert resumed.extra["solved_fraction"] == full.extra["solved_fraction"] == 0.5  # kept in the checkpoint
    assert [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    lines = (work / "train_set.jsonl").read_text().splitlines()
    (work / "train_set.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # another order
    with pytest.raises(KvrlError, match="hash mismatch"):
        RLKV(opts).select(model, tokenizer, SelectionContext(seed=5, work_dir=str(work), resume=True))


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
    assert resume(TrainingRun(opts, tmp_path, started=0.0), load_checkpoint(tmp_path, opts), new_gates(model, 1.0),
                  optimizer) == 3
    assert len(restored) == 1 and torch.equal(restored[0][0], torch.tensor([7, 8], dtype=torch.uint8))
    assert rng_state().keys() == {"cpu", "cuda"}


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
        RLKV(options(data, steps=3)).select(model, tokenizer,
                                            SelectionContext(seed=0, work_dir=str(work), on_step=interrupt))
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["elapsed_s"] > 0
    state["elapsed_s"] = 1000.0  # as if the first part had run for 1,000 s
    torch.save(state, work / "checkpoint.pt")
    resumed = RLKV(options(data, steps=3)).select(model, tokenizer,
                                                  SelectionContext(seed=0, work_dir=str(work), resume=True))
    assert 1000.0 < resumed.wall_time_s < 1000.0 + 120
    assert torch.load(work / "checkpoint.pt", weights_only=False)["elapsed_s"] > 1000.0


@pytest.mark.parametrize("damage", [lambda path: path.write_bytes(path.read_bytes()[:200]),
                                    lambda path: torch.save([1, 2], path),
                                    lambda path: path.write_bytes(b"")])
def test_resume_from_a_damaged_checkpoint_says_start_afresh(tiny, data, tmp_path, damage):
    model, tokenizer = tiny
    work = tmp_path / "run"
    RLKV(options(data, steps=1)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work)))
    damage(work / "checkpoint.pt")
    with pytest.raises(KvrlError, match="checkpoint.pt is damaged.*start afresh without --resume"):
        RLKV(options(data, steps=1)).select(model, tokenizer, SelectionContext(seed=0, work_dir=str(work), resume=True))
