"""The chain sensors: full_training -> one train run per instance -> evaluate once all are trained."""

import json

import dagster as dg
import pytest

from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.automation.chaining import chain_evaluate_and_explain, chain_train_instances
from memopt_pipeline.automation.jobs import ALL_JOBS, CHAIN_CONFIG_TAG, CHAIN_ID_TAG, CHAIN_TAG
from memopt_pipeline.automation.run_config import ChainConfigError, parse_chain_config
from memopt_pipeline.automation.sensors import RETRY_OF_TAG
from memopt_pipeline.definitions import build_resources

CHAIN_OPS = {
    "cv_folds": {"config": {"n_folds": 2}},
    "instance_model": {"config": {"max_rounds": 5, "num_threads": 1}},
    "shap_summary": {"config": {"sample_rows": 100, "chunk_rows": 50}},
}
RESOURCES = {"memory_guard": {"config": {"budget_gb": 4.0}}}


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
                "resources": RESOURCES,
            },
            tags={CHAIN_CONFIG_TAG: json.dumps({"ops": CHAIN_OPS})},
        )
        assert result.success
        yield definitions, instance, result


def _on_success(sensor, instance, result):
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=result.get_run_success_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    )
    return sensor(context)


def _train(definitions, instance, request, tags=None):
    result = definitions.resolve_job_def("train_instances").execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config=request.run_config, tags=tags or request.tags
    )
    assert result.success
    return result


def test_a_successful_full_training_requests_one_train_run_per_instance(started_chain):
    _, instance, start = started_chain
    requests = _on_success(chain_train_instances, instance, start)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    for request in requests:
        assert request.run_key == f"{start.run_id}:{request.partition_key}"
        assert request.tags[CHAIN_ID_TAG] == start.run_id
        assert request.tags[CHAIN_TAG] == "full_training"
        # The tag configures the train ops; the starting run's resources carry over.
        assert request.run_config == {
            "ops": {"cv_folds": CHAIN_OPS["cv_folds"], "instance_model": CHAIN_OPS["instance_model"]},
            "resources": RESOURCES,
        }


def test_evaluation_waits_for_every_instance_then_is_requested_once(started_chain):
    definitions, instance, start = started_chain
    first, second = _on_success(chain_train_instances, instance, start)

    trained_first = _train(definitions, instance, first)
    waiting = _on_success(chain_evaluate_and_explain, instance, trained_first)
    assert isinstance(waiting, dg.SkipReason)
    assert "waiting for instance_model partitions ['instance_1']" in waiting.skip_message

    # The second partition comes back as an out-of-memory re-run: no chain tags of its own,
    # only the run it re-runs.
    retried = _train(definitions, instance, second, tags={RETRY_OF_TAG: trained_first.run_id})
    request = _on_success(chain_evaluate_and_explain, instance, retried)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == f"{start.run_id}:evaluate"  # the same key from any later success: launched once
    assert request.tags[CHAIN_ID_TAG] == start.run_id
    assert request.run_config == {"ops": {"shap_summary": CHAIN_OPS["shap_summary"]}, "resources": RESOURCES}

    evaluation = definitions.resolve_job_def("evaluate_and_explain").execute_in_process(
        instance=instance, run_config=request.run_config, tags=request.tags
    )
    assert evaluation.success


def test_retrain_from_current_plan_trains_the_existing_partitions(started_chain):
    definitions, instance, _ = started_chain
    retrain = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(instance=instance)
    assert retrain.success
    requests = _on_success(chain_train_instances, instance, retrain)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    assert all(r.tags[CHAIN_TAG] == "retrain_from_current_plan" for r in requests)
    assert all(r.run_config == {} for r in requests)  # no chain config: the assets' defaults


def test_retrain_without_a_plan_fails_clearly(tmp_path):
    definitions = dg.Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, resources=build_resources(output_dir=str(tmp_path)))
    with dg.instance_for_test() as instance:
        result = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("check_current_plan")
    assert "run full_training (or prepare_instances) first" in failure.user_failure_data.description


def test_a_broken_chain_config_stops_the_chain_with_the_reason(started_chain):
    definitions, instance, _ = started_chain
    broken = definitions.resolve_job_def("retrain_from_current_plan").execute_in_process(
        instance=instance, tags={CHAIN_CONFIG_TAG: '{"ops": {"memory_plan": {}}}'}
    )
    result = _on_success(chain_train_instances, instance, broken)
    assert isinstance(result, dg.SkipReason)
    assert "names ops that no chained run has: ['memory_plan']" in result.skip_message


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"resources": {}}', 'only an "ops" key'),
        ('{"ops": []}', '"ops" must be an object'),
    ],
)
def test_chain_config_errors_say_what_to_fix(text, message):
    with pytest.raises(ChainConfigError, match=message):
        parse_chain_config({CHAIN_CONFIG_TAG: text})


def test_the_code_location_registers_the_chain_jobs_schedule_and_sensors():
    from memopt_pipeline.definitions import defs

    repository = defs.get_repository_def()
    assert {"full_training", "retrain_from_current_plan"} <= {job.name for job in repository.get_all_jobs()}
    assert [schedule.name for schedule in repository.schedule_defs] == ["nightly_retrain"]
    sensors = {sensor.name: sensor for sensor in repository.sensor_defs}
    assert {"chain_train_instances", "chain_evaluate_and_explain", "dataset_change_sensor", "oom_rematerialization_sensor"} <= set(sensors)
    # The chain only works while its sensors run; the ones that need settings start stopped.
    assert sensors["chain_train_instances"].default_status == dg.DefaultSensorStatus.RUNNING
    assert sensors["chain_evaluate_and_explain"].default_status == dg.DefaultSensorStatus.RUNNING
    assert sensors["dataset_change_sensor"].default_status == dg.DefaultSensorStatus.STOPPED
