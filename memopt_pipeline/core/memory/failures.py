"""Is this failure an out-of-memory failure? One answer for exceptions, error text and exits.

Out-of-memory shows up in many disguises: Python's MemoryError (pyarrow's ArrowMemoryError
is one), our own MemoryBudgetExceeded, C++ ``std::bad_alloc`` surfacing in LightGBM/XGBoost
messages, CUDA allocation failures, Rust's "memory allocation of N bytes failed" abort
(SIGABRT), numpy's "Unable to allocate", a step process killed by the kernel's OOM
killer (signal 9, exit status 137), and a Dask worker ended for memory: our
DaskWorkerOutOfMemory (its nanny killed it at its memory limit) or distributed's
``KilledWorker`` (workers kept dying while running a task, which Dask's own documentation
names memory as the usual cause of). Everything else is not out-of-memory, so it must not be
retried at a lower memory level; an exception a task raised on a Dask worker reaches the
client as that exception, and is judged like any other.
"""

from __future__ import annotations

import re
import signal

from memopt_pipeline.core.memory.errors import DaskWorkerOutOfMemory, MemoryBudgetExceeded
from memopt_pipeline.core.memory.monitor import DEFAULT_CLEANUP_FRACTION
from memopt_pipeline.core.units import GiB

_OOM_TEXT = re.compile(
    r"MemoryError|MemoryBudgetExceeded|ArrowMemoryError|bad_alloc|CUDA out of memory|"
    r"cudaErrorMemoryAllocation|out of memory|Unable to allocate|memory allocation of \d+ bytes failed|"
    r"Cannot allocate memory|DaskWorkerOutOfMemory|KilledWorker",
    re.IGNORECASE,
)
# Dagster's multiprocess executor: "child process for step X unexpectedly exited with code -9";
# shells and container runtimes report a SIGKILL as 137 (128 + 9).
_KILLED_TEXT = re.compile(r"(exited with code|exit code|exit status|returncode)\s*[:=]?\s*(-9|137)\b|SIGKILL|signal 9\b", re.IGNORECASE)
_ABORT_TEXT = re.compile(r"(exited with code|exit code|exit status)\s*[:=]?\s*(-6|134)\b|SIGABRT", re.IGNORECASE)


def is_killed_worker(error: BaseException) -> bool:
    """distributed's ``KilledWorker``, recognised without importing distributed (an optional extra)."""
    cls = type(error)
    return cls.__name__ == "KilledWorker" and cls.__module__.split(".")[0] == "distributed"


def exception_is_out_of_memory(error: BaseException) -> bool:
    """True for MemoryError (ArrowMemoryError included), MemoryBudgetExceeded, a Dask worker ended
    for memory (DaskWorkerOutOfMemory, distributed's KilledWorker), or an error whose message
    (or cause chain) says an allocation failed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (MemoryError, MemoryBudgetExceeded, DaskWorkerOutOfMemory)) or is_killed_worker(error):
            return True
        if _OOM_TEXT.search(f"{type(error).__name__}: {error}"):
            return True
        error = error.__cause__ or error.__context__
    return False


def text_is_out_of_memory(text: str) -> bool:
    """True when failure text (an error message, a class name, a stack, a log tail) shows an OOM.

    A SIGABRT counts only with Rust's "memory allocation of" message, since aborts have
    other causes too.
    """
    if not text:
        return False
    if _OOM_TEXT.search(text) or _KILLED_TEXT.search(text):
        return True
    return bool(_ABORT_TEXT.search(text) and "memory allocation of" in text)


def exit_is_out_of_memory(returncode: int | None, output: str = "") -> bool:
    """A child process's exit: killed by SIGKILL (-9 from subprocess, 137 from a shell), or
    SIGABRT (-6 / 134) with an allocation-failure message in its output."""
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return True
    if returncode in (-signal.SIGABRT, 128 + signal.SIGABRT):
        return "memory allocation of" in output or bool(_OOM_TEXT.search(output))
    return bool(returncode) and text_is_out_of_memory(output)


def text_names_allocation_failure(text: str) -> bool:
    """True when failure text names a failed allocation (not merely a kill)."""
    return bool(text) and bool(_OOM_TEXT.search(text))


def text_is_kill(text: str) -> bool:
    """True when failure text says a process was killed by SIGKILL (exit -9 / 137)."""
    return bool(text) and bool(_KILLED_TEXT.search(text))


# A kill counts as out-of-memory when the step's last RSS sample was at least this share of the
# budget: the guard's cleanup threshold, where only allocation pressure puts a process.
KILL_EVIDENCE_FRACTION = DEFAULT_CLEANUP_FRACTION


def classify_kill(
    heartbeat: dict | None, oom_kills_before: int | None = None, oom_kills_after: int | None = None
) -> tuple[bool, str]:
    """(out of memory?, why) for a step process killed by SIGKILL.

    SIGKILL is what the kernel's OOM killer sends, but also what ``kill -9``, a scheduler's
    grace-period expiry or a node drain send. It counts as out-of-memory only with evidence: the
    cgroup's OOM-kill counter went up while the step ran, or the last RSS sample the step's
    memory guard left in its heartbeat (``StageMonitor``) was near the budget.
    """
    if oom_kills_before is not None and oom_kills_after is not None and oom_kills_after > oom_kills_before:
        return True, f"the kernel's OOM killer fired ({oom_kills_after - oom_kills_before} OOM kill(s) in this cgroup)"
    if heartbeat:
        rss, budget = heartbeat.get("rss_bytes", 0), heartbeat.get("budget_bytes") or 1
        share = rss / budget
        numbers = f"last RSS sample {rss / GiB:.2f} GiB, {share:.0%} of the {budget / GiB:.2f} GiB budget"
        if share >= KILL_EVIDENCE_FRACTION:
            return True, f"out of memory: {numbers}"
        return False, f"killed, not out of memory: {numbers}"
    return False, "killed, not out of memory: no memory evidence (no guard heartbeat, no OOM-kill count)"
