from memopt_pipeline.assets.dataset import dataset_metadata, source_dataset
from memopt_pipeline.assets.evaluation import holdout_evaluation, shap_summary
from memopt_pipeline.assets.planning import memory_plan
from memopt_pipeline.assets.report import run_report
from memopt_pipeline.assets.screening import feature_screening
from memopt_pipeline.assets.splits import cv_folds, gene_split, instance_assignment
from memopt_pipeline.assets.training import ensemble_model, instance_model

# Graph order: each asset depends only on the ones before it.
ALL_ASSETS = [
    source_dataset,
    dataset_metadata,
    memory_plan,
    gene_split,
    feature_screening,
    instance_assignment,
    cv_folds,
    instance_model,
    ensemble_model,
    holdout_evaluation,
    shap_summary,
    run_report,
]
PREPARE_ASSETS = ALL_ASSETS[: ALL_ASSETS.index(cv_folds)]  # unpartitioned, up to the instances
INSTANCE_ASSETS = [cv_folds, instance_model]  # one dynamic partition per instance
FINALIZE_ASSETS = ALL_ASSETS[ALL_ASSETS.index(ensemble_model) :]  # ensemble, evaluation, explanation, report
