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
that matches the pod (core/memory/concurrency.py, :func:`container_memory`).

Runs launched with a run config of their own replace the PartitionedConfig, as Dagster defines,
so the automation that launches ``train_instances`` runs lays the same sizing over its config
(automation/run_config.py, :func:`with_instance_run_config`): this module builds those sensors
with the one function that sizes a partition from the plan (``plan_sized_run_config`` in
:func:`build_k8s_definitions`, which the PartitionedConfig calls too):

- chain_train_instances: every train run of a chain, however the chain started (Launchpad,
  nightly_retrain, dataset_change_sensor), sized when the starting run has succeeded, i.e.
  once the plan those runs train is materialized; the starting runs have no instance_model;
- oom_rematerialization_sensor: a re-run of an instance partition, sized again from the plan.

A sensor added later that launches ``train_instances`` fails the code location's load until it
is built with that function here.

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
from memopt_pipeline.automation.chaining import build_chain_train_instances
from memopt_pipeline.automation.concurrency import instance_rows
from memopt_pipeline.automation.jobs import ALL_JOBS
from memopt_pipeline.automation.sensors import build_oom_rematerialization_sensor
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

    def plan_sized_run_config(partition_key: str, instance: dg.DagsterInstance | None = None) -> dict:
        # The one place a run's instance_model pod is sized: the job's PartitionedConfig (backfills,
        # the Launchpad; the instance is the one the code location sees) and the sensors that bring
        # their own run config (automation.run_config.InstanceRunConfigFn; their context's instance).
        try:
            # Values are found through the instance's latest materializations (immutable checkpoints).
            if instance is None:
                with dg.DagsterInstance.get() as current:
                    plan, assignment = _plan_and_assignment(current)
            else:
                plan, assignment = _plan_and_assignment(instance)
        except Exception as error:  # the values are read from the IO manager's storage
            raise RuntimeError(
                f"cannot size the pod of {INSTANCE_OP} [{partition_key}]: the materialized memory_plan and "
                f"instance_assignment could not be read ({error}); run prepare_instances first and check that "
                "this code location sees the shared output folder ($MEMOPT_OUTPUT_DIR)"
            ) from error
        return instance_run_config(plan, assignment, partition_key, margin)

    def _plan_and_assignment(instance: dg.DagsterInstance) -> tuple[dict, dict]:
        return (
            k8s_defs.load_asset_value("memory_plan", instance=instance),
            k8s_defs.load_asset_value("instance_assignment", instance=instance),
        )

    train_instances = dg.define_asset_job(
        TRAIN_JOB,
        selection=dg.AssetSelection.assets(*INSTANCE_ASSETS),
        config=dg.PartitionedConfig(instance_partitions, run_config_for_partition_key_fn=plan_sized_run_config),
        description="cv_folds and instance_model for one instance partition; the instance_model pod's memory "
        f"request is the plan's predicted peak x {1 + margin:.2f}.",
    )

    def swap(jobs):
        return [train_instances if job.name == TRAIN_JOB else job for job in jobs]

    # The sensors that launch train_instances runs bring their own run config, which replaces the
    # job's PartitionedConfig: they are built again here, targeting this job (a second definition
    # under the same name would be a conflict) and laying the same plan sizing over their config.
    sized_sensors = {
        sensor.name: sensor
        for sensor in (
            build_chain_train_instances(train_instances, plan_sized_run_config),
            build_oom_rematerialization_sensor(swap(ALL_JOBS), plan_sized_run_config),
        )
    }
    sensors = []
    for sensor in local_defs.sensors or []:
        if sensor.name in sized_sensors:
            sensors.append(sized_sensors[sensor.name])
        elif sensor.has_jobs and any(job.name == TRAIN_JOB for job in sensor.jobs):
            raise RuntimeError(
                f"sensor {sensor.name} launches {TRAIN_JOB} runs, whose {INSTANCE_OP} pods would get the default "
                "resources: build it in memopt_pipeline/deploy/k8s.py with plan_sized_run_config, as the chain and "
                "out-of-memory sensors are"
            )
        else:
            sensors.append(sensor)
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
