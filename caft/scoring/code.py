"""Score generated code on HumanEval and MBPP by running each program against the task's tests.

pass@k is the chance that at least one of k sampled completions passes. With n samples per problem
of which c pass, 1 - C(n-c, k) / C(n, k) is an unbiased estimate of it, and the headline metric is
its mean over problems.

Each program runs in its own `python -I -B` process, in a fresh temporary directory that is deleted
afterwards, under these limits:

- wall-clock time: the whole process group is killed after `timeout_s`;
- memory: RLIMIT_AS of `memory_mb`, so a large allocation raises MemoryError in the child;
- CPU time (RLIMIT_CPU) and the size of any file written (RLIMIT_FSIZE);
- environment: only a few variables, with HOME and TMPDIR set to the temporary directory and no
  proxy settings;
- a guard, which is a `sys.addaudithook` hook installed before the program starts. It raises
  PermissionError on socket creation and DNS lookups, and on process creation (fork, exec, spawn,
  `os.system`, `subprocess`). It also raises on `os.kill` to other processes, and on writing,
  creating, deleting, renaming or changing the attributes of any path outside the temporary
  directory. Reading files anywhere is allowed, because imports need it.

This is a guard against accidents by model-written code, such as a test that deletes files or
fetches a URL. It is not a security boundary against a hostile author. Python-level guards can be
bypassed, for example through `ctypes` or by writing to an already open file descriptor. Run
untrusted models inside a container or VM with no network.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .base import ScoreResult, ScoringError

logger = logging.getLogger(__name__)

STATUS_PASSED = "passed"
STATUS_FAILED = "failed"  # a test assertion failed (AssertionError)
STATUS_TIMEOUT = "timeout"  # killed after the wall-clock limit
STATUS_ERROR = "error"  # any other exception, nonzero exit or signal (syntax error, MemoryError, guard)

# Largest file the program may write (RLIMIT_FSIZE), so a runaway program cannot fill the disk.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_REASON_CHARS = 200
# Bytes read from the end of stderr to find the last line.
STDERR_TAIL_BYTES = 4096

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Runs in the child before the program: sets resource limits, installs the audit hook, runs the
# program as __main__. Arguments: program path, memory limit in bytes, CPU limit in seconds,
# max file size in bytes. Limits are set here and not in a `preexec_fn`, because `subprocess`
# documents `preexec_fn` as unsafe when other threads run, and the programs are started from a
# thread pool.
_GUARD_SOURCE = r'''
import os, resource, runpy, sys

_program, _memory_bytes, _cpu_seconds, _file_bytes = sys.argv[1], *map(int, sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_AS, (_memory_bytes, _memory_bytes))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu_seconds, _cpu_seconds))
resource.setrlimit(resource.RLIMIT_FSIZE, (_file_bytes, _file_bytes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

_ROOT = os.path.realpath(os.getcwd())
_ALLOWED_FILES = {os.devnull}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_SPAWN_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
    "subprocess.Popen", "pty.spawn",
}
_NETWORK_EVENTS = {
    "socket.__new__", "socket.socketpair", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto",
}
# Event name -> positions of the (path, dir_fd) arguments that name a path the event changes.
_PATH_EVENTS = {
    "os.remove": [(0, 1)],
    "os.rmdir": [(0, 1)],
    "os.mkdir": [(0, 2)],
    "os.rename": [(0, 2), (1, 3)],
    "os.link": [(1, 3)],
    "os.symlink": [(1, 2)],
    "os.truncate": [(0, None)],
    "os.chmod": [(0, 2)],
    "os.chown": [(0, 3)],
    "os.utime": [(0, 4)],
    "os.chflags": [(0, None)],
    "os.setxattr": [(0, None)],
    "os.removexattr": [(0, None)],
    "shutil.rmtree": [(0, 1)],
}


def _resolve(path, dir_fd):
    if isinstance(path, int):
        return os.path.realpath(f"/proc/self/fd/{path}")
    path = os.fsdecode(path)
    if not os.path.isabs(path):
        # dir_fd is None or negative (AT_FDCWD) for paths relative to the current directory.
        base = os.getcwd() if dir_fd is None or dir_fd < 0 else os.readlink(f"/proc/self/fd/{dir_fd}")
        path = os.path.join(base, path)
    return os.path.realpath(path)


def _check_path(event, path, dir_fd):
    resolved = _resolve(path, dir_fd)
    if resolved in _ALLOWED_FILES or resolved == _ROOT or resolved.startswith(_ROOT + os.sep):
        return
    raise PermissionError(f"caft sandbox: {event} outside the working directory is blocked: {resolved}")


def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        if path is not None and flags & _WRITE_FLAGS:
            _check_path(event, path, None)
    elif event in _PATH_EVENTS:
        for path_index, dir_fd_index in _PATH_EVENTS[event]:
            dir_fd = None if dir_fd_index is None or dir_fd_index >= len(args) else args[dir_fd_index]
            _check_path(event, args[path_index], dir_fd)
    elif event in _SPAWN_EVENTS:
        raise PermissionError(f"caft sandbox: process creation ({event}) is blocked")
    elif event in _NETWORK_EVENTS:
        raise PermissionError(f"caft sandbox: network access ({event}) is blocked")
    elif event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid(), os.getpgid(0)):
        raise PermissionError(f"caft sandbox: {event} to another process is blocked")


sys.addaudithook(_audit)
sys.argv = [_program]
runpy.run_path(_program, run_name="__main__")
'''


def strip_markdown_fence(completion: str) -> str:
    """Return the code inside the first ``` fence of `completion`, or `completion` unchanged.

    An opening fence without a closing one (a reply cut off by the token limit) keeps the rest.
    """
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def build_humaneval_program(reference: dict[str, Any], completion: str) -> str:
    """Assemble the HumanEval test program: prompt + completion + tests + `check(entry_point)`.

    Chat models often repeat the whole function. So when the completion defines `def <entry_point>(`
    at the start of a line, it replaces the prompt's function. The program is then the prompt's text
    before that function, which contains its imports and helper functions, followed by the completion.
    """
    entry_point = reference["entry_point"]
    prompt = reference["prompt"]
    code = strip_markdown_fence(completion)

    definition = re.compile(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    if definition.search(code):
        prompt_definition = definition.search(prompt)
        header = prompt[: prompt_definition.start()] if prompt_definition else ""
        body = header + code
    else:
        body = prompt + code
    return f"{body}\n\n{reference['test']}\n\ncheck({entry_point})\n"


def build_mbpp_program(reference: dict[str, Any], completion: str) -> str:
    """Assemble the MBPP test program: completion + `test_setup_code` + the `test_list` asserts."""
    code = strip_markdown_fence(completion)
    tests = "\n".join(reference["test_list"])
    return f"{code}\n\n{reference.get('test_setup_code') or ''}\n\n{tests}\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Return the unbiased pass@k estimate 1 - C(n-c, k) / C(n, k) for n samples with c passing.

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which avoids the huge binomial coefficients.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def _tail_line(path: Path) -> str:
    """Return the last non-empty line of the file at `path`, truncated to MAX_REASON_CHARS."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - STDERR_TAIL_BYTES))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:MAX_REASON_CHARS] if lines else ""


def run_program(program: str, *, timeout_s: float, memory_mb: int) -> tuple[str, str]:
    """Run `program` in a sandboxed child process and return (status, reason).

    status is "passed", "failed", "timeout" or "error" (see the STATUS_* constants). reason is empty
    when the program passed, else a short text: the last line of stderr or what stopped it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="caft-exec-")).resolve()
    try:
        (workdir / "program.py").write_text(program, encoding="utf-8")
        (workdir / "_caft_guard.py").write_text(_GUARD_SOURCE, encoding="utf-8")
        stderr_path = workdir / "stderr.txt"
        env = {
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "PATH": os.defpath,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            # Keep numerical libraries to one thread each, so parallel workers do not oversubscribe.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        command = [
            sys.executable, "-I", "-B", str(workdir / "_caft_guard.py"), str(workdir / "program.py"),
            str(memory_mb * 1024 * 1024), str(math.ceil(timeout_s) + 1), str(MAX_FILE_BYTES),
        ]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True,
            )
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                # Also stops anything the program left behind in its process group.
                _kill_group(process)

        if returncode is None:
            return STATUS_TIMEOUT, f"timed out after {timeout_s:g} s"
        if returncode == 0:
            return STATUS_PASSED, ""
        reason = _tail_line(stderr_path)
        if returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else -returncode
            return STATUS_ERROR, f"killed by signal {name}" + (f": {reason}" if reason else "")
        if reason.startswith("AssertionError"):
            return STATUS_FAILED, reason
        return STATUS_ERROR, reason or f"exited with code {returncode}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    """Send SIGKILL to the process group of `process` (its own session) and reap the process."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
    process.wait()


def _validate(
    references: Sequence[dict[str, Any]], completions: Sequence[Sequence[str]], fields: tuple[str, ...]
) -> None:
    if len(references) != len(completions):
        raise ScoringError(
            f"got {len(references)} references but {len(completions)} completion lists; "
            "pass one list of completions per reference row"
        )
    if not references:
        raise ScoringError("no references to score; pass at least one reference row")
    for index, (reference, samples) in enumerate(zip(references, completions)):
        if not isinstance(reference, dict) or "id" not in reference:
            raise ScoringError(f"reference row {index} has no 'id'; add the task id as a string under 'id'")
        row_id = reference["id"]
        missing = [name for name in fields if name not in reference]
        if missing:
            raise ScoringError(f"reference {row_id!r} is missing field(s) {missing}; pass the raw task row")
        if isinstance(samples, str) or not samples:
            raise ScoringError(
                f"completions for {row_id!r} must be a non-empty list of strings, got {samples!r:.80}"
            )
        for sample in samples:
            if not isinstance(sample, str):
                raise ScoringError(
                    f"completions for {row_id!r} contain a {type(sample).__name__}, expected str"
                )


def _score_programs(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    build_program: Callable[[dict[str, Any], str], str],
    *,
    k_values: Sequence[int],
    timeout_s: float,
    memory_mb: int,
    workers: int,
) -> ScoreResult:
    """Run every completion's program, then compute pass@k per problem and on average."""
    if workers < 1:
        raise ScoringError(f"workers must be at least 1, got {workers}")
    min_n = min(len(samples) for samples in completions)
    reported_k = sorted({k for k in k_values if 1 <= k <= min_n})
    if not reported_k:
        raise ScoringError(
            f"no k in k_values={tuple(k_values)} is <= {min_n}, the smallest number of completions per "
            "problem; sample more completions or lower k_values"
        )

    jobs = [
        (row, sample, build_program(reference, completion))
        for row, (reference, samples) in enumerate(zip(references, completions))
        for sample, completion in enumerate(samples)
    ]
    logger.info(
        "Running %d programs for %d problems with %d workers (timeout %g s, memory %d MB)",
        len(jobs), len(references), workers, timeout_s, memory_mb,
    )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(
            pool.map(lambda job: run_program(job[2], timeout_s=timeout_s, memory_mb=memory_mb), jobs)
        )

    statuses: list[list[str]] = [[""] * len(samples) for samples in completions]
    reasons: list[list[str]] = [[""] * len(samples) for samples in completions]
    for (row, sample, _), (status, reason) in zip(jobs, outcomes):
        statuses[row][sample] = status
        reasons[row][sample] = reason
    logger.info("Program results: %s", dict(Counter(status for status, _ in outcomes)))

    samples_out = []
    for reference, row_statuses, row_reasons in zip(references, statuses, reasons):
        n = len(row_statuses)
        num_passed = row_statuses.count(STATUS_PASSED)
        sample = {"id": reference["id"], "n": n, "num_passed": num_passed}
        for k in reported_k:
            sample[f"pass@{k}"] = pass_at_k(n, num_passed, k)
        sample["results"] = row_statuses
        sample["reasons"] = row_reasons
        samples_out.append(sample)

    metrics = {
        f"pass@{k}": sum(sample[f"pass@{k}"] for sample in samples_out) / len(samples_out) for k in reported_k
    }
    return ScoreResult(
        metrics=metrics,
        samples=samples_out,
        per_sample_metrics={f"pass@{k}": f"pass@{k}" for k in reported_k},
    )


def score_humaneval(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    k_values: Sequence[int] = (1, 10, 100),
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    train_references: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score HumanEval completions by pass@k for each k in `k_values` that is <= n.

    `references` are HumanEval rows (task_id, prompt, entry_point, test) with an added "id".
    `completions[i]` contains n >= 1 completions of `references[i]["prompt"]`: a function body, or a whole
    function, optionally in a markdown code fence. `timeout_s` (seconds) and `memory_mb` (MiB) limit
    each program. `train_references` is accepted for the shared interface and unused.
    """
    del train_references
    _validate(references, completions, ("prompt", "entry_point", "test"))
    return _score_programs(
        references, completions, build_humaneval_program,
        k_values=k_values, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers,
    )


def score_mbpp(
    references: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    k_values: Sequence[int] = (1, 10, 100),
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    train_references: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score MBPP completions by pass@k for each k in `k_values` that is <= n.

    `references` are MBPP rows (text, test_setup_code, test_list) with an added "id".
    `completions[i]` contains n >= 1 programs for `references[i]`, optionally in a markdown code fence.
    `timeout_s` (seconds) and `memory_mb` (MiB) limit each program. `train_references` is accepted
    for the shared interface and unused.
    """
    del train_references
    _validate(references, completions, ("test_list",))
    return _score_programs(
        references, completions, build_mbpp_program,
        k_values=k_values, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers,
    )
