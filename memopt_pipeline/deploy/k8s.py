"""Kubernetes deployment: every step in its own pod; each instance_model pod sized from the plan.

Load it as the code location (``dagster api grpc -m memopt_pipeline.deploy.k8s`` in the user
code image, or ``-m memopt_pipeline.deploy.k8s`` in the Helm chart's ``dagsterApiGrpcArgs``)
with ``dagster.k8s.yaml`` as the instance config (K8sRunLauncher, Postgres storage).

Why run config and not op tags: a ``dagster-k8s/config`` op tag is fixed when the code loads,
and the executor's ``step_k8s_config`` applies to every step; the memory one instance needs is
known only once ``memory_plan`` and ``instance_assignment`` are materialized, and differs per
instance. So the ``train_instances`` job has a PartitionedConfig: when a run is launched for
instance partition k (a backfill, the Launchpad), its run config is built from the latest
materialized plan — the k8s executor's ``per_step_k8s_config`` for the ``instance_model`` op
(memory request = predicted peak x (1 + margin), a limit above it) and the MemoryGuard budget
that matches the pod (core/memory/concurrency.py, :func:`container_memory`). Runs launched with a run
config of their own (the chain sensors) replace the PartitionedConfig, as Dagster defines;
they can merge :func:`instance_run_config` into theirs.

The margin is ``$MEMOPT_K8S_MEMORY_MARGIN`` (default 0.25). Every pod must see the same
output folder (``$MEMOPT_OUTPUT_DIR`` on a shared volume, see dagster.k8s.yaml): steps pass
JSON asset values and model files through it.
"""

from __future__ import annotations

import os

import dagster as dg
from dagster_k8s import k8s_job_executor

from memopt_pipeline.assets import INSTANCE_ASSETS
from memopt_pipeline.assets.partitions import instance_partitions
from memopt_pipeline.automation.concurrency import instance_rows
from memopt_pipeline.core.memory.concurrency import container_memory, predicted_instance_peak
from memopt_pipeline.core.memory.planner import MemoryPlan
from memopt_pipeline.core.units import GiB
from memopt_pipeline.definitions import defs as local_defs
from memopt_pipeline.resources import MemoryGuard

MEMORY_MARGIN_ENV = "MEMOPT_K8S_MEMORY_MARGIN"
DEFAULT_MEMORY_MARGIN = 0.25
INSTANCE_OP = "instance_model"
TRAIN_JOB = "train_instances"


def memory_margin_from_env() -> float:
    raw = os.environ.get(MEMORY_MARGIN_ENV)
    if raw is None or raw == "":
        return DEFAULT_MEMORY_MARGIN
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"${MEMORY_MARGIN_ENV} must be a number such as 0.25 (25% above the predicted peak), got {raw!r}") from None


def instance_run_config(memory_plan: dict, instance_assignment: dict, partition_key: str, margin: float) -> dict:
    """Run config of one instance partition's run on the k8s executor, from the materialized plan.

    The ``instance_model`` pod requests the instance's predicted training peak plus ``margin``
    and is limited a little higher; the step's MemoryGuard budget is the request, so the
    guard's clean stop (at 90% of it) and hard cap fire inside the pod's limit. Memory
    quantities are plain byte counts, which Kubernetes accepts as they are.
    """
    rows = instance_rows(instance_assignment)
    if partition_key not in rows:
        raise ValueError(
            f"instance partition {partition_key!r} is not in the materialized instance_assignment "
            f"({', '.join(sorted(rows))}); re-materialize instance_assignment"
        )
    memory = container_memory(predicted_instance_peak(MemoryPlan.from_dict(memory_plan), rows[partition_key]), margin)
    return {
        "execution": {
            "config": {
                "per_step_k8s_config": {
                    INSTANCE_OP: {
                        "container_config": {
                            "resources": {
                                "requests": {"memory": str(memory.request)},
                                "limits": {"memory": str(memory.limit)},
                            }
                        }
                    }
                }
            }
        },
        "resources": {"memory_guard": {"config": {"budget_gb": memory.guard_budget / GiB}}},
    }


def _without_budget(resources: dict) -> dict:
    # The project's guard is built with the budget of the process that loads the code (for the
    # Launchpad, definitions.build_resources): here that is the code server's pod, not the step's.
    # Without it, a step's guard takes budget_fraction of its own pod's memory.
    return {**resources, "memory_guard": MemoryGuard()}


def build_k8s_definitions(margin: float | None = None, resources: dict | None = None) -> dg.Definitions:
    """The project's Definitions with the k8s executor and a plan-sized train_instances job.

    ``resources`` (default: the project's, output folder from ``$MEMOPT_OUTPUT_DIR``) also
    decide where the materialized plan is read from."""
    margin = memory_margin_from_env() if margin is None else margin
    container_memory(1, margin)  # validate the margin now, not at the first launch

    def run_config_for_instance(partition_key: str) -> dict:
        try:
            # Values are found through the instance's latest materializations (immutable checkpoints).
            with dg.DagsterInstance.get() as instance:
                plan = k8s_defs.load_asset_value("memory_plan", instance=instance)
                assignment = k8s_defs.load_asset_value("instance_assignment", instance=instance)
        except Exception as error:  # the values are read from the IO manager's storage
            raise RuntimeError(
                f"cannot size the pod of {INSTANCE_OP} [{partition_key}]: the materialized memory_plan and "
                f"instance_assignment could not be read ({error}); run prepare_instances first and check that "
                "this code location sees the shared output folder ($MEMOPT_OUTPUT_DIR)"
            ) from error
        return instance_run_config(plan, assignment, partition_key, margin)

    train_instances = dg.define_asset_job(
        TRAIN_JOB,
        selection=dg.AssetSelection.assets(*INSTANCE_ASSETS),
        config=dg.PartitionedConfig(instance_partitions, run_config_for_partition_key_fn=run_config_for_instance),
        description="cv_folds and instance_model for one instance partition; the instance_model pod's memory "
        f"request is the plan's predicted peak x {1 + margin:.2f}.",
    )

    def swap(jobs):
        return [train_instances if job.name == TRAIN_JOB else job for job in jobs]

    # Sensors and schedules that launch train_instances must target this job: a second
    # definition under the same name would be a conflict.
    sensors = [
        sensor.with_attributes(jobs=swap(sensor.jobs))
        if sensor.has_jobs and any(job.name == TRAIN_JOB for job in sensor.jobs)
        else sensor
        for sensor in local_defs.sensors or []
    ]
    schedules = [
        schedule.with_updated_job(train_instances) if schedule.job_name == TRAIN_JOB else schedule
        for schedule in local_defs.schedules or []
    ]
    k8s_defs = dg.Definitions(
        assets=local_defs.assets,
        asset_checks=local_defs.asset_checks,
        jobs=swap(local_defs.jobs or []),
        schedules=schedules,
        sensors=sensors,
        resources=_without_budget(local_defs.resources) if resources is None else resources,
        executor=k8s_job_executor,
    )
    return k8s_defs


defs = build_k8s_definitions()
