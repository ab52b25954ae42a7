"""The OOM sensor re-runs exactly the failed partition's failed assets, one ladder level lower."""

import dagster as dg
import pytest

from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.assets import splits as split_assets
from memopt_pipeline.assets import training as training_assets
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.jobs import ALL_JOBS
from memopt_pipeline.automation.sensors import RETRY_OF_TAG, oom_rematerialization_sensor
from memopt_pipeline.core.memory.ladder import LADDER_TAG
from memopt_pipeline.definitions import build_resources


@pytest.fixture
def project(tiny_dataset, tmp_path):
    definitions = dg.Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, resources=build_resources(output_dir=str(tmp_path / "out")))
    with dg.instance_for_test() as instance:
        prepare = definitions.resolve_job_def("prepare_instances").execute_in_process(
            instance=instance,
            run_config={
                "ops": {
                    "source_dataset": {"config": {"path": str(tiny_dataset)}},
                    "gene_split": {"config": {"sample_genes": 16}},
                    "instance_assignment": {"config": {"n_instances": 2}},
                }
            },
        )
        assert prepare.success
        yield definitions, instance


def _train(definitions, instance, partition):
    return definitions.resolve_job_def("train_instances").execute_in_process(
        instance=instance,
        partition_key=partition,
        run_config={
            "ops": {"cv_folds": {"config": {"n_folds": 2}}, "instance_model": {"config": {"max_rounds": 5, "num_threads": 1}}},
        },
        raise_on_error=False,
    )


def _sensor_result(instance, run_id):
    run = instance.get_run_by_id(run_id)
    failure = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records[0]
    context = dg.build_run_status_sensor_context(
        sensor_name="oom_rematerialization_sensor",
        dagster_event=failure.event_log_entry.dagster_event,
        dagster_instance=instance,
        dagster_run=run,
    ).for_run_failure()
    return oom_rematerialization_sensor(context)


def out_of_memory(*args, **kwargs):
    raise MemoryError("Unable to allocate 997. MiB for an array")


def test_oom_in_partition_k_requests_partition_k_only(project, monkeypatch):
    definitions, instance = project
    partitions = instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
    assert partitions == ["instance_0", "instance_1"]
    assert _train(definitions, instance, "instance_0").success

    # cv_folds has no retry policy: one OOM fails it and skips instance_model downstream.
    monkeypatch.setattr(split_assets, "gene_folds", out_of_memory)
    failed = _train(definitions, instance, "instance_1")
    assert not failed.success

    request = _sensor_result(instance, failed.run_id)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "instance_1"
    assert request.job_name == "train_instances"
    assert request.asset_selection == [dg.AssetKey("cv_folds"), dg.AssetKey("instance_model")]
    assert request.tags[LADDER_TAG] == "1"
    assert request.tags[RETRY_OF_TAG] == failed.run_id
    # The re-run keeps the failed run's settings (not the assets' defaults).
    assert request.run_config["ops"] == {
        "cv_folds": {"config": {"n_folds": 2}},
        "instance_model": {"config": {"max_rounds": 5, "num_threads": 1}},
    }
    # And the re-run, memory permitting, succeeds with that config (only the selected ops' config is passed).
    monkeypatch.undo()
    rerun = definitions.resolve_job_def("train_instances").execute_in_process(
        instance=instance, partition_key="instance_1", run_config=request.run_config, tags=request.tags,
        asset_selection=request.asset_selection, raise_on_error=False,
    )
    assert rerun.success


def test_a_run_dagster_will_retry_is_left_to_dagster(project, monkeypatch):
    definitions, instance = project
    monkeypatch.setattr(split_assets, "gene_folds", out_of_memory)
    failed = _train(definitions, instance, "instance_1")
    instance.add_run_tags(failed.run_id, {"dagster/will_retry": "true"})
    result = _sensor_result(instance, failed.run_id)
    assert isinstance(result, dg.SkipReason) and "run retries" in result.skip_message


def test_only_failed_assets_are_rerun_and_an_exhausted_ladder_gives_up(project, monkeypatch):
    definitions, instance = project
    # Every attempt of instance_model (levels 0..3, LightGBM then XGBoost) runs out of memory.
    monkeypatch.setattr(training_assets, "train_instance", out_of_memory)
    monkeypatch.setattr(training_assets, "train_instance_xgboost", out_of_memory)
    failed = _train(definitions, instance, "instance_0")
    assert not failed.success
    assert failed.asset_materializations_for_node("cv_folds")  # succeeded: would not be re-run
    result = _sensor_result(instance, failed.run_id)
    assert isinstance(result, dg.SkipReason)
    assert "last ladder level" in result.skip_message


def test_other_failures_are_not_rerun(project, monkeypatch):
    definitions, instance = project

    def bug(*args, **kwargs):
        raise KeyError("gene_id")

    monkeypatch.setattr(training_assets, "train_instance", bug)
    failed = _train(definitions, instance, "instance_0")
    assert not failed.success
    result = _sensor_result(instance, failed.run_id)
    assert isinstance(result, dg.SkipReason)
    assert "not an out-of-memory failure" in result.skip_message


def test_a_sigkilled_step_is_out_of_memory_for_the_sensor_only_with_evidence(tmp_path):
    import json

    from memopt_pipeline.automation.sensors import _is_out_of_memory
    from memopt_pipeline.resources.memory_guard import heartbeat_path

    killed = "ChildProcessCrashException: child process for step instance_model unexpectedly exited with code -9"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        beat = heartbeat_path(instance, "run-1", "instance_model")
        beat.parent.mkdir(parents=True)
        assert not _is_out_of_memory(instance, "run-1", "instance_model", killed)  # no heartbeat, no evidence
        beat.write_text(json.dumps({"rss_bytes": 100 * 2**20, "budget_bytes": 4 * 2**30}))
        assert not _is_out_of_memory(instance, "run-1", "instance_model", killed)
        beat.write_text(json.dumps({"rss_bytes": 38 * 2**30 // 10, "budget_bytes": 4 * 2**30}))
        assert _is_out_of_memory(instance, "run-1", "instance_model", killed)
        assert _is_out_of_memory(instance, "run-2", "instance_model", "MemoryBudgetExceeded: Stage 'x' exceeded")
