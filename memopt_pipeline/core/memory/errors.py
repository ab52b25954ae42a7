"""The exceptions that say a stage ran out of memory, and the fix each suggests: the stage stopped
itself (MemoryBudgetExceeded), or a Dask worker training it was ended for memory (DaskWorkerOutOfMemory)."""

from __future__ import annotations

from memopt_pipeline.core.units import GiB

DEFAULT_ADVICE = "raise the memory budget, lower batch_rows / max_bin, or split the data over more instances"


class MemoryBudgetExceeded(RuntimeError):
    """Raised at a cooperative check point when process RSS passes the abort threshold. Retryable.

    ``current_rss_bytes`` is set when the background sampler saw the over-threshold RSS
    between check points and RSS has since dropped; ``rss_bytes`` is then that sampled peak.
    """

    def __init__(
        self,
        stage: str,
        rss_bytes: int,
        budget_bytes: int,
        abort_bytes: int,
        advice: str = "",
        current_rss_bytes: int | None = None,
    ):
        self.stage = stage
        self.rss_bytes = rss_bytes
        self.budget_bytes = budget_bytes
        self.abort_bytes = abort_bytes
        self.advice = advice
        self.current_rss_bytes = current_rss_bytes
        if current_rss_bytes is None:
            observed = f"process RSS reached {rss_bytes / GiB:.2f} GiB"
        else:
            observed = (
                f"process RSS peaked at {rss_bytes / GiB:.2f} GiB between check points "
                f"({current_rss_bytes / GiB:.2f} GiB now)"
            )
        super().__init__(
            f"Stage '{stage}' exceeded its memory budget: {observed}, above the abort threshold of "
            f"{abort_bytes / GiB:.2f} GiB ({abort_bytes / budget_bytes:.0%} of the {budget_bytes / GiB:.2f} GiB "
            f"budget). The stage was stopped at a check point before the OS could kill the process, "
            f"so it can be retried. To fix: {advice or DEFAULT_ADVICE}."
        )

    def __reduce__(self):
        # The constructor takes the fields, not the message: pickle (e.g. across a process
        # pool) must rebuild from the fields.
        fields = (self.stage, self.rss_bytes, self.budget_bytes, self.abort_bytes, self.advice, self.current_rss_bytes)
        return (type(self), fields)


DASK_ADVICE = (
    "split the data over more instances, raise the memory budget (a LocalCluster's workers share the plan's "
    "predicted training peak), or give the cluster's Dask workers more memory"
)


class DaskWorkerOutOfMemory(RuntimeError):
    """A Dask worker training this step's model was ended for memory. Retryable, like MemoryBudgetExceeded.

    With ``rss_bytes``: the worker's nanny terminated it above its share of ``limit_bytes``
    (its ``worker-restart-memory`` event, see :mod:`memopt_pipeline.core.train.dask_cluster`).
    Without: workers died while running ``task`` (distributed's ``KilledWorker``) and no
    nanny kill was recorded; a worker that dies mid-task was most often killed for memory
    (by the kernel, or by a nanny whose event did not arrive), so it is treated the same.
    The message never says SIGKILL: a kill of the *step* is classified elsewhere
    (:func:`memopt_pipeline.core.memory.failures.classify_kill`), and this is not one.
    """

    def __init__(
        self,
        limit_bytes: int | None,
        *,
        worker: str = "",
        rss_bytes: int | None = None,
        kills: int = 1,
        task: str = "",
        advice: str = "",
    ):
        self.limit_bytes = limit_bytes
        self.worker = worker
        self.rss_bytes = rss_bytes
        self.kills = kills
        self.task = task
        self.advice = advice
        limit = f"{limit_bytes / GiB:.2f} GiB" if limit_bytes else "unknown size"
        if rss_bytes is not None:
            where = f"{worker}, " if worker else ""
            more = f"; {kills} such kills during this training" if kills > 1 else ""
            what = (
                f"a Dask worker was killed by its nanny at its memory limit of {limit} "
                f"({where}{rss_bytes / GiB:.2f} GiB resident when it was stopped{more})"
            )
        else:
            what = (
                f"Dask workers died while running task {task or '?'} (KilledWorker) and no nanny kill at a memory "
                f"limit was recorded; a worker that dies mid-task has most often been killed for memory "
                f"(workers' memory limit: {limit})"
            )
        super().__init__(
            f"out of memory: {what}. The worker ran out of memory, not this step's process: the step can be "
            f"retried one memory-ladder level lower. To fix: {advice or DASK_ADVICE}."
        )

    def __reduce__(self):
        # Rebuilt from the fields, not the message (see MemoryBudgetExceeded.__reduce__).
        fields = {name: getattr(self, name) for name in ("worker", "rss_bytes", "kills", "task", "advice")}
        return (_rebuild_dask_worker_out_of_memory, (self.limit_bytes, fields))


def _rebuild_dask_worker_out_of_memory(limit_bytes: int | None, fields: dict) -> DaskWorkerOutOfMemory:
    return DaskWorkerOutOfMemory(limit_bytes, **fields)
