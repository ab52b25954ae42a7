"""Runs of partitions, each in a fresh process, several at once.

A Dagster run cannot be started from several threads of one process (run setup
reconfigures logging and deadlocks), and steps of concurrent runs in one process would
share one RSS, one memory guard and one hard cap. So each partition's run gets a process
of its own: the process executes the run's steps in-process, and its memory is that one
run's. This module imports only Dagster, so a worker process pays only for the asset
graph it is given.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import dagster as dg


def collect_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    """{"asset" or "asset [partition]": materialization metadata values, "check <name>": {"passed": bool}}."""
    collected: dict[str, dict] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        key = materialization.asset_key.to_user_string()
        if materialization.partition:
            key += f" [{materialization.partition}]"
        collected[key] = {k: v.value for k, v in materialization.metadata.items()}
    for evaluation in result.get_asset_check_evaluations():
        collected[f"check {evaluation.check_name}"] = {"passed": evaluation.passed}
    return collected


def _resource_specs(resources: dict) -> dict[str, tuple[str, str, dict]]:
    """Resources as (module, class, field values): Dagster's resource objects do not pickle."""
    specs = {}
    for name, resource in resources.items():
        if not isinstance(resource, (dg.ConfigurableResource, dg.ConfigurableIOManager)):
            raise TypeError(
                f"resource {name!r} ({type(resource).__name__}) cannot be sent to a worker process: runs in "
                "separate processes take ConfigurableResource / ConfigurableIOManager objects only"
            )
        specs[name] = (type(resource).__module__, type(resource).__qualname__, resource.model_dump())
    return specs


def _build_resources(specs: dict[str, tuple[str, str, dict]]) -> dict:
    return {
        name: getattr(importlib.import_module(module), qualname)(**fields)
        for name, (module, qualname, fields) in specs.items()
    }


def _materialize_partition_in_process(
    instance_ref, assets_ref: str, selection: list[str], partition_key: str, resource_specs: dict, run_config: dict
) -> tuple[str, bool, dict[str, dict], list[str]]:
    """One partition's run, in a worker process: (run id, success, collected metadata, step errors)."""
    module, _, attribute = assets_ref.partition(":")
    assets = getattr(importlib.import_module(module), attribute)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = dg.materialize(
            assets,
            selection=selection,
            instance=instance,
            resources=_build_resources(resource_specs),
            run_config=run_config,
            partition_key=partition_key,
            raise_on_error=False,  # exceptions may not pickle; the parent reports failures by step
        )
        errors = [
            f"{event.step_key}: {event.step_failure_data.error.message.strip() if event.step_failure_data.error else 'failed'}"
            for event in result.get_step_failure_events()
        ]
        return result.run_id, result.success, collect_metadata(result), errors


def materialize_partitions_in_processes(
    instance: dg.DagsterInstance,
    *,
    assets_ref: str,
    selection: list[str],
    partition_keys: list[str],
    resources: dict,
    run_config: dict,
    processes: int,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """One run per partition, each in a fresh (spawned) process, ``processes`` at a time.

    Each run executes its steps in its own process, so one step's MemoryGuard measures and
    caps that step alone, and the process's baseline is the one the plan measured. Pool
    limits on the instance apply across these runs. ``assets_ref`` is "module:attribute" of
    the asset list; ``resources`` are rebuilt in each process from their classes and field
    values. Every run is waited for; then failures raise one error naming each
    failed partition, its run and step.
    """
    collected: dict[str, dict] = {}
    failures = []
    resource_specs = _resource_specs(resources)
    context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and memory
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        started = time.monotonic()
        futures = {
            key: pool.submit(
                _materialize_partition_in_process, instance.get_ref(), assets_ref, selection, key, resource_specs, run_config
            )
            for key in partition_keys
        }
        for key, future in futures.items():
            run_id, success, values, errors = future.result()
            collected.update(values)
            log(f"memopt: [{key}] {'done' if success else 'FAILED'} after {time.monotonic() - started:.1f} s (run {run_id})")
            if not success:
                failures.append(f"[{key}] run {run_id}: " + "; ".join(errors or ["run failed before any step"]))
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(partition_keys)} partition run(s) failed (the others are materialized):\n"
            + "\n".join(failures)
        )
    return collected
