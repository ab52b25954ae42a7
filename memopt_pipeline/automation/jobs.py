"""Jobs: the graph in three runs, because instance partitions exist only once assigned.

1. prepare_instances: dataset -> metadata -> plan -> split -> instance assignment (adds the
   dynamic partitions);
2. train_instances: cv_folds + instance_model, one run per instance partition (launch a
   backfill over all partitions from the UI);
3. evaluate_and_explain: ensemble, holdout evaluation, SHAP and the run report.

Two more jobs start a chain of those runs (automation/chaining.py): a job cannot mix the
unpartitioned stages with the dynamically partitioned ones, so the chain sensors launch the
next runs when the previous ones succeed:

- full_training: the prepare stages, then one train_instances run per instance partition,
  then evaluate_and_explain;
- retrain_from_current_plan: checks that a plan exists, then the same train and evaluate
  runs, without recomputing metadata, plan, split or instance assignment.
"""

import dagster as dg

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME, instance_partitions

# Tags of chained runs. CHAIN_TAG names the kind of chain (set by the starting job),
# CHAIN_ID_TAG the run that started it (set on every run the chain sensors launch), and
# CHAIN_CONFIG_TAG carries the run config of the later stages as JSON, because a run's own
# config may only hold the ops of its own job.
CHAIN_TAG = "memopt/chain"
CHAIN_ID_TAG = "memopt/chain_id"
CHAIN_CONFIG_TAG = "memopt/chain_config"

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
    description="Ensemble the instance models, evaluate on holdout genes, explain with chunked SHAP, write the run report.",
)


full_training_job = dg.define_asset_job(
    "full_training",
    selection=dg.AssetSelection.assets(*PREPARE_ASSETS),
    tags={CHAIN_TAG: "full_training"},
    description=(
        "Everything, from data to evaluation. This run materializes the prepare stages (dataset, metadata, "
        "memory plan, gene split, feature screening, instance assignment); when it succeeds, the sensor "
        "chain_train_instances launches one train_instances run per instance partition, and when every "
        "instance_model partition is materialized, chain_evaluate_and_explain launches evaluate_and_explain. "
        "Config of those later runs: the tag memopt/chain_config, JSON such as "
        '{"ops": {"instance_model": {"config": {"max_rounds": 100}}}}; the resources, execution and loggers '
        "sections of this run's config carry over to them."
    ),
)


@dg.op(description="Fails unless instance_assignment has been materialized and instance partitions exist.")
def check_current_plan(context: dg.OpExecutionContext) -> None:
    assignment = context.instance.get_latest_materialization_event(dg.AssetKey("instance_assignment"))
    partitions = context.instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
    if assignment is None or not partitions:
        raise dg.Failure(
            description="no current plan to retrain: instance_assignment has never been materialized or there "
            "are no instance partitions; run full_training (or prepare_instances) first"
        )
    context.log.info(f"current plan: {len(partitions)} instance partitions ({', '.join(partitions)})")


@dg.job(
    name="retrain_from_current_plan",
    tags={CHAIN_TAG: "retrain_from_current_plan"},
    description=(
        "Re-train every existing instance partition and re-evaluate, keeping the current metadata, memory plan, "
        "gene split and instance assignment. This run only checks that a plan exists; the sensor "
        "chain_train_instances then launches one train_instances run per partition, and "
        "chain_evaluate_and_explain launches evaluate_and_explain once all are materialized. Config of those "
        "runs: the tag memopt/chain_config, as for full_training."
    ),
)
def retrain_from_current_plan_job():
    check_current_plan()


CHAIN_START_JOBS = [full_training_job, retrain_from_current_plan_job]
ALL_JOBS = [prepare_instances_job, train_instances_job, evaluate_and_explain_job, *CHAIN_START_JOBS]
