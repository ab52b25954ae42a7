"""Instance trainings side by side on one machine, never more than the budget holds.

Each instance partition is its own run (a backfill from the UI, the chain and OOM sensors'
runs, ``materialize_pipeline(parallel_instances=True)``), so a run-scoped limit — the
multiprocess executor's ``max_concurrent`` / ``tag_concurrency_limits``, which count steps
*within* one run — can never see two instance trainings at once. The limit that spans runs is Dagster's
instance-level pool limit: ``instance_model`` declares the pool ``memory_heavy`` and, with
``concurrency.pools.granularity: op`` (dagster.yaml), every executor claims a slot of that
pool before it starts the step and waits while none is free. Setting the pool's limit to
``floor(budget / largest predicted instance peak)`` (core/memory/concurrency.py) therefore bounds the
sum of the planned peaks of the trainings running at once by the budget, whichever process
launched them.

The limit is derived from instance peaks only, while the pool is shared with
holdout_evaluation and shap_summary, which may each plan up to the whole budget. So the
plan-derived limit is applied for the duration of the instance phase and the previous
limit (dagster.yaml's default of 1) is restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import dagster as dg

from memopt_pipeline.assets.memory_heavy import MEMORY_POOL
from memopt_pipeline.core.memory.concurrency import InstanceConcurrency, instance_concurrency
from memopt_pipeline.core.memory.planner import MemoryPlan


def instance_rows(instance_assignment: dict) -> dict[str, int]:
    """Partition key -> rows of that instance, from a materialized ``instance_assignment``."""
    instances = instance_assignment.get("instances")
    if not instances:
        raise ValueError("instance_assignment has no instances; re-materialize instance_assignment")
    return {key: int(value["rows"]) for key, value in instances.items()}


def concurrency_from_assets(memory_plan: dict, instance_assignment: dict) -> InstanceConcurrency:
    """How many instance trainings may run at once, from the materialized plan and assignment."""
    return instance_concurrency(MemoryPlan.from_dict(memory_plan), instance_rows(instance_assignment))


@contextlib.contextmanager
def memory_pool_limit(
    instance: dg.DagsterInstance, limit: int, log: Callable[[str], None] = lambda message: None
) -> Iterator[int]:
    """Set the ``memory_heavy`` pool's slots to ``limit`` for the block, then restore the old limit.

    Fails at once when the instance cannot enforce it: pools need an event log storage with
    concurrency tables, and run granularity enforces pools only when the run queue dequeues
    runs (not for runs executed directly, as these are).
    """
    if limit < 1:
        raise ValueError(f"a pool limit must be at least 1, got {limit}")
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        raise RuntimeError(
            f"this Dagster instance's event log storage ({type(storage).__name__}) does not support pool "
            "limits, so instance trainings could not be kept within the memory budget; run `dagster instance "
            "migrate` or train the instances one after another"
        )
    granularity = instance.get_concurrency_config().pool_config.pool_granularity
    if granularity is not None and granularity.value == "run":
        raise RuntimeError(
            "dagster.yaml sets concurrency.pools.granularity to 'run', which only holds queued runs back; runs "
            "launched directly would not wait for the memory_heavy pool. Set it to 'op' (as the project's "
            "dagster.yaml does) or train the instances one after another"
        )
    previous = {pool.name: pool for pool in storage.get_pool_limits()}.get(MEMORY_POOL)
    storage.set_concurrency_slots(MEMORY_POOL, limit)
    log(f"memopt: pool {MEMORY_POOL!r} limited to {limit} step(s) at once for the instance trainings")
    try:
        yield limit
    finally:
        if previous is None or previous.from_default:
            # No explicit limit before: remove ours so the instance's default_limit applies again.
            storage.delete_concurrency_limit(MEMORY_POOL)
        else:
            storage.set_concurrency_slots(MEMORY_POOL, previous.limit)
