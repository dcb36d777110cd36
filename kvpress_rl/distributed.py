"""Data parallelism under torch.distributed (e.g. `accelerate launch`), and the identity on one process.

Every helper works without an initialised process group: a single process is rank 0 of 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """`(rank, world_size)` under torch.distributed, else `(0, 1)`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0: the process that writes shared files and prints."""
    return world()[0] == 0


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over data-parallel processes, in place (identity on one process). NCCL reduces on the
    current GPU, so a tensor elsewhere goes there and back."""
    _, size = world()
    if size > 1:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        moved = value.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not value:
            value.copy_(moved)
    return value


def all_gather(obj) -> list:
    """`obj` of every process, by rank (`[obj]` on one process)."""
    _, size = world()
    if size == 1:
        return [obj]
    gathered = [None] * size
    dist.all_gather_object(gathered, obj)
    return gathered


def failed_in_collective(err: BaseException) -> bool:
    """Whether `err` (or what caused it) came out of torch.distributed: on a process whose peer failed, gloo
    raises from the collective it waits in ("Connection closed by peer") and NCCL times out. Such an error
    is the symptom on a survivor, not the cause."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, dist.DistError):
            return True
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("torch.distributed"):
            return True
        err = err.__cause__ or err.__context__
    return False


def rng_state() -> dict:
    """This process's torch RNG states: the CPU one and, where CUDA is available, every GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
