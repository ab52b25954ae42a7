"""The chain behind full_training and retrain_from_current_plan: train every instance, then evaluate.

Instance partitions are dynamic (instance_assignment creates them) and a job cannot mix
partitioned and unpartitioned assets, so "everything" is several runs, started by two run
status sensors (both running by default):

- chain_train_instances: when a full_training or retrain_from_current_plan run succeeds, one
  train_instances run per instance partition that exists then;
- chain_evaluate_and_explain: when a train_instances run of a chain succeeds and every instance
  partition has an instance_model materialization newer than the chain's start, one
  evaluate_and_explain run.

Each chained run carries the tags memopt/chain (kind) and memopt/chain_id (the starting run),
so the UI's run list filtered on memopt/chain_id shows one whole chain. Runs re-launched by
the out-of-memory sensor lose those tags; the chain finds its way back through their
memopt/oom_retry_of tag. Run keys make each request idempotent: a sensor that sees the same
success twice launches nothing new.
"""

from __future__ import annotations

import dagster as dg

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.jobs import (
    CHAIN_CONFIG_TAG,
    CHAIN_ID_TAG,
    CHAIN_START_JOBS,
    CHAIN_TAG,
    evaluate_and_explain_job,
    train_instances_job,
)
from memopt_pipeline.automation.run_config import ChainConfigError, parse_chain_config, run_config_for
from memopt_pipeline.automation.sensors import RETRY_OF_TAG

# Chained runs wait at most this long for the next step; the check itself is one small query.
CHAIN_SENSOR_INTERVAL_SECONDS = 5
_MODEL_KEY = dg.AssetKey("instance_model")


def chain_origin(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dg.DagsterRun:
    """The run whose tags and config define ``run``'s chain: ``run`` itself, or, for a re-run
    launched by the out-of-memory sensor (which copies neither tags nor config), the run it re-runs."""
    original_id = run.tags.get(RETRY_OF_TAG)
    if not original_id:
        return run
    original = instance.get_run_by_id(original_id)
    if original is None:
        raise ChainConfigError(f"run {run.run_id} re-runs {original_id}, which is no longer in the instance")
    return original


def _chain_tags(origin: dg.DagsterRun, chain_id: str) -> dict[str, str]:
    tags = {CHAIN_ID_TAG: chain_id, CHAIN_TAG: origin.tags.get(CHAIN_TAG, "")}
    if CHAIN_CONFIG_TAG in origin.tags:
        tags[CHAIN_CONFIG_TAG] = origin.tags[CHAIN_CONFIG_TAG]
    return tags


def _stopped(context: dg.RunStatusSensorContext, message: str) -> dg.SkipReason:
    # A run status sensor that raises re-reads the same event forever and blocks every later
    # one, so a broken chain is reported (error log + skip reason on the tick) and left there.
    context.log.error(message)
    return dg.SkipReason(message)


@dg.run_status_sensor(
    name="chain_train_instances",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=CHAIN_START_JOBS,
    request_job=train_instances_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=CHAIN_SENSOR_INTERVAL_SECONDS,
    description="When full_training or retrain_from_current_plan succeeds: one train_instances run per instance "
    "partition, configured by the starting run's memopt/chain_config tag and run-level config.",
)
def chain_train_instances(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    try:
        origin = chain_origin(context.instance, run)
        ops = parse_chain_config(origin.tags)
    except ChainConfigError as error:
        return _stopped(context, f"chain of run {run.run_id} stopped before training: {error}")
    partitions = context.instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
    if not partitions:
        return _stopped(context, f"chain of run {run.run_id} stopped: no instance partitions exist to train")
    run_config = run_config_for(INSTANCE_ASSETS, ops, origin.run_config)
    context.log.info(f"chain {run.run_id}: training {len(partitions)} instance partitions")
    return [
        dg.RunRequest(
            run_key=f"{run.run_id}:{partition}",
            partition_key=partition,
            run_config=run_config,
            tags=_chain_tags(origin, run.run_id),
        )
        for partition in partitions
    ]


def untrained_partitions(instance: dg.DagsterInstance, since: float) -> list[str]:
    """Instance partitions without an instance_model materialization after ``since`` (a timestamp)."""
    return [
        partition
        for partition in instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
        if not instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=_MODEL_KEY, asset_partitions=[partition], after_timestamp=since), limit=1
        ).records
    ]


@dg.run_status_sensor(
    name="chain_evaluate_and_explain",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[train_instances_job],
    request_job=evaluate_and_explain_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=CHAIN_SENSOR_INTERVAL_SECONDS,
    description="When the last train_instances run of a full_training or retrain_from_current_plan chain "
    "succeeds (every instance_model partition materialized since the chain started): one evaluate_and_explain run.",
)
def chain_evaluate_and_explain(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    try:
        chain_id = run.tags.get(CHAIN_ID_TAG) or chain_origin(context.instance, run).tags.get(CHAIN_ID_TAG)
        if not chain_id:
            return dg.SkipReason(f"train run {run.run_id} is not part of a chain; evaluate_and_explain is launched by hand")
        start = context.instance.get_run_record_by_id(chain_id)
        if start is None or start.end_time is None:
            return _stopped(context, f"chain {chain_id}: its starting run is missing from the instance or never ended")
        waiting = untrained_partitions(context.instance, since=start.end_time)
        if waiting:
            return dg.SkipReason(f"chain {chain_id}: waiting for instance_model partitions {waiting}")
        origin = chain_origin(context.instance, start.dagster_run)
        ops = parse_chain_config(origin.tags)
    except ChainConfigError as error:
        return _stopped(context, f"chain of run {run.run_id} stopped before evaluation: {error}")
    context.log.info(f"chain {chain_id}: every instance is trained; evaluating")
    return dg.RunRequest(
        run_key=f"{chain_id}:evaluate",
        run_config=run_config_for(FINALIZE_ASSETS, ops, origin.run_config),
        tags=_chain_tags(origin, chain_id),
    )


CHAIN_SENSORS = [chain_train_instances, chain_evaluate_and_explain]
