"""Jobs: the graph in three runs, because instance partitions exist only once assigned.

1. prepare_instances: dataset -> metadata -> plan -> split -> instance assignment (adds the
   dynamic partitions);
2. train_instances: cv_folds + instance_model, one run per instance partition (launch a
   backfill over all partitions from the UI);
3. evaluate_and_explain: ensemble, holdout evaluation and SHAP.
"""

import dagster as dg

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets.partitions import instance_partitions

prepare_instances_job = dg.define_asset_job(
    "prepare_instances", selection=dg.AssetSelection.assets(*PREPARE_ASSETS), description=__doc__
)
train_instances_job = dg.define_asset_job(
    "train_instances",
    selection=dg.AssetSelection.assets(*INSTANCE_ASSETS),
    partitions_def=instance_partitions,
    description="cv_folds and instance_model for one instance partition.",
)
evaluate_and_explain_job = dg.define_asset_job(
    "evaluate_and_explain",
    selection=dg.AssetSelection.assets(*FINALIZE_ASSETS),
    description="Ensemble the instance models, evaluate on holdout genes, explain with chunked SHAP.",
)

ALL_JOBS = [prepare_instances_job, train_instances_job, evaluate_and_explain_job]
