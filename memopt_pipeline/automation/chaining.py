"""The chain behind full_training and retrain_from_current_plan: train every instance, then evaluate.

Instance partitions are dynamic (instance_assignment creates them) and a job cannot mix
partitioned and unpartitioned assets, so "everything" is several runs, started by two run
status sensors (both running by default):

- chain_train_instances: when a full_training or retrain_from_current_plan run succeeds, one
  train_instances run per instance partition that exists then;
- chain_evaluate_and_explain: when a train_instances run of a chain succeeds and every instance
  partition has an instance_model materialization newer than the chain's start, one
  evaluate_and_explain run.

Their run config comes from the starting run's: the ops config from its chain_settings
resource (resources/chain_settings.py, checked by Dagster when that run was launched), the rest
of its resources, execution and loggers as they are (automation/run_config.py). A chain that
cannot go on (a run config the next job refuses, e.g. after the code changed) is stopped with
the reason on the sensor's tick, never raised: that would hold up every later chain.

On Kubernetes (deploy/k8s.py) each train_instances run also carries its instance_model pod's
memory, sized from the plan: Dagster sizes a run from the job's partitioned config only when the
run brings no run config of its own, and these runs do. chain_train_instances is where the sizing
is added, for every chain however it started (the Launchpad, the nightly schedule, the dataset
sensor): it is the first point at which the plan the runs train exists. A full_training run
(launched by the dataset sensor) makes a new memory_plan and instance_assignment, so its
launcher cannot know the pods; the nightly schedule's retrain_from_current_plan and the
full_training run itself have no instance_model step to size. The sensor reads the plan when
the starting run has succeeded, i.e. the one that run made or checked.

Every run of a chain carries the tags memopt/chain (kind) and memopt/chain_id (the starting
run; the third sensor, tag_chain_start, puts it on the starting run itself as soon as that run
is launched), so the UI's run list filtered on memopt/chain_id shows one whole chain. Runs
re-launched by the out-of-memory sensor lose those tags; the chain finds its way back through
their memopt/oom_retry_of tag. Run keys make each request idempotent: a sensor that sees the
same success twice launches nothing new.
"""

from __future__ import annotations

import dagster as dg

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.jobs import (
    CHAIN_ID_TAG,
    CHAIN_START_JOBS,
    CHAIN_TAG,
    evaluate_and_explain_job,
    train_instances_job,
)
from memopt_pipeline.automation.run_config import (
    ChainConfigError,
    InstanceRunConfigFn,
    chained_run_config,
    with_instance_run_config,
)
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
    return {CHAIN_ID_TAG: chain_id, CHAIN_TAG: origin.tags.get(CHAIN_TAG, "")}


def _checked_run_config(context: dg.RunStatusSensorContext, job_name: str, run_config: dict) -> dict:
    """``run_config`` once ``job_name`` accepts it; ChainConfigError with Dagster's reason if not.

    Dagster checked the starting run's config at launch; this catches what changed since (the
    code, a setting the next job refuses) before the daemon tries a run it would refuse."""
    repository = context.repository_def
    if repository is None:  # a context built without its code location (some tests): nothing to check against
        return run_config
    try:
        dg.validate_run_config(repository.get_job(job_name), run_config)
    except dg.DagsterInvalidConfigError as error:
        raise ChainConfigError(
            f"the chain settings of its starting run do not fit {job_name} ({'; '.join(e.message for e in error.errors)}); "
            "start a new chain with settings that do"
        ) from error
    return run_config


def _stopped(context: dg.RunStatusSensorContext, message: str) -> dg.SkipReason:
    # A run status sensor that raises re-reads the same event forever and blocks every later
    # one, so a broken chain is reported (error log + skip reason on the tick) and left there.
    context.log.error(message)
    return dg.SkipReason(message)


def build_chain_train_instances(
    request_job=train_instances_job,
    instance_run_config_fn: InstanceRunConfigFn | None = None,
) -> dg.RunStatusSensorDefinition:
    """The chain_train_instances sensor, launching ``request_job`` (train_instances, or the Kubernetes
    code location's version of it); each run's config gets
    ``instance_run_config_fn``'s sizing of its partition (the Kubernetes code location's
    plan-sized instance_model pod), or none (the local code location)."""

    @dg.run_status_sensor(
        name="chain_train_instances",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=CHAIN_START_JOBS,
        request_job=request_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=CHAIN_SENSOR_INTERVAL_SECONDS,
        description="When full_training or retrain_from_current_plan succeeds: one train_instances run per instance "
        "partition, configured by the starting run's chain_settings and the rest of its resources, execution and "
        "loggers" + (", with the instance_model pod sized from the plan." if instance_run_config_fn else "."),
    )
    def chain_train_instances(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        try:
            origin = chain_origin(context.instance, run)
            run_config = _checked_run_config(
                context, train_instances_job.name, chained_run_config(INSTANCE_ASSETS, origin.run_config)
            )
        except ChainConfigError as error:
            return _stopped(context, f"chain of run {run.run_id} stopped before training: {error}")
        partitions = context.instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
        if not partitions:
            return _stopped(context, f"chain of run {run.run_id} stopped: no instance partitions exist to train")
        try:
            # The starting run has succeeded, so the plan and assignment these partitions were made
            # from are materialized: each run is sized from them (see the module docstring).
            run_configs = {
                partition: with_instance_run_config(run_config, instance_run_config_fn, partition, context.instance)
                for partition in partitions
            }
        except ChainConfigError as error:
            return _stopped(context, f"chain of run {run.run_id} stopped before training: {error}")
        context.log.info(f"chain {run.run_id}: training {len(partitions)} instance partitions")
        return [
            dg.RunRequest(
                run_key=f"{run.run_id}:{partition}",
                partition_key=partition,
                run_config=run_configs[partition],
                tags=_chain_tags(origin, run.run_id),
            )
            for partition in partitions
        ]

    return chain_train_instances


chain_train_instances = build_chain_train_instances()


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
        run_config = _checked_run_config(
            context, evaluate_and_explain_job.name, chained_run_config(FINALIZE_ASSETS, origin.run_config)
        )
    except ChainConfigError as error:
        return _stopped(context, f"chain of run {run.run_id} stopped before evaluation: {error}")
    context.log.info(f"chain {chain_id}: every instance is trained; evaluating")
    return dg.RunRequest(run_key=f"{chain_id}:evaluate", run_config=run_config, tags=_chain_tags(origin, chain_id))


@dg.run_status_sensor(
    name="tag_chain_start",
    # STARTING: the run launcher reports it when the run is handed to a run worker, for runs from
    # the Launchpad, a schedule or a sensor alike; the worker then still has to load the code, so
    # the tag is usually there before the first step starts. A step of the run could tag it only
    # later, and not at all in a re-execution that skips that step.
    run_status=dg.DagsterRunStatus.STARTING,
    monitored_jobs=CHAIN_START_JOBS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=CHAIN_SENSOR_INTERVAL_SECONDS,
    description="Tags each full_training and retrain_from_current_plan run, as it starts, with "
    "memopt/chain_id=<its own run id>, so that filtering the runs on that tag shows the whole chain, its first run included.",
)
def tag_chain_start(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    # A re-execution copies its parent's tags: its own id replaces the parent's, since its
    # success is what starts the next runs (chain_train_instances names the chain after it).
    if run.tags.get(CHAIN_ID_TAG) != run.run_id:
        context.instance.add_run_tags(run.run_id, {CHAIN_ID_TAG: run.run_id})
    return dg.SkipReason(f"run {run.run_id} tagged {CHAIN_ID_TAG}={run.run_id}")


CHAIN_SENSORS = [chain_train_instances, chain_evaluate_and_explain, tag_chain_start]
