"""XGBoost (in memory and external memory) trains and evaluates through the whole graph."""

import dagster as dg
import pytest

from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.definitions import build_resources
from memopt_pipeline_tests.checkpoint_layout import stage_run_dir, stored_value


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
    partition_dir = stage_run_dir(output, collected, "instance_model [instance_0]")
    assert (partition_dir / "model.ubj").exists() and not (partition_dir / "model.txt").exists()
    assert not any((partition_dir / "extmem_cache").glob("**/*.page"))  # caches removed
    holdout = collected["holdout_evaluation"]
    assert holdout["logloss"] < holdout["baseline_logloss"]
    assert collected["shap_summary"]["additivity_max_error"] < 1e-3


@pytest.mark.parametrize(
    "backend,calibration", [("lightgbm", "platt"), ("xgboost", "isotonic")], ids=["lightgbm_ovr", "xgboost_ovr"]
)
def test_one_vs_rest_end_to_end_with_calibration_in_the_model_card(tiny_dataset, tmp_path, backend, calibration):
    import json

    output = tmp_path / "out"
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 2, "overlap": 0.1}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {
                "config": {
                    "backend": backend, "objective": "ovr", "calibration": calibration, "max_rounds": 40,
                    "num_threads": 1, "learning_rate": 0.3,
                }
            },
            "ensemble_model": {"config": {"weighting": "validation"}},
            "shap_summary": {"config": {"sample_rows": 200, "chunk_rows": 100}},
        }
    }  # fmt: skip
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance, resources=build_resources(output_dir=str(output)), run_config=run_config, log=lambda m: None
        )
    for key in ("instance_0", "instance_1"):
        card = json.loads((stage_run_dir(output, collected, f"instance_model [{key}]") / "model_card.json").read_text())
        assert card["objective"] == "ovr" and card["backend"] == backend
        assert card["calibration"]["method"] == calibration and len(card["calibration"]["per_class"]) == 3
        assert card["calibration_report"]["rows"] == card["train_rows"]  # k-fold: every row out of fold once
        assert set(card["cv_pr_auc"]) == {"neither", "donor", "acceptor"}
        assignment = stored_value(collected, "instance_assignment")
        assert card["genes"] == sorted(assignment["instances"][key]["genes"]) and len(card["genes"]) == card["train_genes"]
        metadata = collected[f"instance_model [{key}]"]
        # Metadata is rounded to 4 significant digits for the UI; the card keeps full precision.
        assert metadata["cv_pr_auc_donor_mean"] == pytest.approx(card["cv_pr_auc"]["donor"]["mean"], rel=1e-3)
        assert metadata["oof_ece_after"] <= metadata["oof_ece_before"]  # fitted on these rows: cannot be worse
    ensemble = stored_value(collected, "ensemble_model")
    weights = [m["weight"] for m in ensemble["members"]]
    assert ensemble["weighting"] == "validation" and sum(weights) == pytest.approx(1.0)
    assert all(m["calibration"]["method"] == calibration for m in ensemble["members"])
    holdout = collected["holdout_evaluation"]
    assert holdout["logloss"] < holdout["baseline_logloss"]
    assert holdout["ece_after_calibration"] < 0.1
    assert collected["shap_summary"]["additivity_max_error"] < 1e-3


def test_fast_mode_validates_on_one_five_percent_split(tiny_dataset, tmp_path):
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 1}},
            "cv_folds": {"config": {"fast": True}},
            "instance_model": {"config": {"max_rounds": 30, "num_threads": 1, "learning_rate": 0.3}},
            "shap_summary": {"config": {"sample_rows": 100, "chunk_rows": 100}},
        }
    }
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance, resources=build_resources(output_dir=str(tmp_path / "out")), run_config=run_config, log=lambda m: None
        )
    import json

    folds = stored_value(collected, "cv_folds [instance_0]")
    assert folds["mode"] == "fast" and folds["validation_folds"] == [1]
    held = [g for g, f in folds["fold_of_gene"].items() if f == 1]
    assert 1 <= len(held) <= 0.1 * len(folds["fold_of_gene"]) + 1  # 27 genes: one or two held out
    card_path = stage_run_dir(tmp_path / "out", collected, "instance_model [instance_0]") / "model_card.json"
    card = json.loads(card_path.read_text())
    assert card["cv_mode"] == "fast" and len(card["folds"]) == 1
    assert collected["holdout_evaluation"]["logloss"] < collected["holdout_evaluation"]["baseline_logloss"]
