"""The chain sensors: full_training -> one train run per instance -> evaluate once all are trained."""

import dagster as dg
import pytest

from memopt_pipeline.assets import ALL_ASSETS, PREPARE_ASSETS
from memopt_pipeline.automation.chaining import chain_evaluate_and_explain, chain_train_instances, tag_chain_start
from memopt_pipeline.automation.jobs import ALL_JOBS, CHAIN_ID_TAG, CHAIN_TAG
from memopt_pipeline.automation.sensors import RETRY_OF_TAG
from memopt_pipeline.definitions import build_resources

# Settings of the chain's later runs, as the Launchpad holds them: the chain_settings resource.
CHAIN_SETTINGS = {
    "cv_folds": {"n_folds": 2},
    "instance_model": {"max_rounds": 5, "num_threads": 1},
    "shap_summary": {"sample_rows": 100, "chunk_rows": 50},
}
RESOURCES = {"memory_guard": {"config": {"budget_gb": 4.0}}}
# The sensors' contexts are built with their code location (repository_def), as in the daemon.
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")


def _settings(settings: dict) -> dict:
    return {"resources": {"chain_settings": {"config": settings}}}


@pytest.fixture(scope="module")
def started_chain(tiny_dataset, tmp_path_factory):
    """A successful full_training run over the tiny dataset (two instance partitions). Shared by the
    tests of this module: none of them depends on what the others add to the instance."""
    output = tmp_path_factory.mktemp("chain_out")
    definitions = dg.Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, resources=build_resources(output_dir=str(output)))
    with dg.instance_for_test() as instance:
        result = definitions.resolve_job_def("full_training").execute_in_process(
            instance=instance,
            run_config={
                "ops": {
                    "source_dataset": {"config": {"path": str(tiny_dataset)}},
                    "gene_split": {"config": {"sample_genes": 16}},
                    "instance_assignment": {"config": {"n_instances": 2}},
                },
                "resources": {**RESOURCES, "chain_settings": {"config": CHAIN_SETTINGS}},
            },
        )
        assert result.success
        yield definitions, instance, result


def _on_success(sensor, definitions, instance, result):
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=result.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        # As in the daemon: the sensors check the run config they build against the next job.
        repository_def=definitions.get_repository_def(),
    )
    return sensor(context)


def _train(definitions, instance, request, tags=None):
    result = definitions.resolve_job_def("train_instances").execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config=request.run_config, tags=tags or request.tags
    )
    assert result.success
    return result


def test_a_successful_full_training_requests_one_train_run_per_instance(started_chain):
    definitions, instance, start = started_chain
    requests = _on_success(chain_train_instances, definitions, instance, start)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    for request in requests:
        assert request.run_key == f"{start.run_id}:{request.partition_key}"
        assert request.tags[CHAIN_ID_TAG] == start.run_id
        assert request.tags[CHAIN_TAG] == "full_training"
        # The chain settings configure the train ops; the starting run's other resources carry over.
        assert request.run_config == {
            "ops": {
                "cv_folds": {"config": CHAIN_SETTINGS["cv_folds"]},
                "instance_model": {"config": CHAIN_SETTINGS["instance_model"]},
            },
            "resources": RESOURCES,
        }


def test_evaluation_waits_for_every_instance_then_is_requested_once(started_chain):
    definitions, instance, start = started_chain
    first, second = _on_success(chain_train_instances, definitions, instance, start)

    trained_first = _train(definitions, instance, first)
    waiting = _on_success(chain_evaluate_and_explain, definitions, instance, trained_first)
    assert isinstance(waiting, dg.SkipReason)
    assert "waiting for instance_model partitions ['instance_1']" in waiting.skip_message

    # The second partition comes back as an out-of-memory re-run: no chain tags of its own,
    # only the run it re-runs.
    retried = _train(definitions, instance, second, tags={RETRY_OF_TAG: trained_first.run_id})
    request = _on_success(chain_evaluate_and_explain, definitions, instance, retried)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == f"{start.run_id}:evaluate"  # the same key from any later success: launched once
    assert request.tags[CHAIN_ID_TAG] == start.run_id
    assert request.run_config == {"ops": {"shap_summary": {"config": CHAIN_SETTINGS["shap_summary"]}}, "resources": RESOURCES}

    evaluation = definitions.resolve_job_def("evaluate_and_explain").execute_in_process(
        instance=instance, run_config=request.run_config, tags=request.tags
    )
    assert evaluation.success


def test_retrain_from_current_plan_trains_the_existing_partitions(started_chain):
    definitions, instance, _ = started_chain
    retrain = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(instance=instance)
    assert retrain.success
    requests = _on_success(chain_train_instances, definitions, instance, retrain)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    assert all(r.tags[CHAIN_TAG] == "retrain_from_current_plan" for r in requests)
    assert all(r.run_config == {} for r in requests)  # no chain settings: the assets' defaults


def test_retrain_without_a_plan_fails_clearly(tmp_path):
    definitions = dg.Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, resources=build_resources(output_dir=str(tmp_path)))
    with dg.instance_for_test() as instance:
        result = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("check_current_plan")
    assert "run full_training (or prepare_instances) first" in failure.user_failure_data.description


@pytest.mark.parametrize(
    "instance_model, message",
    [
        ({"max_round": 50}, 'unexpected config entry "max_round"'),  # the typo
        ({"max_rounds": "fifty"}, "max_rounds"),
    ],
)
def test_a_chain_with_an_invalid_setting_is_refused_at_launch_and_the_next_chain_goes_on(
    started_chain, instance_model, message
):
    definitions, instance, _ = started_chain
    runs_before = len(instance.get_runs())
    for job_name in ("full_training", "retrain_from_current_plan"):
        job = definitions.resolve_job_def(job_name)
        # What the webserver checks when the Launchpad launches, and what executing the job checks.
        with pytest.raises(dg.DagsterInvalidConfigError, match=message):
            dg.validate_run_config(job, _settings({"instance_model": instance_model}))
        with pytest.raises(dg.DagsterInvalidConfigError, match=message):
            job.execute_in_process(instance=instance, run_config=_settings({"instance_model": instance_model}))
    assert len(instance.get_runs()) == runs_before  # refused before any run existed

    retrain = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(
        instance=instance, run_config=_settings({"instance_model": {"max_rounds": 50}, "ensemble_model": {"weighting": "validation"}})
    )
    requests = _on_success(chain_train_instances, definitions, instance, retrain)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    assert all(r.run_config == {"ops": {"instance_model": {"config": {"max_rounds": 50}}}} for r in requests)


def test_a_chain_whose_settings_no_longer_fit_stops_with_the_reason(started_chain):
    definitions, instance, _ = started_chain
    # A starting run stored with settings the next job refuses, as after a code change renamed a field.
    stale = instance.add_run(
        dg.DagsterRun(
            job_name="retrain_from_current_plan",
            run_config=_settings({"instance_model": {"max_round": 50}}),
            tags={CHAIN_TAG: "retrain_from_current_plan"},
            status=dg.DagsterRunStatus.SUCCESS,
        )
    )
    success = dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name=stale.job_name)
    result = chain_train_instances(
        dg.build_run_status_sensor_context(
            sensor_name=chain_train_instances.name, dagster_event=success, dagster_instance=instance,
            dagster_run=stale, repository_def=definitions.get_repository_def(),
        )
    )  # fmt: skip
    assert isinstance(result, dg.SkipReason)  # reported on the tick, not raised: later chains go on
    assert "stopped before training" in result.skip_message and "train_instances" in result.skip_message
    assert '"max_round"' in result.skip_message


def test_settings_that_cannot_work_on_the_instances_fail_the_starting_run(started_chain):
    definitions, instance, _ = started_chain
    too_many_folds = _settings({"cv_folds": {"n_folds": 40}})
    retrain = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(
        instance=instance, run_config=too_many_folds, raise_on_error=False
    )
    assert not retrain.success  # so the chain sensors launch nothing
    failure = retrain.failure_data_for_node("check_current_plan").user_failure_data.description
    assert "40 folds needs at least 40 genes per instance, but the smallest instance has" in failure

    # instance_assignment makes the same check in a full_training run, before the partitions change;
    # outside a chain (prepare_instances) the settings are not used and not checked.
    config = {"ops": {"instance_assignment": {"config": {"n_instances": 2}}}, **too_many_folds}
    chain_run = dg.materialize(
        PREPARE_ASSETS,
        selection=["instance_assignment"],
        instance=instance,
        resources=definitions.resources,
        run_config=config,
        tags={CHAIN_TAG: "full_training"},
        raise_on_error=False,
    )
    assert not chain_run.success
    assert "40 folds" in chain_run.failure_data_for_node("instance_assignment").user_failure_data.description
    outside = dg.materialize(
        PREPARE_ASSETS, selection=["instance_assignment"], instance=instance, resources=definitions.resources, run_config=config
    )
    assert outside.success


def test_the_starting_run_is_tagged_with_its_own_id_when_it_starts(started_chain):
    definitions, instance, _ = started_chain
    job = definitions.resolve_job_def("retrain_from_current_plan")
    # Runs as the webserver creates them: with the job's tags (the memopt/chain tag) ...
    fresh = instance.create_run_for_job(job, tags=job.tags)
    # ... or, for a re-execution, with its parent's tags too, the parent's chain id among them.
    reexecution = instance.create_run_for_job(job, tags={**job.tags, CHAIN_ID_TAG: fresh.run_id})
    for run in (fresh, reexecution):
        assert run.tags[CHAIN_TAG] == "retrain_from_current_plan"
        # The event the run launcher reports when it hands the run to a run worker.
        starting = dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_STARTING.value, job_name=run.job_name)
        tag_chain_start(
            dg.build_run_status_sensor_context(
                sensor_name=tag_chain_start.name, dagster_event=starting, dagster_instance=instance, dagster_run=run
            )
        )
        assert instance.get_run_by_id(run.run_id).tags[CHAIN_ID_TAG] == run.run_id


def test_the_code_location_registers_the_chain_jobs_schedule_and_sensors():
    from memopt_pipeline.definitions import defs

    repository = defs.get_repository_def()
    assert {"full_training", "retrain_from_current_plan"} <= {job.name for job in repository.get_all_jobs()}
    assert [schedule.name for schedule in repository.schedule_defs] == ["nightly_retrain"]
    sensors = {sensor.name: sensor for sensor in repository.sensor_defs}
    assert {
        "chain_train_instances", "chain_evaluate_and_explain", "tag_chain_start", "dataset_change_sensor", "oom_rematerialization_sensor"
    } <= set(sensors)  # fmt: skip
    # The chain only works while its sensors run; the ones that need settings start stopped.
    for name in ("chain_train_instances", "chain_evaluate_and_explain", "tag_chain_start"):
        assert sensors[name].default_status == dg.DefaultSensorStatus.RUNNING
    assert sensors["dataset_change_sensor"].default_status == dg.DefaultSensorStatus.STOPPED
