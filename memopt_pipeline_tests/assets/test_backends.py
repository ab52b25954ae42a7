"""XGBoost (in memory and external memory) trains and evaluates through the whole graph."""

import dagster as dg
import pytest

from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.definitions import build_resources


@pytest.mark.parametrize("external_memory", [False, True], ids=["xgboost_in_memory", "xgboost_external_memory"])
def test_xgboost_backend_end_to_end(tiny_dataset, tmp_path, external_memory):
    output = tmp_path / "out"
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"sample_genes": 24, "holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 1}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {
                "config": {"backend": "xgboost", "external_memory": external_memory, "max_rounds": 40, "num_threads": 1, "learning_rate": 0.3}
            },
            "shap_summary": {"config": {"sample_rows": 200, "chunk_rows": 100}},
        }
    }
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance, resources=build_resources(output_dir=str(output)), run_config=run_config, log=lambda m: None
        )
    model = collected["instance_model [instance_0]"]
    assert model["backend"] == "xgboost" and model["external_memory"] is external_memory
    partition_dir = output / "artifacts" / "instance_model" / "instance_0"
    assert (partition_dir / "model.ubj").exists() and not (partition_dir / "model.txt").exists()
    assert not any((partition_dir / "extmem_cache").glob("**/*.page"))  # caches removed
    holdout = collected["holdout_evaluation"]
    assert holdout["logloss"] < holdout["baseline_logloss"]
    assert collected["shap_summary"]["additivity_max_error"] < 1e-3
