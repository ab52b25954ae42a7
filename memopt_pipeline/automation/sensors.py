"""Out-of-memory recovery: re-run exactly what failed, one memory ladder level lower.

When a run fails, this sensor reads its step failures. If a failure is out-of-memory
(MemoryError, MemoryBudgetExceeded, bad_alloc, CUDA OOM, an allocation abort, a step process
killed with -9/137 when its guard's heartbeat shows memory near the budget), it requests a run of the same job for the same partition, selecting
only the assets whose steps failed or were skipped because of the failure, tagged with the
next ladder level and the original run. Steps that succeeded are not re-run; failures that
are not out-of-memory are left alone.

The re-run keeps the failed run's settings: the config of the re-run ops and the
resources/execution/loggers sections, and its own tags (so a chained run stays in its
chain). A run that Dagster's own run retry (dagster.yaml ``run_retries``) will resume is
left to it, so the same work never runs twice. On Kubernetes a re-run of an instance partition
also gets its instance_model pod sized from the plan, with the matching memory budget, as the
chain's train runs do.
"""

import json

import dagster as dg

from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.automation.jobs import ALL_JOBS, train_instances_job
from memopt_pipeline.automation.run_config import (
    ChainConfigError,
    InstanceRunConfigFn,
    run_config_for,
    with_instance_run_config,
)
from memopt_pipeline.core.memory.failures import (
    classify_kill,
    text_is_kill,
    text_is_out_of_memory,
    text_names_allocation_failure,
)
from memopt_pipeline.core.memory.ladder import LADDER_TAG, ladder_level, next_level_after_failure
from memopt_pipeline.resources.memory_guard import heartbeat_path

RETRY_OF_TAG = "memopt/oom_retry_of"
# One step per asset, named after it; asset-check steps re-run with their asset.
_ASSET_STEPS = {asset.key.to_user_string() for asset in ALL_ASSETS}


def _is_out_of_memory(instance: dg.DagsterInstance, run_id: str, step_key: str, text: str) -> bool:
    """Out-of-memory text, or a SIGKILL with evidence (the step's heartbeat near the budget): a
    SIGKILL alone is also what `kill -9`, a node drain or a scheduler's grace period send."""
    if text_is_kill(text) and not text_names_allocation_failure(text):
        beat_file = heartbeat_path(instance, run_id, step_key)
        try:
            beat = json.loads(beat_file.read_text())
        except (OSError, ValueError):
            beat = None
        return classify_kill(beat)[0]
    return text_is_out_of_memory(text)


def _failed_attempts(instance: dg.DagsterInstance, run_id: str, step_key: str) -> int:
    """Attempts of ``step_key`` in the run: its step retries plus the final failure."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY).records
    return 1 + sum(1 for record in records if record.event_log_entry.step_key == step_key)


def build_oom_rematerialization_sensor(
    request_jobs=ALL_JOBS, instance_run_config_fn: InstanceRunConfigFn | None = None
) -> dg.RunStatusSensorDefinition:
    """The out-of-memory sensor, able to launch ``request_jobs`` (the project's jobs, or the
    Kubernetes code location's versions); a re-run of a train_instances partition gets
    ``instance_run_config_fn``'s sizing of that partition (Kubernetes), or none (local)."""

    @dg.run_failure_sensor(
        name="oom_rematerialization_sensor",
        description=__doc__,
        request_jobs=request_jobs,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def oom_rematerialization_sensor(context: dg.RunFailureSensorContext):
        run = context.dagster_run
        if run.tags.get("dagster/will_retry") == "true":
            return dg.SkipReason(f"run {run.run_id} will be retried by Dagster's run retries; not launching a second re-run")
        failures = {
            event.step_key: event.step_failure_data.error.to_string() if event.step_failure_data.error else ""
            for event in context.get_step_failure_events()
        }
        # A step process killed by the OS fails with a bare ChildProcessCrashException; the exit
        # signal is in the executor's engine event for that step ("terminated by signal 9").
        for record in context.instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
            step = record.event_log_entry.step_key
            if step in failures:
                failures[step] += "\n" + (record.event_log_entry.user_message or "")
        oom_steps = sorted(
            step for step, text in failures.items() if _is_out_of_memory(context.instance, run.run_id, step, text)
        )
        if not oom_steps:
            context.log.info(f"run {run.run_id}: failure is not out-of-memory ({sorted(failures)}); nothing re-run")
            return dg.SkipReason("not an out-of-memory failure")
        tagged = ladder_level(0, run.tags)
        attempts = max(_failed_attempts(context.instance, run.run_id, step) for step in oom_steps)
        level = next_level_after_failure(tagged, attempts)
        if level is None:
            return dg.SkipReason(
                f"run {run.run_id} ran out of memory at the last ladder level; raise the memory budget or use more instances"
            )
        # Re-run what the run planned but did not finish: the failed steps and those that never
        # ran because an upstream step failed.
        plan = context.instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        succeeded = {
            record.event_log_entry.step_key
            for record in context.instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS).records
        }
        unfinished = sorted((set(plan.step_keys_to_execute) - succeeded) & _ASSET_STEPS)
        # The run's own tags (chain membership, user tags) carry over; Dagster's system tags
        # (partition, retries, backfill ids) are set afresh by the new run.
        tags = {k: v for k, v in run.tags.items() if not k.startswith("dagster/")}
        tags.update({LADDER_TAG: str(level), RETRY_OF_TAG: run.tags.get(RETRY_OF_TAG, run.run_id)})
        partition = run.tags.get("dagster/partition")
        # Only the re-run ops' config: a run may not configure ops outside its selection.
        run_config = run_config_for(
            [a for a in ALL_ASSETS if a.key.to_user_string() in unfinished],
            (run.run_config or {}).get("ops") or {},
            run.run_config or {},
        )
        if run.job_name == train_instances_job.name and partition:
            # On Kubernetes, the instance_model pod of the re-run, sized from the plan again. It is the
            # failed run's own size when that run was sized (by the chain, a backfill, the Launchpad)
            # and the plan has not changed since, and it fits the re-run: the plan predicts the peak
            # at ladder level 0 and every later level only lowers memory. A failed run that carried
            # no size (its own run config) gets one here, with the MemoryGuard budget that matches it.
            try:
                run_config = with_instance_run_config(run_config, instance_run_config_fn, partition, context.instance)
            except ChainConfigError as error:
                # Raising would make the daemon evaluate the same failure again at every tick.
                message = f"run {run.run_id} ran out of memory, but its re-run cannot be sized: {error}"
                context.log.error(message)
                return dg.SkipReason(message)
        return dg.RunRequest(
            run_key=f"oom-retry-{run.run_id}",
            job_name=run.job_name,
            partition_key=partition,
            asset_selection=[dg.AssetKey(step) for step in unfinished],
            run_config=run_config,
            tags=tags,
        )

    return oom_rematerialization_sensor


oom_rematerialization_sensor = build_oom_rematerialization_sensor()
