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
from memopt_pipeline.assets.display import round_significant
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME, instance_partitions
from memopt_pipeline.core.units import GiB
from memopt_pipeline.resources import MemoryGuard
from memopt_pipeline.resources.chain_settings import CHAIN_ID_TAG, CHAIN_TAG, ChainSettings  # noqa: F401 (re-exported)
from memopt_pipeline.resources.checkpoints import latest_materialization
from memopt_pipeline.resources.io_manager import load_latest_value

# Tags of chained runs, defined beside the chain settings (which tell a chain run by its tag):
# CHAIN_TAG names the kind of chain (a tag of the starting job), CHAIN_ID_TAG the run that
# started it (on that run and on every run the chain sensors launch). The settings of a
# chain's later runs are the chain_settings resource's config in the starting run.

prepare_instances_job = dg.define_asset_job(
    "prepare_instances",
    selection=dg.AssetSelection.assets(*PREPARE_ASSETS),
    description="Dataset, metadata, memory plan, gene split, feature screening and instance assignment, which "
    "registers one instance partition per instance model for train_instances to train.",
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
        "Settings of those later runs (folds, boosting, ensemble, evaluation, SHAP): resources.chain_settings "
        "in this run's config; the memory budget and the rest of its resources, execution and loggers sections "
        "carry over to them. Every run of the chain, this one included, is tagged memopt/chain_id=<this run's id>."
    ),
)


@dg.op(
    description="Fails unless instance_assignment has been materialized and instance partitions exist, or when "
    "the chain settings cannot work on those instances; logs the settings and memory budget the chain will use."
)
def check_current_plan(context: dg.OpExecutionContext, chain_settings: ChainSettings, memory_guard: MemoryGuard) -> None:
    # The two resources are required so that retrain_from_current_plan's Launchpad holds them:
    # the chain sensors hand their config to the train and evaluate runs.
    assignment = context.instance.get_latest_materialization_event(dg.AssetKey("instance_assignment"))
    partitions = context.instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)
    if assignment is None or not partitions:
        raise dg.Failure(
            description="no current plan to retrain: instance_assignment has never been materialized or there "
            "are no instance partitions; run full_training (or prepare_instances) first"
        )
    context.log.info(f"current plan: {len(partitions)} instance partitions ({', '.join(partitions)})")
    instances = load_latest_value(context.instance, dg.AssetKey("instance_assignment"), None)["instances"]
    chain_settings.check_chain_start(context, [len(instance["genes"]) for instance in instances.values()])
    _check_budget(context, memory_guard.budget_bytes() / GiB)


def _check_budget(context: dg.OpExecutionContext, budget_gb: float) -> None:
    # The plan sized the instances for its own budget; a smaller one can still train them, one
    # memory ladder level lower at a time, so it is a warning and not a failure.
    plan = latest_materialization(context.instance, dg.AssetKey("memory_plan"), None)
    entry = plan.asset_materialization.metadata.get("budget_gb") if plan is not None else None
    planned = float(entry.value) if entry is not None else None
    # The metadata holds the budget rounded for display: compare like with like, so the plan's own
    # budget is not "below" itself when rounding went up.
    if planned is not None and round_significant(budget_gb) < planned:
        context.log.warning(
            f"memory budget {budget_gb:.2f} GiB is below the {planned:.2f} GiB the current plan sized the instances "
            "for: instance trainings may run out of memory and retry at lower memory ladder levels. Raise "
            "memory_guard budget_gb, or run full_training to plan for this budget"
        )
    else:
        context.log.info(f"memory budget {budget_gb:.2f} GiB (the current plan was sized for {planned or budget_gb:.2f} GiB)")


@dg.job(
    name="retrain_from_current_plan",
    tags={CHAIN_TAG: "retrain_from_current_plan"},
    description=(
        "Re-train every existing instance partition and re-evaluate, keeping the current metadata, memory plan, "
        "gene split and instance assignment. This run only checks that a plan exists; the sensor "
        "chain_train_instances then launches one train_instances run per partition, and "
        "chain_evaluate_and_explain launches evaluate_and_explain once all are materialized. Settings of those "
        "runs: resources.chain_settings and memory_guard in this run's config, as for full_training."
    ),
)
def retrain_from_current_plan_job():
    check_current_plan()


CHAIN_START_JOBS = [full_training_job, retrain_from_current_plan_job]
ALL_JOBS = [prepare_instances_job, train_instances_job, evaluate_and_explain_job, *CHAIN_START_JOBS]
