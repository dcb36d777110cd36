"""RLKV's work folder: the training log, checkpoints and the chosen training set, for `--resume`.

Files (`WORK_FILES`): `train_log.jsonl` (one JSON record per step), `checkpoint.pt` (gates, optimizer,
step, log, options, every process's RNG states, the training set's hash; written through `.tmp`),
`train_set.jsonl` (the problems chosen once, read back on resume instead of distilling again), and the
plots `kvrl` draws from the log. `TrainingRun` is what one training carries besides the gates and the
optimizer; a checkpoint records it and `resume` restores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvpress_rl.distributed import all_gather, is_main_process, rng_state, set_rng_state, world
from kvpress_rl.errors import KvrlError
from kvpress_rl.io import write_atomic
from kvpress_rl.strategies.rlkv.options import RLKVOptions
from kvpress_rl.strategies.rlkv.problems import VERIFIERS, RewardProblem

TRAIN_SET = "train_set.jsonl"  # the chosen training set: a resumed run reads it back
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoint.pt"
WORK_FILES = (TRAIN_LOG, CHECKPOINT, CHECKPOINT + ".tmp", TRAIN_SET, "training.png", "gates.png")


@dataclass
class TrainingRun:
    """One training's state besides the gates and the optimizer, created by `RLKV.select`."""

    options: RLKVOptions  # resolved: a checkpoint made with other options is refused
    work: Path | None  # the work folder (None: no log, no checkpoints)
    started: float  # time.perf_counter() at the start, moved back on resume by the time the run had taken
    train_set_sha256: str = ""  # of `train_set_text`: ties a checkpoint to its training set
    solved_fraction: float | None = None  # of the self-distillation pool (None without self-distillation)
    log: list[dict] = field(default_factory=list)  # every step's record, from step 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def clear_work(work: Path) -> None:
    """Remove what an earlier run left in the work folder, so that a fresh run's log starts at step 1."""
    for name in WORK_FILES:
        try:
            os.unlink(work / name)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise KvrlError(f"cannot remove {work / name} of an earlier run: "
                            f"{err.strerror or type(err).__name__}") from None


def append_log(work: Path, record: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    with (work / TRAIN_LOG).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def train_set_text(chosen: list[tuple[RewardProblem, int | None]]) -> str:
    """The training set as JSON Lines: prompt, answer, source, verifier and the model's solution length
    (tokens; null without self-distillation)."""
    rows = []
    for problem, length in chosen:
        verify = getattr(problem.verify, "__name__", "")
        if VERIFIERS.get(verify) is not problem.verify:
            raise KvrlError(f"training problem {problem.source!r}: its verifier {verify!r} cannot be saved for "
                            "--resume")
        rows.append(json.dumps({"prompt": problem.prompt, "answer": problem.answer, "source": problem.source,
                                "verify": verify, "solution_tokens": length}))
    return "".join(row + "\n" for row in rows)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save_train_set(work: Path, text: str) -> None:
    write_atomic(work / TRAIN_SET, lambda path: path.write_text(text), overwrite=True)


def load_train_set(work: Path, state: dict) -> tuple[list[RewardProblem], str]:
    """The training set the checkpointed run chose, read back from the work folder (checked by hash)."""
    path = work / TRAIN_SET
    if not path.is_file():
        raise KvrlError(f"{path} is missing: the checkpoint's training set cannot be recovered; start afresh")
    text = path.read_text()
    if text_hash(text) != state["train_set_sha256"]:
        raise KvrlError(f"{path} is not the training set of {work / CHECKPOINT} (hash mismatch); start afresh")
    train = []
    for line in text.splitlines():
        row = json.loads(line)
        if row["verify"] not in VERIFIERS:
            raise KvrlError(f"{path}: unknown verifier {row['verify']!r}")
        train.append(RewardProblem(row["prompt"], row["answer"], VERIFIERS[row["verify"]], row["source"]))
    return train, text


def save_checkpoint(run: TrainingRun, gates: torch.Tensor, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write `checkpoint.pt` after `step` steps. Collective: every process calls it (it gathers their RNG
    states); rank 0 writes."""
    rngs = all_gather(rng_state())
    if not is_main_process():
        return
    tmp = run.work / (CHECKPOINT + ".tmp")
    torch.save({"gates": gates.detach().clone(), "optimizer": optimizer.state_dict(), "step": step, "log": run.log,
                "options": asdict(run.options), "rng": rngs, "train_set_sha256": run.train_set_sha256,
                "solved_fraction": run.solved_fraction, "elapsed_s": run.elapsed()}, tmp)
    tmp.replace(run.work / CHECKPOINT)


def load_checkpoint(work: Path, options: RLKVOptions) -> dict | None:
    """The checkpoint to resume from (None: there is none), refused if made with other options or by
    another number of processes."""
    path = work / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False)
    except Exception as err:  # a truncated or overwritten file: torch raises several types
        raise KvrlError(f"{path} is damaged and cannot be read ({type(err).__name__}); start afresh without "
                        "--resume") from None
    required = ("gates", "optimizer", "step", "log", "options")
    if (not isinstance(state, dict) or any(key not in state for key in required)
            or not isinstance(state["options"], dict)):
        raise KvrlError(f"{path} is damaged (not an rlkv checkpoint); start afresh without --resume")
    if state["options"] != asdict(options):
        changed = sorted(k for k, v in asdict(options).items() if state["options"].get(k) != v)
        raise KvrlError(f"{path} was made with other options ({', '.join(changed)}); resume with the same options or "
                        "start afresh")
    _, size = world()
    if not isinstance(state.get("rng"), list) or len(state["rng"]) != size or "train_set_sha256" not in state:
        made = len(state["rng"]) if isinstance(state.get("rng"), list) else "an older version"
        raise KvrlError(f"{path} was made by {made} process(es) or an older version; resume with {size} or start "
                        "afresh")
    return state


def resume(run: TrainingRun, state: dict, gates: torch.Tensor, optimizer: torch.optim.Optimizer) -> int:
    """Restore a checkpoint into `run`, the gates, the optimizer and this process's RNG; rank 0 rewrites the
    log to the checkpoint's steps. Returns the steps already done."""
    rank, _ = world()
    with torch.no_grad():
        gates.copy_(state["gates"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][rank])
    run.solved_fraction = state.get("solved_fraction")
    run.started -= float(state.get("elapsed_s", 0.0))  # wall time counts the run before the resume too
    run.log[:] = state["log"]
    if rank == 0 and run.work is not None:
        lines = [json.dumps(r) for r in state["log"]]
        (run.work / TRAIN_LOG).write_text("\n".join(lines) + ("\n" if lines else ""))
    return state["step"]
