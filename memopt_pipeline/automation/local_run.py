"""Materialize the whole graph from Python, every instance partition included.

Used by `memopt run` and the end-to-end tests. Runs go into the given Dagster instance as
ordinary runs (so the UI shows them): prepare, then one run per instance partition, then
the ensemble and evaluation.

Instance partitions run one after another in this process by default. With
``parallel_instances`` each partition's run executes in a process of its own, and as many
trainings run at once as the budget holds: the plan's predicted peaks set the limit of the
``memory_heavy`` pool for the instance phase (automation/concurrency.py), and Dagster makes
every ``instance_model`` step wait for a slot of that pool.
"""

from __future__ import annotations

import time
from typing import Callable

import dagster as dg

from memopt_pipeline.assets import ALL_ASSETS, FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets.evaluation import holdout_beats_class_prior
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.concurrency import concurrency_from_assets, memory_pool_limit
from memopt_pipeline.automation.partition_runs import collect_metadata, materialize_partitions_in_processes

# Where a fresh worker process finds the asset graph (it cannot be pickled: asset functions).
PIPELINE_ASSETS_REF = "memopt_pipeline.assets:ALL_ASSETS"


def _config_for(run_config: dict, selection) -> dict:
    # Dagster rejects config for ops outside the run's selection; other sections pass through.
    names = {a.key.to_user_string() for a in selection}
    ops = {k: v for k, v in run_config.get("ops", {}).items() if k in names}
    return {**run_config, "ops": ops}


def materialize_pipeline(
    instance: dg.DagsterInstance,
    *,
    resources: dict,
    run_config: dict | None = None,
    log: Callable[[str], None] = print,
    parallel_instances: bool = False,
) -> dict[str, dict]:
    """Run the graph; return {"asset" or "asset [partition]": materialization metadata values,
    "check <name>": {"passed": bool}}.

    ``parallel_instances``: train instance partitions side by side, each run in its own process,
    at most as many at once as the budget holds (the module docstring says how); ``resources``
    must then be ConfigurableResources (rebuilt in each process from their field values)."""
    run_config = run_config or {}
    collected: dict[str, dict] = {}

    def materialize(selection, partition_key: str | None = None, checks=()) -> dg.ExecuteInProcessResult:
        started = time.monotonic()
        label = f"[{partition_key}] " if partition_key else ""
        log(f"memopt: {label}materializing {', '.join(a.key.to_user_string() for a in selection)}")
        result = dg.materialize(
            [*ALL_ASSETS, *checks],
            selection=selection,
            instance=instance,
            resources=resources,
            run_config=_config_for(run_config, selection),
            partition_key=partition_key,
        )
        collected.update(collect_metadata(result))
        log(f"memopt: {label}done in {time.monotonic() - started:.1f} s (run {result.run_id})")
        return result

    prepared = materialize(PREPARE_ASSETS)
    partitions = instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
    if parallel_instances:
        concurrency = concurrency_from_assets(
            prepared.output_for_node("memory_plan"), prepared.output_for_node("instance_assignment")
        )
        log(f"memopt: {concurrency.describe()}")
        with memory_pool_limit(instance, concurrency.limit, log):
            collected.update(
                materialize_partitions_in_processes(
                    instance,
                    assets_ref=PIPELINE_ASSETS_REF,
                    selection=[a.key.to_user_string() for a in INSTANCE_ASSETS],
                    partition_keys=list(partitions),
                    resources=resources,
                    run_config=_config_for(run_config, INSTANCE_ASSETS),
                    # Runs waiting for a slot would each hold a process baseline outside every
                    # plan, so no more processes than trainings that may run at once.
                    processes=min(concurrency.limit, len(partitions)),
                    log=log,
                )
            )
    else:
        for partition in partitions:
            materialize(INSTANCE_ASSETS, partition_key=partition)
    materialize(FINALIZE_ASSETS, checks=[holdout_beats_class_prior])
    return collected
