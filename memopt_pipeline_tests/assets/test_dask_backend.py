"""instance_model on the xgboost_dask backend, through the whole graph, on a LocalCluster."""

import dagster as dg
import pytest

from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.core.storage import read_json
from memopt_pipeline.definitions import build_resources
from memopt_pipeline_tests.checkpoint_layout import stage_run_dir


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
    assert any("starting a LocalCluster for this step" in message for message in messages)
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
