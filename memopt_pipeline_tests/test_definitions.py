import dagster as dg

from memopt_pipeline.definitions import defs


def test_definitions_load_with_every_asset_job_and_check():
    repository = defs.get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    assert keys == {
        "source_dataset", "dataset_metadata", "memory_plan", "gene_split", "feature_screening", "instance_assignment",
        "cv_folds", "instance_model", "ensemble_model", "holdout_evaluation", "shap_summary", "run_report",
    }
    assert {job.name for job in repository.get_all_jobs()} >= {"prepare_instances", "train_instances", "evaluate_and_explain"}
    evaluate = repository.get_job("evaluate_and_explain")
    assert dg.AssetKey("run_report") in evaluate.asset_layer.executable_asset_keys
    assert dg.AssetCheckKey(dg.AssetKey("holdout_evaluation"), "holdout_beats_class_prior") in repository.asset_graph.asset_check_keys


def test_workspace_module_loads():
    dg.Definitions.validate_loadable(defs)
