"""Data-parallel runs of `kvrl select` and `kvrl eval`: relaunch under `accelerate launch`, join the
process group, and bring a rank's input error back to the launching process as one line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from kvpress_rl.errors import KvrlError

RANK_ERRORS_ENV = "KVRL_RANK_ERRORS"


def distributed_rank() -> tuple[int, int]:
    """`(rank, world_size)` from the launcher's environment (`(0, 1)` outside `accelerate launch`)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_num_processes(num_processes: int) -> tuple[int, int]:
    """Refuse a bad `--num-processes`; returns this process's `(rank, world_size)`."""
    if num_processes < 1:
        raise KvrlError(f"--num-processes must be >= 1, got {num_processes}")
    rank, world_size = distributed_rank()
    if num_processes > 1 and world_size > 1:
        raise KvrlError("--num-processes cannot be used inside `accelerate launch` (it launches the processes itself)")
    return rank, world_size


def join_process_group(device: str) -> str:
    """Join torch.distributed under `accelerate launch` (WORLD_SIZE > 1); returns this process's device.

    On GPUs each process takes `cuda:LOCAL_RANK`, and the group has a gloo backend for CPU tensors next to
    NCCL for CUDA ones (the learner all-reduces its gate gradients on the GPU and r_bar on the CPU).
    """
    if distributed_rank()[1] <= 1:
        return device
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if on_gpu else "gloo")
    return device


def launch_data_parallel(num_processes: int) -> None:
    """Run this same `kvrl` command (select or eval) under `accelerate launch`; show a rank's error once."""
    with tempfile.TemporaryDirectory(prefix="kvrl-ranks-") as folder:
        os.environ[RANK_ERRORS_ENV] = folder
        try:
            relaunch_data_parallel(num_processes)
            code = 0
        except SystemExit as done:
            code = done.code
        finally:
            os.environ.pop(RANK_ERRORS_ENV, None)
        reports = sorted(Path(folder).glob("rank-*"), key=lambda path: int(path.name.split("-")[1]))
        if reports:
            raise KvrlError(reports[0].read_text())
    raise SystemExit(code)


def report_rank_error(err: KvrlError) -> None:
    """A KvrlError on one rank of a data-parallel run: left for the launching process, or shown by rank 0."""
    rank, _ = distributed_rank()
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder and Path(folder).is_dir():
        (Path(folder) / f"rank-{rank}").write_text(str(err))
        return
    if rank == 0:
        raise err
    raise SystemExit(2)


def relaunch_data_parallel(num_processes: int) -> None:
    """Run this same `kvrl` command under `accelerate launch` with N processes (lm-eval's data-parallel path:
    each process loads the model, takes its share of every cell's requests; rank 0 writes the results)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    # `--multi_gpu` is accelerate's torchrun path; on a machine without GPUs it runs CPU processes (gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kvpress_rl.cli.main", *args]
    raise SystemExit(subprocess.call(command))
