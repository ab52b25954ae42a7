"""The Dask cluster the ``xgboost_dask`` backend trains on, and what a worker's death means.

:func:`dask_client` connects to a scheduler, or, with no address, starts a LocalCluster of
separate **worker processes** for the step. Each local worker has its own memory limit
(:func:`local_worker_memory`: a share of the plan's predicted training peak), enforced by its
nanny with distributed's memory management (``distributed.worker.memory.*``), set explicitly
here: a worker stops taking tasks at 80% of its limit (pause) and its nanny terminates it
above 95% (terminate) and starts a new one. So an over-budget worker is ended by its nanny,
inside the budget the plan gave the training, before the kernel's OOM killer would pick a
victim on the machine. The step process holds no training rows: the workers read them.

A worker ended for memory makes the training fail in one of several ways, depending on
when it died: distributed's ``KilledWorker`` when tasks kept dying (reading partitions,
after ``distributed.scheduler.allowed-failures`` retries on other workers), or an error of
``xgboost.dask`` while training (a missing worker, a task re-run on another worker, a peer
of XGBoost's collective gone). Whatever surfaces, the nanny's ``worker-restart-memory`` event
on the scheduler says why: :func:`worker_memory_failures` turns a failure that happened
after such a kill, or a ``KilledWorker``, into :class:`DaskWorkerOutOfMemory` with the
worker's limit, which the step's MemoryGuard lets through as out of memory (retried one
ladder level lower); any other worker error stays what it was.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from memopt_pipeline.core.memory.errors import DaskWorkerOutOfMemory
from memopt_pipeline.core.memory.failures import is_killed_worker
from memopt_pipeline.core.memory.planner import MemoryPlan
from memopt_pipeline.core.train.threads import resolve_threads
from memopt_pipeline.core.units import GiB

LOOPBACK = "127.0.0.1"
# The scheduler and workers serve HTTP (health, dashboard): keep those on loopback, on free ports.
LOCAL_CLUSTER_HTTP = {"dashboard_address": f"{LOOPBACK}:0", "worker_dashboard_address": f"{LOOPBACK}:0"}
DEFAULT_WORKERS = 2
# distributed's defaults, set explicitly so that a user's Dask configuration cannot turn the
# nanny's kill off (terminate: False) and leave an over-budget worker to the kernel.
PAUSE_FRACTION = 0.80
TERMINATE_FRACTION = 0.95
LOCAL_MEMORY_CONFIG = {
    "distributed.worker.memory.pause": PAUSE_FRACTION,
    "distributed.worker.memory.terminate": TERMINATE_FRACTION,
}
# A worker process (Python, distributed, pandas, XGBoost, the batch reader) idles at a few
# hundred MiB; below this limit it would sit paused at 80% before holding any rows.
MIN_WORKER_MEMORY_BYTES = 1 * GiB
# The event a nanny logs on the scheduler when it terminates its worker for memory.
MEMORY_KILL_TOPIC = "worker-restart-memory"
# How long a failure waits for a nanny's kill event still on its way to the scheduler.
KILL_EVENT_GRACE_S = 1.0


@dataclass
class DaskSession:
    client: "distributed.Client"  # noqa: F821 (imported lazily: distributed is heavy)
    tracker_host: str | None  # where XGBoost's collective tracker listens (None: the scheduler's host)
    description: str
    # Each worker's memory limit when the session started (address -> bytes; None: no limit).
    worker_memory_limits: dict[str, int | None] = field(default_factory=dict)
    # The scheduler's time of the last memory-kill event before this session: later ones are its own.
    kills_after: float = 0.0

    def memory_kills(self) -> list[dict]:
        """The nannies' memory kills since the session started: {"worker", "pid", "rss"} each."""
        try:
            events = self.client.get_events(MEMORY_KILL_TOPIC)
        except Exception:  # the scheduler is gone or unreachable: no evidence either way
            return []
        return [message for stamp, message in events if stamp > self.kills_after and isinstance(message, dict)]

    def limit_of(self, worker: str | None) -> int | None:
        """``worker``'s memory limit, else the largest of the session's workers'."""
        if worker and self.worker_memory_limits.get(worker):
            return self.worker_memory_limits[worker]
        return max((limit for limit in self.worker_memory_limits.values() if limit), default=None)


def local_worker_memory(plan: MemoryPlan, rows: int, n_workers: int) -> int:
    """Memory limit of each of a local cluster's ``n_workers`` workers training ``rows`` rows.

    Derivation: what the plan gives one instance's training is its predicted peak,
    ``plan.training_peak(rows)`` (what ``instance_concurrency`` sets aside per training),
    capped at ``budget * safety`` (the most the plan lets any training hold: the in-memory
    peak of an instance the plan meant for external memory would be above it, and the workers
    must not take more than the machine gave). Of that peak, the baseline (the process's
    imports and allocator) is per process, and everything else (binned rows, per-row state,
    histograms, one batch or bin sample) is the data, which the workers hold between them:
    the step process keeps only its own baseline and what it gathers (out-of-fold
    predictions), the rows being read on the workers. So each worker gets one baseline plus
    an equal share of the data::

        limit = baseline + (min(peak, budget * safety) - baseline) / n_workers

    and ``n_workers * limit`` is the plan's peak plus one baseline per extra process. At
    least ``MIN_WORKER_MEMORY_BYTES``. The plan models one binned copy; XGBoost on Dask also
    keeps each worker's raw float32 partitions while it bins and trains, so an instance near
    the plan's limit can need more: its worker is then killed and the step retried.
    """
    if n_workers < 1:
        raise ValueError(f"a local Dask cluster needs at least one worker, got dask_workers={n_workers}")
    peak = min(plan.training_peak(rows), int(plan.budget_bytes * plan.safety))
    share = plan.baseline_bytes + math.ceil(max(peak - plan.baseline_bytes, 0) / n_workers)
    return max(MIN_WORKER_MEMORY_BYTES, share)


def _import_distributed():
    try:
        import distributed
    except ImportError as error:
        raise ImportError(
            f"the xgboost_dask backend needs Dask ({error}); install it with pip install 'memopt_pipeline[dask]'"
        ) from error
    return distributed


def _session(client, tracker_host: str | None, description: str) -> DaskSession:
    workers = client.scheduler_info().get("workers", {})
    stamps = [stamp for stamp, _ in client.get_events(MEMORY_KILL_TOPIC)]
    return DaskSession(
        client=client,
        tracker_host=tracker_host,
        description=description,
        worker_memory_limits={address: info.get("memory_limit") or None for address, info in workers.items()},
        kills_after=max(stamps, default=0.0),
    )


@contextlib.contextmanager
def dask_client(
    scheduler_address: str,
    *,
    threads: int = 0,
    n_workers: int = DEFAULT_WORKERS,
    worker_memory_bytes: int | None = None,
    log: Callable[[str], None] = lambda message: None,
    timeout: str = "30s",
) -> Iterator[DaskSession]:
    """A client of the cluster at ``scheduler_address``; empty: a LocalCluster for the block.

    The LocalCluster has ``n_workers`` worker processes, each with a nanny, ``threads`` threads
    between them (0 = the CPUs this process may use; at least one each) and a memory limit of
    ``worker_memory_bytes`` each (None: distributed's "auto", the machine's memory shared by
    threads; the pipeline passes :func:`local_worker_memory`). Everything listens on the
    loopback interface. ``timeout`` bounds the wait for a remote scheduler. A failure inside
    the block that a worker's memory kill caused leaves it as :class:`DaskWorkerOutOfMemory`
    (:func:`worker_memory_failures`).
    """
    distributed = _import_distributed()
    if scheduler_address:
        try:
            client = distributed.Client(scheduler_address, timeout=timeout)
        except OSError as error:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {scheduler_address!r} ({error}); check dask_scheduler_address, "
                "or leave it empty to train on a LocalCluster started for the step"
            ) from error
        with client:
            workers = client.scheduler_info().get("workers", {})
            description = f"Dask scheduler {scheduler_address} with {len(workers)} worker(s)"
            log(f"XGBoost on Dask: {description}")
            session = _session(client, None, description)
            with worker_memory_failures(session):
                yield session
        return
    if n_workers < 1:
        raise ValueError(f"a local Dask cluster needs at least one worker, got dask_workers={n_workers}")
    threads_per_worker = max(1, resolve_threads(threads) // n_workers)
    limit = f"{worker_memory_bytes / GiB:.2f} GiB" if worker_memory_bytes else "distributed's automatic share"
    description = (
        f"LocalCluster started for this step ({n_workers} worker processes x {threads_per_worker} thread(s), "
        f"memory limit {limit} each)"
    )
    log(
        f"dask_scheduler_address is empty: starting a LocalCluster for this step: {n_workers} worker processes x "
        f"{threads_per_worker} thread(s), each with a memory limit of {limit} (its nanny pauses it at "
        f"{PAUSE_FRACTION:.0%} and terminates it above {TERMINATE_FRACTION:.0%}; the step then fails as out of "
        "memory and is retried one ladder level lower). Set dask_scheduler_address to train on a cluster"
    )
    import dask

    # The nannies (in this process) and the worker processes (given the nanny's copy of the
    # configuration) read the memory settings when they start.
    with dask.config.set(LOCAL_MEMORY_CONFIG):
        cluster = distributed.LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True, host=LOOPBACK,
            memory_limit=worker_memory_bytes if worker_memory_bytes else "auto", **LOCAL_CLUSTER_HTTP,
        )  # fmt: skip
    with cluster, distributed.Client(cluster) as client:
        session = _session(client, LOOPBACK, description)
        with worker_memory_failures(session):
            yield session


@contextlib.contextmanager
def worker_memory_failures(session: DaskSession) -> Iterator[None]:
    """Re-raise a failure that a worker's memory kill caused as :class:`DaskWorkerOutOfMemory`.

    Out of memory: the failure came after a nanny killed a worker for memory during the
    session (whatever exception ``xgboost.dask`` or Dask raised for the lost worker), or it is
    a ``KilledWorker`` (workers kept dying running one task). Anything else is re-raised as it is.
    """
    try:
        yield
    except DaskWorkerOutOfMemory:
        raise
    except Exception as error:
        memory_error = memory_failure(session, error)
        if memory_error is None:
            raise
        raise memory_error from error


def _killed_worker(error: BaseException | None):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if is_killed_worker(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def memory_failure(
    session: DaskSession, error: BaseException, grace_s: float = KILL_EVENT_GRACE_S
) -> DaskWorkerOutOfMemory | None:
    """The out-of-memory error ``error`` stands for, or None when no worker was ended for memory.

    A nanny logs its kill event just before it terminates the worker, so the event is usually
    on the scheduler before the failure reaches this process; the check waits up to
    ``grace_s`` for it (a failure without any kill costs that wait once).
    """
    deadline = time.monotonic() + grace_s
    kills = session.memory_kills()
    while not kills and time.monotonic() < deadline:
        time.sleep(0.1)
        kills = session.memory_kills()
    if kills:
        last = kills[-1]
        worker = str(last.get("worker") or "")
        rss = int(last.get("rss") or 0)
        return DaskWorkerOutOfMemory(session.limit_of(worker), worker=worker, rss_bytes=rss, kills=len(kills))
    killed = _killed_worker(error)
    if killed is not None:
        return DaskWorkerOutOfMemory(session.limit_of(None), task=str(getattr(killed, "task", "")))
    return None
