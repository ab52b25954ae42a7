"""Materialize the whole graph from Python, every instance partition included.

Used by `memopt run` and the end-to-end tests. Runs go into the given Dagster instance as
ordinary runs (so the UI shows them): prepare, then one run per instance partition, then
the ensemble and evaluation.
"""

from __future__ import annotations

import time
from typing import Callable

import dagster as dg

from memopt_pipeline.assets import ALL_ASSETS, FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets.evaluation import holdout_beats_class_prior
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME


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
) -> dict[str, dict]:
    """Run the graph; return {"asset" or "asset [partition]": materialization metadata values,
    "check <name>": {"passed": bool}}."""
    run_config = run_config or {}
    collected: dict[str, dict] = {}

    def materialize(selection, partition_key: str | None = None, checks=()) -> None:
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
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            key = materialization.asset_key.to_user_string()
            if materialization.partition:
                key += f" [{materialization.partition}]"
            collected[key] = {k: v.value for k, v in materialization.metadata.items()}
        for evaluation in result.get_asset_check_evaluations():
            collected[f"check {evaluation.check_name}"] = {"passed": evaluation.passed}
        log(f"memopt: {label}done in {time.monotonic() - started:.1f} s (run {result.run_id})")

    materialize(PREPARE_ASSETS)
    for partition in instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME):
        materialize(INSTANCE_ASSETS, partition_key=partition)
    materialize(FINALIZE_ASSETS, checks=[holdout_beats_class_prior])
    return collected
