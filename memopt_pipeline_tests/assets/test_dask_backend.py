"""instance_model on the xgboost_dask backend, through the whole graph, on a LocalCluster."""

import dagster as dg
import dask
import pytest

from memopt_pipeline.assets import ALL_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets import training as training_assets
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.core.storage import read_json
from memopt_pipeline.definitions import build_resources
from memopt_pipeline_tests.checkpoint_layout import stage_run_dir
from memopt_pipeline_tests.core.train import dask_tasks


def _run_config(tiny_dataset, **model_config) -> dict:
    return {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"sample_genes": 24, "holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 1}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {"config": {"max_rounds": 40, "num_threads": 1, "learning_rate": 0.3, **model_config}},
            "shap_summary": {"config": {"sample_rows": 200, "chunk_rows": 100}},
        }
    }


def test_xgboost_dask_backend_end_to_end(tiny_dataset, tmp_path):
    output = tmp_path / "out"
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance,
            resources=build_resources(output_dir=str(output)),
            run_config=_run_config(tiny_dataset, backend="xgboost_dask"),  # no scheduler address: a LocalCluster
            log=lambda m: None,
        )
        messages = [entry.user_message for run in instance.get_runs() for entry in instance.all_logs(run.run_id)]
    assert any("starting a LocalCluster for this step: 2 worker processes" in message for message in messages)
    model = collected["instance_model [instance_0]"]
    assert model["backend"] == "xgboost_dask" and model["external_memory"] is False
    partition_dir = stage_run_dir(output, collected, "instance_model [instance_0]")
    assert (partition_dir / "model.ubj").exists() and not (partition_dir / "model.txt").exists()
    assert read_json(partition_dir / "model_card.json")["model_format"] == "xgboost-ubj"
    holdout = collected["holdout_evaluation"]  # the ensemble and evaluation load the .ubj model unchanged
    assert holdout["logloss"] < holdout["baseline_logloss"]


def test_xgboost_dask_with_external_memory_is_a_configuration_error(tiny_dataset, tmp_path):
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="external_memory is for the local xgboost backend"):
            materialize_pipeline(
                instance,
                resources=build_resources(output_dir=str(tmp_path / "out")),
                run_config=_run_config(tiny_dataset, backend="xgboost_dask", external_memory=True),
                log=lambda m: None,
            )


def test_a_dask_worker_killed_for_memory_is_retried_one_ladder_level_lower(tiny_dataset, tmp_path, monkeypatch):
    """A real nanny kill in the step's LocalCluster: out of memory, so the step is retried one level lower."""
    real_train = training_assets.train_instance_xgboost_dask
    attempts = []

    def train_after_a_worker_ran_out_of_memory_once(reader, fold_of_gene, *, session, **kwargs):
        attempts.append(kwargs["batch_rows"])
        if len(attempts) == 1:
            # A task that holds more than its worker's memory limit: the nanny terminates the worker.
            session.client.submit(dask_tasks.hold_memory_until_killed, pure=False).result()
        return real_train(reader, fold_of_gene, session=session, **kwargs)

    monkeypatch.setattr(training_assets, "train_instance_xgboost_dask", train_after_a_worker_ran_out_of_memory_once)
    run_config = _run_config(tiny_dataset, backend="xgboost_dask", max_rounds=5)
    resources = build_resources(output_dir=str(tmp_path / "out"))
    # One death fails the task (KilledWorker) instead of three more on restarted workers.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), dg.instance_for_test() as instance:
        prepare_ops = ("source_dataset", "gene_split", "instance_assignment")
        prepare_config = {"ops": {k: v for k, v in run_config["ops"].items() if k in prepare_ops}}
        dg.materialize(
            ALL_ASSETS, selection=PREPARE_ASSETS, instance=instance, resources=resources, run_config=prepare_config
        )
        partition = instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)[0]
        instance_config = {"ops": {k: v for k, v in run_config["ops"].items() if k in ("cv_folds", "instance_model")}}
        result = dg.materialize(
            ALL_ASSETS, selection=INSTANCE_ASSETS, instance=instance, resources=resources, partition_key=partition,
            run_config=instance_config, raise_on_error=False,
        )  # fmt: skip
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert result.success
    assert len(attempts) == 2 and attempts[1] < attempts[0]  # level 1: batches (and partitions) 4x smaller
    assert any("a Dask worker was killed by its nanny at its memory limit of" in message for message in messages)
    materialization = result.asset_materializations_for_node("instance_model")[0]
    assert materialization.metadata["ladder_level"].value == 1
    assert materialization.metadata["backend"].value == "xgboost_dask"
