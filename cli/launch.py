"""Data-parallel runs of `kvrl select` and `kvrl eval`: relaunch under `accelerate launch`, join the
process group, and end the whole run with one line when a rank fails.

The launching process writes the command's request (a frozen dataclass, as JSON) into a folder and starts every
rank on it (`python -m kvpress_rl.cli.rank FILE`); each rank rebuilds the request and runs it inside
`rank_process`.

The launching process names a folder (`RANK_ERRORS_ENV`) where every rank records its process id and,
when it fails, a report: a `KvrlError` through `report_rank_error`, any other uncaught error through the
hook `watch_rank` installs on a rank (its traceback written beside the report). A rank that
reported exits 0, so that torchrun prints no failure report of its own. The launching process watches
the folder: at the first report it stops every rank, since the others would otherwise wait in a
collective until its time-out (NCCL 10 minutes, gloo 30; or forever in `init_process_group` when the
failing rank never joined), and shows the report as one line. A rank whose collective failed because
another process left reports that as a symptom (`.peer`): the failing rank's own report wins.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kvpress_rl.distributed import failed_in_collective
from kvpress_rl.errors import KvrlError

RANK_ERRORS_ENV = "KVRL_RANK_ERRORS"
ERROR, PEER, TRACEBACK, PID = ".error", ".peer", ".traceback", ".pid"  # file suffixes in that folder, after `rank-N`
POLL_S = 0.1  # how often the launching process looks for a report
PEER_GRACE_S = 5.0  # how long a symptom (`.peer`) waits for the failing rank's own report before every rank is stopped
MESSAGE_CHARS = 300  # of an unexpected error's message in the one line (its traceback is kept in full)
REQUEST_FILE = "request.json"  # in that folder: what every rank runs
RANK_MODULE = "kvpress_rl.cli.rank"


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


@contextmanager
def rank_process() -> Iterator[None]:
    """Around one process of a command: the only one, or a rank of a data-parallel run, whose `KvrlError` is left for
    the launching process (`report_rank_error`) and which leaves the process group when it ends."""
    if distributed_rank()[1] <= 1:
        yield
        return
    try:
        yield
    except KvrlError as err:
        report_rank_error(err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- the request every rank runs ------------------------------------------------------------------
def encode_request(request: Any) -> str:
    """A command's request as JSON: its class name and its fields (strings, numbers, booleans, None, tuples)."""
    return json.dumps({"kind": type(request).__name__, "fields": dataclasses.asdict(request)})


def decode_request(text: str, kinds: Mapping[str, type]) -> Any:
    """The request `encode_request` wrote, rebuilt as one of `kinds` (by class name); JSON lists become tuples."""
    data = json.loads(text)
    fields = {name: tuple(value) if isinstance(value, list) else value for name, value in data["fields"].items()}
    return kinds[data["kind"]](**fields)


# --- the launching process ------------------------------------------------------------------------
def launch_data_parallel(num_processes: int, request: Any) -> None:
    """Run `request` (of `kvrl select` or `kvrl eval`) on `num_processes` ranks under `accelerate launch`; a rank's
    failure stops every rank and comes back as one line (`KvrlError`)."""
    folder = Path(tempfile.mkdtemp(prefix="kvrl-ranks-"))
    write_report_file(folder / REQUEST_FILE, encode_request(request))
    os.environ[RANK_ERRORS_ENV] = str(folder)
    try:
        code = run_ranks(rank_command(num_processes, folder / REQUEST_FILE), folder)
    finally:
        os.environ.pop(RANK_ERRORS_ENV, None)
    report = first_report(folder)
    if any(folder.glob(f"rank-*{TRACEBACK}")):  # kept: the one line names it
        for path in [*folder.glob(f"rank-*{PID}"), folder / REQUEST_FILE]:
            path.unlink(missing_ok=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    if report:
        raise KvrlError(report)
    if code:
        raise KvrlError(f"a process of the {num_processes}-process run failed without a report "
                        f"(accelerate launch exited with {code}); its output is above")
    raise SystemExit(0)


def rank_command(num_processes: int, request_file: Path) -> list[str]:
    """`accelerate launch` of N ranks, each running the request in `request_file` (lm-eval's data-parallel path for
    `kvrl eval`: each process loads the model, takes its share of every cell's requests; rank 0 writes the results)."""
    # `--multi_gpu` is accelerate's torchrun path; on a machine without GPUs it runs CPU processes (gloo)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", RANK_MODULE, str(request_file)]


def run_ranks(command: list[str], folder: Path) -> int:
    """Run the launcher (torchrun, in the `accelerate launch` process); stop it and every rank once a rank has
    reported a failure. Returns the launcher's exit code."""
    launcher = subprocess.Popen(command)
    try:
        while launcher.poll() is None:
            if failure_reported(folder, time.time()):
                stop_ranks(launcher, folder)
                break
            time.sleep(POLL_S)
    except BaseException:  # Ctrl-C: no rank outlives the command
        stop_ranks(launcher, folder)
        raise
    return launcher.wait()


def failure_reported(folder: Path, now: float) -> bool:
    """A rank's own report, or a symptom that waited `PEER_GRACE_S` for one."""
    if any(folder.glob(f"rank-*{ERROR}")):
        return True
    symptoms = [path.stat().st_mtime for path in folder.glob(f"rank-*{PEER}")]
    return bool(symptoms) and now - min(symptoms) > PEER_GRACE_S


def stop_ranks(launcher: subprocess.Popen, folder: Path) -> None:
    """Kill the launcher and every rank. The launcher is paused first: it neither reports the ranks' deaths
    nor reaps them, so their process ids stay theirs until it is killed. torchrun starts each rank in its
    own session: killing the rank's process group also ends what the rank started."""
    if launcher.poll() is not None:
        return  # torchrun ended, and ended its ranks with it
    launcher.send_signal(signal.SIGSTOP)
    for path in folder.glob(f"rank-*{PID}"):
        try:
            pid = int(path.read_text())
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError):
            pass  # gone already
    launcher.kill()
    launcher.wait()


def first_report(folder: Path) -> str | None:
    """The earliest rank's own report, else the earliest symptom."""
    for suffix in (ERROR, PEER):
        reports = sorted(folder.glob(f"rank-*{suffix}"), key=lambda path: (path.stat().st_mtime_ns, path.name))
        if reports:
            return reports[0].read_text()
    return None


# --- a rank -----------------------------------------------------------------------------------------
def rank_errors_folder() -> Path | None:
    """The folder the launching process watches (None outside `launch_data_parallel`)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    return Path(folder) if folder and Path(folder).is_dir() else None


def watch_rank() -> None:
    """On a rank that `launch_data_parallel` started: record this rank's process id for the launching process,
    and send it any uncaught error (`sys.excepthook`). Elsewhere nothing."""
    folder = rank_errors_folder()
    rank, world_size = distributed_rank()
    if folder is None or world_size <= 1:
        return
    write_report_file(folder / f"rank-{rank}{PID}", str(os.getpid()))
    sys.excepthook = report_uncaught


def report_rank_error(err: KvrlError) -> None:
    """A KvrlError on one rank of a data-parallel run: left for the launching process, or shown by rank 0."""
    rank, size = distributed_rank()
    folder = rank_errors_folder()
    if folder is not None:
        report(folder, rank, f"rank {rank} of {size}: {err}", symptom=failed_in_collective(err))
        return
    if rank == 0:
        raise err
    raise SystemExit(2)


def report_uncaught(kind: type[BaseException], err: BaseException, tb) -> None:
    """`sys.excepthook` of a watched rank: the traceback to a file, one line to the launching process, exit 0
    (the launching process fails the run)."""
    folder = rank_errors_folder()
    if folder is None or issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, err, tb)
        return
    rank, size = distributed_rank()
    trace = folder / f"rank-{rank}{TRACEBACK}"
    trace.write_text("".join(traceback.format_exception(kind, err, tb)))
    message = " ".join(str(err).split())
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + "..."
    report(folder, rank, f"rank {rank} of {size} failed: {kind.__name__}: {message} (traceback: {trace})",
           symptom=failed_in_collective(err))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def report(folder: Path, rank: int, line: str, *, symptom: bool) -> None:
    write_report_file(folder / f"rank-{rank}{PEER if symptom else ERROR}", line)


def write_report_file(path: Path, text: str) -> None:
    """Written whole or not at all: the launching process may read it at any moment."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)
