"""Run model-written Python against MBPP's tests, contained.

Each program runs in a fresh `python -I` subprocess (isolated mode: no user site, no PYTHON*
variables), in its own temporary directory (`kvrl-mbpp-<owner pid>-*`), with an empty environment
(only PATH, HOME, TMPDIR and LANG, all pointing at nothing of ours), a wall-clock limit (10 s by
default) and limits on address space (1 GiB), CPU time, file size (16 MiB) and processes set with
`resource` before the program starts.

What holds:
- A pass means the test code ran to its end: a small driver executes the program and, after the
  last assertion, writes a random per-run sentinel (handed over through a pipe, never on disk, in
  argv or in the environment) to a private pipe. Passed = sentinel seen AND exit status 0, so
  `sys.exit(0)`, `os._exit(0)` or an exiting atexit hook before the tests count as failures.
- The program starts in its own session and process group; the whole group is killed (SIGKILL) on
  a time-out and again after a normal exit, so background children do not outlive the run.
  RLIMIT_NPROC caps the number of processes at `PROCESS_LIMIT`; the kernel counts it per real user
  id and does not enforce it for root (or any holder of CAP_SYS_RESOURCE/CAP_SYS_ADMIN), so it only
  holds when the program runs as another user (see next point) or the caller is not root.
- When the caller is root, the program runs as `nobody` (no supplementary groups, no
  capabilities), so the kernel's ptrace access check denies it /proc/<pid>/environ (and mem, maps,
  ...) of the caller, its ancestors and every other root process: secrets in the caller's
  environment cannot be read back. This needs a Python of the caller's minor version that `nobody`
  can run: the caller's interpreter, else a system one (e.g. /usr/bin/python3.11 when the venv's
  base lives under a private /root); only the standard library is available to the program either
  way. It is checked once; when none works the program runs as the caller with a warning (and the
  environment isolation then does not hold).
- At most `OUTPUT_LIMIT_BYTES` of stdout and of stderr are kept (head and tail); the rest is read
  and dropped, so a program that prints gigabytes cannot grow the caller's memory.
- The temporary folder is removed with errors ignored (retried once) after the group is killed, so
  a straggler cannot abort the evaluation; folders left by callers that died are removed at the
  next run.

What remains uncontained: this is containment for honest mistakes (infinite loops, runaway
allocation, forgotten `sys.exit`, stray background processes), not a security boundary against
hostile code. The program has the network (nothing blocks sockets, so it can reach anything the
host can, including cloud metadata endpoints); it can read every file readable by its user
(world-readable files, including any world-readable checkpoint, dataset, `.env` or credential file;
when the caller is not root it runs as the caller and can read everything the caller can, including
the caller's /proc/<pid>/environ, tokens under ~ and the whole repository) and write wherever that
user may (/tmp, /dev/shm, world-writable folders). A process that leaves the process group
(`setsid()`, or a double fork into a new session) escapes the group kill and keeps running (still
as `nobody`, still under the CPU, memory and process limits). Code in the same interpreter as the
driver can, with deliberate effort (frame or gc inspection), find the sentinel, fake a pass, and
can exhaust shared resources (disk in /tmp up to 16 MiB per file, CPU of other cores, `nobody`'s
process quota shared by concurrent runs). Run untrusted models in a container or VM without
network and secrets.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30  # 1 GiB of address space
FILE_SIZE_LIMIT_BYTES = 1 << 24  # 16 MiB per file
PROCESS_LIMIT = 32  # RLIMIT_NPROC: processes (threads) of the sandbox user; not enforced for root
OUTPUT_LIMIT_BYTES = 1 << 16  # stdout and stderr each: at most 64 KiB kept
SANDBOX_USER = "nobody"  # the user programs run as when the caller is root
FOLDER_PREFIX = "kvrl-mbpp-"


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "failed", "timeout", "memory", "no code"
    stdout: str = field(default="", compare=False, repr=False)  # capped, see OUTPUT_LIMIT_BYTES
    stderr: str = field(default="", compare=False, repr=False)


_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def last_python_block(text: str) -> str | None:
    """The last fenced code block of a response, else the text before lm-eval's `[DONE]`, else None."""
    blocks = _BLOCK.findall(text)
    if blocks:
        return blocks[-1]
    if "[DONE]" in text:
        return text.split("[DONE]")[0]
    return text if re.search(r"^\s*def \w+\(", text, re.MULTILINE) else None


# Runs the program as __main__ and, only if it returns, writes the sentinel read from fd argv[1] to
# fd argv[2]. Everything lives in function locals so the program's globals cannot rebind it.
_DRIVER = """
def _kvrl_drive():
    import os, sys
    token_fd, done_fd, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    token = os.read(token_fd, 256)
    os.close(token_fd)
    os.set_inheritable(done_fd, False)
    with open(path, encoding="utf-8") as handle:
        code = compile(handle.read(), path, "exec")
    main = sys.modules["__main__"]
    del main.__dict__["_kvrl_drive"]
    main.__file__ = path
    sys.argv = [path]
    exec(code, main.__dict__)
    os.write(done_fd, token)
    os.close(done_fd)
_kvrl_drive()
"""


def _sandbox_ids() -> tuple[int, int] | None:
    """(uid, gid) to run programs as: `nobody` when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


# in the child, before exec
def _limit_and_drop(memory_bytes: int, cpu_seconds: int, ids: tuple[int, int] | None) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_NPROC, (PROCESS_LIMIT, PROCESS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if ids is not None:
        uid, gid = ids
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from root to non-root: all capabilities are dropped


_PROBE = "import sys, math, re, collections, heapq, itertools, functools; print('{}.{}'.format(*sys.version_info[:2]))"


def _candidates() -> list[str]:
    """Interpreters to try for the sandbox user: ours, then a system one of the same minor version."""
    name = "python{}.{}".format(*sys.version_info[:2])
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", "")]
    found += [shutil.which(name, path="/usr/local/bin:/usr/bin:/bin") or "",
              shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or ""]
    return list(dict.fromkeys(path for path in found if path))


@functools.lru_cache(maxsize=1)
def sandbox() -> tuple[str, tuple[int, int] | None]:
    """(interpreter, (uid, gid)) that programs run with. The ids are None when programs run as the
    caller: the caller is not root, or no interpreter of our minor version is usable by the sandbox
    user (then a warning is given once)."""
    ids = _sandbox_ids()
    if ids is None:
        return sys.executable, None
    for interpreter in _candidates():
        try:
            probe = subprocess.run([interpreter, "-I", "-c", _PROBE], cwd="/", env={"PATH": "/usr/bin:/bin"},
                                   capture_output=True, timeout=30, check=False,
                                   preexec_fn=lambda: _limit_and_drop(MEMORY_LIMIT_BYTES, 30, ids))
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0 and probe.stdout.decode().strip() == "{}.{}".format(*sys.version_info[:2]):
            return interpreter, ids
    warnings.warn(f"no Python {sys.version_info[0]}.{sys.version_info[1]} is usable by user {SANDBOX_USER!r} (is the "
                  "installation readable by others?); model-written code will run as root and can read the caller's "
                  "environment", RuntimeWarning, stacklevel=2)
    return sys.executable, None


def sandbox_user() -> tuple[int, int] | None:
    """The (uid, gid) programs run as, or None when they run as the caller."""
    return sandbox()[1]


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    for _ in range(2):  # a straggler may still be writing: retry once, then leave it
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.05)


def remove_stale_folders(root: str | None = None) -> None:
    """Remove `kvrl-mbpp-<pid>-*` folders whose owner process is gone."""
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = re.fullmatch(re.escape(FOLDER_PREFIX) + r"(\d+)-.+", name)
        if match and int(match.group(1)) != os.getpid() and not _owner_alive(int(match.group(1))):
            _remove(os.path.join(root, name))


class _Capped:
    """Keeps the first and last half of `limit` bytes of a stream and counts what was dropped."""

    def __init__(self, limit: int) -> None:
        self.head, self.tail, self.half, self.dropped = bytearray(), bytearray(), limit // 2, 0

    def add(self, data: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                self.dropped += len(self.tail) - self.half
                del self.tail[:len(self.tail) - self.half]

    def text(self) -> str:
        middle = f"\n[... {self.dropped} bytes dropped ...]\n".encode() if self.dropped else b""
        return bytes(self.head + middle + self.tail).decode("utf-8", "replace")


def _processes_of(uid: int) -> int:
    """Processes (zombies included) whose real user is `uid`, from /proc (0 where there is no /proc)."""
    count = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as handle:
                    uids = next(line for line in handle if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            count += int(uids.split()[1]) == uid
    return count


def _wait_for_reaping(uid: int, timeout_s: float = 5.0) -> None:
    """RLIMIT_NPROC counts every process of the sandbox user, zombies included: wait (a few seconds at most) until the
    killed processes of earlier programs are reaped, so that a correct program is not failed by their leftovers."""
    deadline = time.monotonic() + timeout_s
    while _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid, and so its group id, stay reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(process: subprocess.Popen, time_limit_s: float) -> tuple[bool, _Capped, _Capped]:
    """Read stdout/stderr (capped) until the child exits or the time is up; kill its group; reap it."""
    captured = {process.stdout.fileno(): _Capped(OUTPUT_LIMIT_BYTES),
                process.stderr.fileno(): _Capped(OUTPUT_LIMIT_BYTES)}
    deadline = time.monotonic() + time_limit_s
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in captured:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)

        def drain(wait: float) -> None:
            for key, _ in selector.select(wait):
                try:
                    data = os.read(key.fd, 1 << 20)
                except BlockingIOError:
                    continue
                if data:
                    captured[key.fd].add(data)
                else:
                    selector.unregister(key.fd)

        pause = 0.001
        while not _exited(process.pid):
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if selector.get_map():
                drain(min(left, 0.05))
            else:
                time.sleep(min(left, pause))
                pause = min(pause * 2, 0.05)
        _kill_group(process.pid)  # on time-out, and after a normal exit: leftover background children
        process.wait()
        grace = time.monotonic() + 0.2  # what is still in the pipes; an escaped process may hold them open
        while selector.get_map() and time.monotonic() < grace:
            drain(0.02)
    return timed_out, captured[process.stdout.fileno()], captured[process.stderr.fileno()]


def run_tests(code: str, tests: list[str], setup: str = "", time_limit_s: float = TIME_LIMIT_S,
              memory_bytes: int = MEMORY_LIMIT_BYTES) -> Outcome:
    """Run `setup`, `code` and the assert lines of `tests`; passed only if they all ran to the end and the process
    exits 0."""
    program = "\n".join([setup, code, *tests, ""])
    remove_stale_folders()
    interpreter, ids = sandbox()
    if ids is not None:
        _wait_for_reaping(ids[0])
    work = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    token = secrets.token_hex(32).encode()
    token_read, token_write = os.pipe()
    done_read, done_write = os.pipe()
    try:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(program)
        if ids is not None:
            os.chown(work, *ids)
        os.write(token_write, token)
        os.close(token_write)
        token_write = -1
        environment = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        process = subprocess.Popen(
            [interpreter, "-I", "-c", _DRIVER, str(token_read), str(done_write), path], cwd=work, env=environment,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(token_read, done_write),
            start_new_session=True, preexec_fn=lambda: _limit_and_drop(memory_bytes, int(time_limit_s) + 1, ids))
        os.close(token_read)
        os.close(done_write)
        token_read = done_write = -1
        with process:
            timed_out, stdout, stderr = _collect(process, time_limit_s)
        os.set_blocking(done_read, False)
        try:
            finished = os.read(done_read, 4096) == token
        except BlockingIOError:
            finished = False
    finally:
        for fd in (token_read, token_write, done_read, done_write):
            if fd >= 0:
                os.close(fd)
        _remove(work)
    out, err = stdout.text(), stderr.text()
    if timed_out:
        return Outcome(False, "timeout", out, err)
    if process.returncode == 0 and finished:
        return Outcome(True, "passed", out, err)
    if "MemoryError" in err:
        return Outcome(False, "memory", out, err)
    if process.returncode < 0:  # killed by a signal: CPU limit (SIGXCPU) or the kernel
        return Outcome(False, "timeout" if -process.returncode in (9, 24) else "failed", out, err)
    return Outcome(False, "failed", out, err)


def score_mbpp(response: str, doc: dict) -> Outcome:
    code = last_python_block(response)
    if code is None:
        return Outcome(False, "no code")
    return run_tests(code, list(doc["test_list"]), doc.get("test_setup_code", "") or "")
